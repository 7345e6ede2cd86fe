"""Single-pass moments of CPU tensors: sum, sum of squares and absmax in one read.

Stock PyTorch has no CPU kernel that returns a sum and a sum of squares together, so the device
path (``moments.moment_scalars``) reads a tensor three to four times (``sum``, ``dot``,
``amin``/``amax``). On CPU the recorder's cost is exactly those memory passes, so when numba is
installed (the ``fast`` extra) CPU tensors take this loop instead: one vectorised pass that adds
``x`` and ``x*x`` and keeps the largest ``|x|`` as an integer maximum over the bit pattern with
the sign bit cleared. For IEEE floats that integer order is the order of magnitudes, and it
stays vectorisable where a float ``max`` with NaN semantics is not; NaN bit patterns sort above
Inf, so a NaN or Inf anywhere shows as a non-finite absmax, exactly as the device path reports.

Measured on this project's 2-core CPU (``python bench/moments.py``, docs/benchmarks.md): 1M
float32 elements in 98 µs against 203 µs for torch's reductions, 4M in 390 µs against 1,107.

Numbers from the kernel come back as one float64 row ``[sum, sumsq, -absmax, absmax]``, the
layout of the device path's ``[sum, sumsq, min, max]``: ``decode_moments`` reads both alike.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

#: ``STABSCOPE_MOMENTS=torch`` forces the torch reductions on CPU too (benchmarks, tests).
_FORCED_TORCH = os.environ.get("STABSCOPE_MOMENTS", "").lower() == "torch"

#: Whether CPU tensors are reduced by the single-pass kernel. numba is optional (the ``fast``
#: extra); it is imported, and the kernels compiled, only when a CPU tensor is first reduced:
#: importing numba takes ~0.5 s that commands which only read runs should not pay.
AVAILABLE = not _FORCED_TORCH and importlib.util.find_spec("numba") is not None

#: From this many elements the tensor is split across threads (below it one thread's
#: vectorised loop is faster than waking a second: 64K elements 9 µs alone, 14 µs split).
PARALLEL_FROM = 1 << 17

#: Dtypes the kernels read as they are; other floating tensors are copied to float32 first.
_HOST_DTYPES = (torch.float32, torch.float64)

#: Float width -> (integer type of the same width, mask that clears the sign bit).
_BITS = {4: (np.int32, 0x7FFFFFFF), 8: (np.int64, 0x7FFFFFFFFFFFFFFF)}


def _flat(t: torch.Tensor) -> np.ndarray:
    """A contiguous float32/float64 numpy view of ``t`` (copied only when it must be)."""
    x = t.detach()
    if x.dtype not in _HOST_DTYPES:
        x = x.float()
    return x.contiguous().view(-1).numpy()  # (numel,)


def host_moments_into(t: torch.Tensor, out: np.ndarray) -> None:
    """Write ``[sum, sumsq, -absmax, absmax]`` of the CPU tensor ``t`` into the float64 ``out``.

    ``t`` is any floating CPU tensor with at least one element; half types are copied to
    float32 and non-contiguous tensors to a contiguous copy first (one extra pass, still fewer
    than the four of the torch path). Requires ``AVAILABLE``.
    """
    values = _flat(t)
    int_type, mask = _BITS[values.itemsize]
    bits = values.view(int_type)
    zero = values.dtype.type(0)
    from . import moment_kernels as kernels  # imports numba; compiled on first use

    if values.size >= PARALLEL_FROM and _may_use_threads():
        # Split like torch does: as many parts and numba threads as torch's intra-op threads.
        parts = kernels.use_threads(torch.get_num_threads())
        kernels.parallel(values, bits, int_type(mask), zero, parts, out)
    else:
        kernels.serial(values, bits, int_type(mask), zero, out)


_threads_pid: list[int] = []  # the process whose numba OpenMP pool is (or will be) running


def _may_use_threads() -> bool:
    """Threads only in the process that started them: numba's OpenMP pool terminates a forked
    child that uses it again ("fork() called from a process already using GNU OpenMP"), and
    a DataLoader or ``ddp_fork`` child of a recording process must not die of that."""
    if not _threads_pid:
        _threads_pid.append(os.getpid())
    return _threads_pid[0] == os.getpid()
