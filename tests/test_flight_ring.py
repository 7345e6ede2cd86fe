"""The flight ring's host path on values whose sums and squares pass float32's range: the
sums are stored as inf, as torch's float32 reduction gives them, with no warning for the user,
and the values themselves (finite) are not flagged non-finite."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from stabscope.probes.flight_ring import FlightRing


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
