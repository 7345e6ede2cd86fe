"""The parameter probe's passes on CPU in one threaded numba call each (the ``fast`` extra).

On CPU, stock torch takes a parameter's weight norm, gradient norm and pre-step copy in three
passes and the update norm in two more (``sub_`` writes the difference, ``dot`` reads it back),
one call per tensor. Here, for the whole parameter list at once:

- ``squares_and_copy``: sums of squares of weights and gradients, filling the pre-step copies
  in the same read of the weights (weights are read once, gradients once, copies written once);
- ``difference_squares``: sum of squares of weight minus copy after the step, nothing written;
- ``squares``: sums of squares alone (the global gradient norm of ``record/clip_sites``);
- ``totals``: plain sums (Adam's ``exp_avg_sq``, whose sum gives the rms of sqrt(v)).

Measured on the sample GPT's 102 parameter tensors (4.9M values), caches flushed before each
call (``python bench/moments.py``, docs/benchmarks.md "CPU kernels"): norms and copy 2.68 ms
with torch against 1.24 ms here, the update norm 1.69 ms against 0.79 ms.

Only for tensors numba can read directly: plain, contiguous CPU tensors of one dtype, float32
or float64. ``usable`` says whether lists qualify; callers keep torch's path otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from . import host_kernels

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

#: Whether tensors can take these kernels (plain, contiguous CPU tensors of one float dtype).
usable = host_kernels.host_readable


def _addresses(tensors: list[torch.Tensor | None]) -> np.ndarray:
    return np.array([0 if t is None else t.data_ptr() for t in tensors], np.int64)


def _run(
    mode: str,
    first: list[torch.Tensor],
    second: list[torch.Tensor | None] | None = None,
    copies: list[torch.Tensor | None] | None = None,
) -> np.ndarray:
    """``(P, 2)`` float64 sums from one kernel call over ``first`` and its companions."""
    from . import param_kernels as kernels

    none: list[torch.Tensor | None] = [None] * len(first)
    sizes = np.array([t.numel() for t in first], np.int64)
    like = np.zeros(1, _DTYPES[first[0].dtype])
    out = np.empty((len(first), 2))
    # The tensors stay referenced by the caller's lists for the whole call: the kernel reads
    # them by address.
    args = (_addresses(first), _addresses(second or none), _addresses(copies or none), like)
    parts = host_kernels.thread_parts() if sizes.max() > kernels.GRAIN else 1
    if parts > 1:
        kernels.parallel(*args, getattr(kernels, mode), sizes, parts, out)
    else:
        kernels.serial(*args, getattr(kernels, mode), sizes, out)
    return out


def squares_and_copy(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    copies: list[torch.Tensor | None],
) -> np.ndarray:
    """``(P, 2)``: sum of squares of each weight and of its gradient (0 where ``None``);
    ``copies[i]``, where given, receives weight ``i`` (same size and dtype)."""
    return _run("SQUARES", weights, grads, copies)


def squares(tensors: list[torch.Tensor]) -> np.ndarray:
    """``(P,)`` float64: the sum of squares of each tensor (a gradient norm's pass)."""
    return _run("SQUARES", tensors)[:, 0]


def difference_squares(weights: list[torch.Tensor], copies: list[torch.Tensor]) -> np.ndarray:
    """``(P,)``: sum of squares of ``weights[i] - copies[i]`` (the update, not materialised)."""
    return _run("DIFFERENCE", weights, copies=copies)[:, 0]


def totals(tensors: list[torch.Tensor]) -> np.ndarray:
    """``(P,)``: the sum of each tensor."""
    return _run("TOTAL", tensors)[:, 0]
