"""Single-pass moments of CPU tensors: sum, sum of squares and absmax in one read.

Stock PyTorch has no CPU kernel that returns a sum and a sum of squares together, so the device
path (``moments.moment_scalars``) reads a tensor three to four times (``sum``, ``dot``,
``amin``/``amax``). On CPU the recorder's cost is exactly those memory passes, so when numba is
installed (the ``fast`` extra, see ``host_kernels``) CPU tensors take this loop instead: one
vectorised pass that adds ``x`` and ``x*x`` and keeps the largest ``|x|`` as an integer maximum
over the bit pattern with the sign bit cleared. For IEEE floats that integer order is the order
of magnitudes, and it stays vectorisable where a float ``max`` with NaN semantics is not; NaN
bit patterns sort above Inf, so a NaN or Inf anywhere shows as a non-finite absmax, exactly as
the device path reports.

Measured on this project's 2-core CPU (``python bench/moments.py``, docs/benchmarks.md): 1M
float32 elements in 73 µs against 199 µs for torch's reductions, hot in cache; see
``moment_kernels`` for tensors that come from memory.

Numbers from the kernel come back as one float64 row ``[sum, sumsq, -absmax, absmax]``, the
layout of the device path's ``[sum, sumsq, min, max]``: ``decode_moments`` reads both alike.
"""

from __future__ import annotations

import numpy as np
import torch

from .host_kernels import HOST_DTYPES, PARALLEL_FROM, kernels, thread_parts

#: Float width -> the kernels' constant arguments: the integer type of the same width, the
#: mask that clears the sign bit (of that type) and a typed zero; built once, not per call
#: (the flight ring calls ``accumulate_into`` ~20 times a step).
_ARGS = {
    4: (np.int32, np.int32(0x7FFFFFFF), np.float32(0)),
    8: (np.int64, np.int64(0x7FFFFFFFFFFFFFFF), np.float64(0)),
}


def _flat(t: torch.Tensor) -> np.ndarray:
    """A contiguous float32/float64 numpy view of ``t`` (copied only when it must be)."""
    x = t.detach()
    if x.dtype not in HOST_DTYPES:
        x = x.float()
    return x.contiguous().view(-1).numpy()  # (numel,)


def host_moments_into(t: torch.Tensor, out: np.ndarray) -> None:
    """Write ``[sum, sumsq, -absmax, absmax]`` of the CPU tensor ``t`` into the float64 ``out``.

    ``t`` is any floating CPU tensor with at least one element; half types are copied to
    float32 and non-contiguous tensors to a contiguous copy first (one extra pass, still fewer
    than the four of the torch path). Requires ``host_kernels.ready()``.
    """
    values = _flat(t)
    int_type, mask, zero = _ARGS[values.itemsize]
    bits = values.view(int_type)
    parts = thread_parts() if values.size >= PARALLEL_FROM else 1
    if parts > 1:
        kernels().parallel(values, bits, mask, zero, parts, out)
    else:
        kernels().serial(values, bits, mask, zero, out)


#: ``accumulate_into`` splits a tensor across threads only from this many elements (16 MiB of
#: float32). Below it one thread reads it on the calling thread: as fast on an idle machine
#: (the sample GPT's 1 MiB block outputs: the tier's hooks 3.7 ms a step either way), and it
#: never waits for a second thread where torch's threads hold the cores (under load, 3.9 ms
#: against 10.2 ms; ``python bench/flight_share.py``, docs/benchmarks.md).
ACCUMULATE_PARALLEL_FROM = 1 << 22


def accumulate_into(t: torch.Tensor, cell: np.ndarray) -> bool:
    """Add the CPU tensor ``t`` to the float32 moment cell ``[sum, sumsq, min, max, numel]``
    (count 0: empty) in one call: the reduction and the combination with what the cell held
    run inside the kernel, so the flight ring's hook pays one dispatch, not a dozen numpy
    scalar operations. Returns whether the cell is finite (no NaN/Inf seen so far).
    Requires ``host_kernels.ready()``."""
    values = _flat(t)
    int_type, mask, zero = _ARGS[values.itemsize]
    bits = values.view(int_type)
    if values.size >= ACCUMULATE_PARALLEL_FROM:
        parts = thread_parts()
        if parts > 1:
            return bool(kernels().parallel_into(values, bits, mask, zero, parts, cell))
    return bool(kernels().serial_into(values, bits, mask, zero, cell))
