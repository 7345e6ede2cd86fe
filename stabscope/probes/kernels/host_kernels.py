"""Whether, and on how many threads, the recorder's numba kernels run on CPU tensors.

The kernels (``moment_kernels``, ``param_kernels``, ``residual_kernels``,
``attention_kernels``) replace several torch passes over a CPU tensor by one read. numba is
optional (the ``fast`` extra). It is imported, and the kernels loaded from numba's disk cache
or compiled, only when a probe first reduces a CPU tensor: commands that only read runs do not
pay the ~0.5 s import. If the kernels fail to build (a numba or LLVM version they do not
support), the recorder says so once and keeps torch's reductions: statistics never depend on
the kernels being there.

Threads: a kernel splits its work into as many parts as torch has intra-op threads, so the
recorder is parallel exactly where the model's own ops are.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from types import ModuleType

import numpy as np
import torch

#: ``STABSCOPE_MOMENTS=torch`` forces the torch reductions on CPU too (benchmarks, tests).
_FORCED_TORCH = os.environ.get("STABSCOPE_MOMENTS", "").lower() == "torch"

#: Whether numba is installed and not switched off. ``ready()`` also requires the kernels to
#: have built.
AVAILABLE = not _FORCED_TORCH and importlib.util.find_spec("numba") is not None

#: From this many elements a tensor is split across threads (below it one thread's
#: vectorised loop is faster than waking a second: 64K elements 9 µs alone, 14 µs split).
PARALLEL_FROM = 1 << 17

#: Dtypes the kernels read in place; other floating tensors are copied to float32 first.
HOST_DTYPES = (torch.float32, torch.float64)

_built: list[bool] = []  # [whether the kernels built], once tried


def ready() -> bool:
    """Whether CPU tensors take the numba kernels: ``AVAILABLE`` and the kernels built."""
    if not AVAILABLE:
        return False
    if not _built:
        _built.append(_build())
    return _built[0]


def status() -> str:
    """``numba`` or ``torch``: the CPU path, without importing numba to find out."""
    return "numba" if AVAILABLE and _built != [False] else "torch"


def _build() -> bool:
    # One tiny call of every kernel: a failure to compile shows here, before a step depends
    # on it, and not inside a user's training step.
    try:
        from . import attention_kernels, moment_kernels, param_kernels, residual_kernels

        x = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
        mask, zero = np.int32(0x7FFFFFFF), np.float32(0)
        moment_kernels.serial(x, x.view(np.int32), mask, zero, np.empty(4))
        moment_kernels.serial_into(x, x.view(np.int32), mask, zero, np.zeros(5, np.float32))
        addresses, none = np.array([x.ctypes.data], np.int64), np.zeros(1, np.int64)
        like, sizes = np.zeros(1, np.float32), np.array([8], np.int64)
        squares = param_kernels.SQUARES
        param_kernels.serial(addresses, none, none, like, squares, sizes, np.empty((1, 2)))
        residual_kernels.serial(x, x, np.float32(1.0), False, 4, np.empty(residual_kernels.FIELDS))
        residual_kernels.token_correlation(x.reshape(1, 2, 4), np.arange(2), 1, 1)
        attention_kernels.entropy_and_max(
            x.reshape(1, 1, 2, 4), np.ones((1, 1, 2, 4), np.bool_), np.empty((1, 2))
        )
        qk, rows = x.reshape(1, 1, 2, 4), np.arange(2).reshape(1, 2)
        empty = np.zeros((0, 0, 0, 0), np.bool_), np.zeros((0, 0, 0, 0), np.float32)
        attention_kernels.sample_attention(
            qk, True, qk, True, True, np.float32(1.0), *empty, np.float32(-1.0), rows, 1,
            np.empty((1, 2)),
        )  # fmt: skip
    except Exception as err:
        warnings.warn(
            f"stabscope: numba kernels unavailable ({type(err).__name__}: {err}); "
            "CPU statistics use torch's reductions",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def kernels() -> ModuleType:
    """The moment kernels module (after ``ready()``)."""
    from . import moment_kernels

    return moment_kernels


def host_readable(*lists: list[torch.Tensor | None]) -> bool:
    """Whether every tensor in ``lists`` (``None`` entries aside) can be read by a kernel in
    place: kernels ready, plain (not a subclass), on CPU, contiguous, and all of one dtype,
    float32 or float64."""
    dtype = None
    for tensors in lists:
        for t in tensors:
            if t is None:
                continue
            if type(t) is not torch.Tensor or t.device.type != "cpu" or not t.is_contiguous():
                return False
            if dtype is None:
                dtype = t.dtype
            if t.dtype != dtype or dtype not in HOST_DTYPES:
                return False
    return dtype is not None and ready()


def thread_parts() -> int:
    """How many threads a parallel kernel called now may use: torch's intra-op thread count;
    1 in a forked child, and 1 without starting numba's threads where torch runs on one."""
    if not may_use_threads():
        return 1
    wanted, thread = torch.get_num_threads(), threading.get_ident()
    if wanted <= 1:
        return 1
    known = _thread_parts.get(thread)
    if known is None or known[0] != wanted:  # numba's count is per calling thread
        known = _thread_parts[thread] = (wanted, _numba_threads(wanted))
    return known[1]


_thread_parts: dict[int, tuple[int, int]] = {}  # thread id -> (torch threads, numba threads)


def _numba_threads(wanted: int) -> int:
    # Starting numba's OpenMP pool calls omp_set_num_threads, which can resolve to torch's
    # OpenMP runtime (measured: torch.get_num_threads() went from 1 to the core count). The
    # model must keep its thread count: its reductions' order, hence its bits, depend on it.
    before = torch.get_num_threads()
    parts = kernels().use_threads(wanted)
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
    return parts


_threads_pid: list[int] = []  # the process whose numba OpenMP pool is (or will be) running


def may_use_threads() -> bool:
    """Threads only in the process that started them: numba's OpenMP pool terminates a forked
    child that uses it again ("fork() called from a process already using GNU OpenMP"), and
    a DataLoader or ``ddp_fork`` child of a recording process must not die of that."""
    if not _threads_pid:
        _threads_pid.append(os.getpid())
    return _threads_pid[0] == os.getpid()
