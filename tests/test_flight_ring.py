"""The flight ring's host path (one numba call reduces a tensor and combines it into the cell)
against its device path (torch reductions): values whose sums and squares pass float32's
range are stored as inf, as torch's float32 reduction gives them, with no warning for the
user, and are not flagged non-finite; two calls in one step combine as the device path
combines them, a NaN or Inf of either call flagged from then on."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from stabscope.probes.flight_ring import FlightRing
from stabscope.probes.kernels import host_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sums_past_float32_are_inf_without_a_warning(dtype):
    ring = FlightRing(slots=4, width=1, device=torch.device("cpu"))
    t = torch.full((8,), 1e30 if dtype == torch.float64 else 1e20, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would raise here
        flagged = ring.put(0, 0, t)
        flagged_again = ring.put(0, 0, t)  # the second call adds to the first
    assert flagged is False and flagged_again is False
    cell = ring.host[0, 0, 0]  # float32 [sum, sumsq, min, max, numel]
    square_sum = torch.dot(t.float(), t.float())  # torch's float32 reduction of the squares
    assert math.isinf(square_sum.item()) and math.isinf(float(cell[1]))
    assert float(cell[0]) == pytest.approx(float(2 * t.float().sum()), rel=1e-6)
    assert float(cell[3]) == float(t.float().max()) and float(cell[4]) == 16


def _device_cell(tensors):
    """The cell the device path gives for ``tensors`` put in turn: an independent reference
    (torch reductions, ``_combine``), on a ring with no host view."""
    ring = FlightRing(slots=2, width=1, device=torch.device("cpu"))
    ring.host = None  # the tensor path, as off CPU
    for t in tensors:
        ring.put(0, 0, t)
    return ring.values[0, 0, 0].numpy()


@pytest.mark.parametrize("size", [300, 1 << 22])  # one thread; split across threads
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 1])  # the bad value in the first or the second call
def test_host_cell_combines_two_calls_like_the_device_path(size, bad, where):
    if not host_kernels.ready():
        pytest.skip("numba kernels not available")
    gen = torch.Generator().manual_seed(size)
    tensors = [torch.randn(size, generator=gen) * s for s in (1.0, 3.0)]
    if bad is not None:
        tensors[where][size // 3] = bad
    ring = FlightRing(slots=2, width=1, device=torch.device("cpu"))
    flags = [ring.put(0, 0, t) for t in tensors]
    cell, want = ring.host[0, 0, 0], _device_cell(tensors)
    # Non-finite from the call that saw it on, and it stays seen after a finite call.
    assert flags == [bad is not None and where == 0, bad is not None]
    # The host path keeps [-absmax, absmax] where the device keeps [min, max]: both decode
    # to the same absmax (``decode_moments``).
    absmax = [
        np.nanmax(np.abs(c[2:4])) if not np.isnan(c[2:4]).any() else np.nan for c in (cell, want)
    ]
    np.testing.assert_allclose(absmax[0], absmax[1], rtol=1e-6)
    # Sums against float64 (the kernel adds in float64; torch's float32 ``dot`` over 4M
    # values is off by ~2e-5 itself).
    both = torch.cat(tensors).double()
    np.testing.assert_allclose(cell[[1, 4]], [both.pow(2).sum().item(), both.numel()], rtol=1e-6)
    scale = both.abs().sum().item()  # the sum cancels: its error is relative to sum |x|
    np.testing.assert_allclose(cell[0], both.sum().item(), atol=1e-6 * scale)
    assert cell[4] == 2 * size
