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
import threading
from types import ModuleType

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
    parts = thread_parts() if values.size >= PARALLEL_FROM else 1
    if parts > 1:
        kernels().parallel(values, bits, int_type(mask), zero, parts, out)
    else:
        kernels().serial(values, bits, int_type(mask), zero, out)


def kernels() -> ModuleType:
    """The numba moment kernels (imports numba and loads or compiles them on first use)."""
    if not _loaded:
        from . import moment_kernels

        _loaded.append(moment_kernels)
    return _loaded[0]


_loaded: list[ModuleType] = []


def thread_parts() -> int:
    """How many threads a parallel kernel called now may use: torch's intra-op thread count,
    so the recorder splits work like the model's own ops do; 1 in a forked child, and 1
    without starting numba's threads at all where torch runs on one thread."""
    if not may_use_threads():
        return 1
    wanted, thread = torch.get_num_threads(), threading.get_ident()
    if wanted <= 1:
        return 1
    known = _thread_parts.get(thread)
    if known is None or known[0] != wanted:  # numba's count is per calling thread
        known = _thread_parts[thread] = (wanted, _numba_threads(wanted))
    return known[1]


def _numba_threads(wanted: int) -> int:
    # Starting numba's OpenMP pool calls omp_set_num_threads, which can resolve to torch's
    # OpenMP runtime (measured: torch.get_num_threads() went from 1 to the core count). The
    # model must keep its thread count: its reductions' order, hence its bits, depend on it.
    before = torch.get_num_threads()
    parts = kernels().use_threads(wanted)
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
    return parts


_thread_parts: dict[int, tuple[int, int]] = {}  # thread id -> (torch threads, numba threads)


def host_readable(*lists: list[torch.Tensor | None]) -> bool:
    """Whether every tensor in ``lists`` (``None`` entries aside) can be read by a host kernel
    in place: numba available, plain (not a subclass), on CPU, contiguous, and all of one
    dtype, float32 or float64."""
    if not AVAILABLE:
        return False
    dtype = None
    for tensors in lists:
        for t in tensors:
            if t is None:
                continue
            if type(t) is not torch.Tensor or t.device.type != "cpu" or not t.is_contiguous():
                return False
            if dtype is None:
                dtype = t.dtype
            if t.dtype != dtype or dtype not in _HOST_DTYPES:
                return False
    return dtype is not None


_threads_pid: list[int] = []  # the process whose numba OpenMP pool is (or will be) running


def may_use_threads() -> bool:
    """Threads only in the process that started them: numba's OpenMP pool terminates a forked
    child that uses it again ("fork() called from a process already using GNU OpenMP"), and
    a DataLoader or ``ddp_fork`` child of a recording process must not die of that."""
    if not _threads_pid:
        _threads_pid.append(os.getpid())
    return _threads_pid[0] == os.getpid()
