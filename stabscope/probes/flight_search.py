"""What the flight recorder watches, and where a non-finite value began inside what it watches.

Watched: every residual block of the discovered structure and every leaf module outside the
blocks (the stem and the head: embeddings, dropout, final norm, output projection). Without a
recognised structure the blocks are the children of the model's largest list of like modules
(``transformer.h``, ``layers``).

The first non-finite leaf, once a watched module's output (forward) or the gradient w.r.t. it
(backward) went non-finite:

- forward, eager CPU: the block is replayed at once, inside its own forward hook, from the
  inputs it just received and with the step's weights, under ``no_grad`` with the RNG and
  buffers given back (``side_forward``); the first leaf, in firing order, whose output holds a
  NaN/Inf is the answer (``found_by: replay``). The replay runs in the modes the modules
  trained in (a NaN that only a training-mode path makes shows again), then, where that
  stayed finite, once more in eval mode. Nothing is kept between steps for this.
- forward elsewhere (CUDA, compiled code, a replay that raised or stayed finite): the first
  leaf of the block, in registration order, whose parameters hold a NaN/Inf (``parameters``),
  else the block itself (``block``).
- backward: the watched module W first in backward order whose output gradient went
  non-finite; the gradient went bad in what consumes W's output. Before the optimizer step,
  among the leaves of the watched modules after W, the one that comes last in forward order
  whose parameter gradients hold a NaN/Inf (gradients flow backwards, so that leaf is where
  they first went bad: ``gradients``). None there: W itself when it is a leaf (``output``),
  else the last such leaf inside W (``gradients``), else W (``block``). A parameter-free
  leaf inside a block where it began is named by the leaf with parameters just before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..record.grad_layout import norm_view
from ..record.hook_context import primary_tensor
from ..record.hooks import paused
from ..record.module_table import clean_name, scripted
from ..record.side_forward import side_forward
from ..store.structure import Structure

#: At most this many leaf modules outside the blocks are watched (the stem and head are few;
#: a model without blocks is bounded by this).
MAX_OUTSIDE = 32


def watched_modules(root: nn.Module, structure: Structure | None) -> list[tuple[str, nn.Module]]:
    """``(clean name, module)`` of the blocks and the leaf modules outside them, in
    registration order."""
    named = [(clean_name(n), m) for n, m in root.named_modules()]
    blocks = [b.name for b in structure.blocks] if structure is not None else []
    by_name = dict(named)
    blocks = [b for b in blocks if b in by_name] or _like_children(root)

    def inside(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in blocks)

    outside = [(n, m) for n, m in named if not any(m.children()) and not inside(n)]
    chosen = set(blocks) | {n for n, _ in outside[:MAX_OUTSIDE]}
    return [(n, m) for n, m in named if n in chosen and not scripted(m)]  # no hook fires there


def _like_children(root: nn.Module) -> list[str]:
    """The children of the largest ModuleList/Sequential of two or more non-leaf modules of
    one class: the blocks of a model whose structure was not recognised."""
    best: list[str] = []
    for name, m in root.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.named_children())
        if len(kids) < 2 or len({type(k) for _, k in kids}) != 1 or not any(kids[0][1].children()):
            continue
        if len(kids) > len(best):
            best = [clean_name(f"{name}.{k}" if name else k) for k, _ in kids]
    return best


def leaves(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf modules of ``module`` (itself when it is one), registration order."""
    found = [
        (f"{name}.{n}" if n else name, m)
        for n, m in module.named_modules()
        if not any(m.children()) and not scripted(m)
    ]
    return [(clean_name(n), m) for n, m in found]


def _nonfinite(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())


def replay(
    name: str,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    pause: tuple[Any, ...],
) -> str | None:
    """Run ``module`` again on ``args``/``kwargs`` (no grad, RNG and buffers given back, the
    recorder's hooks paused), in its modules' own modes and then in eval mode, and return the
    first leaf, in firing order, whose output held a NaN/Inf; None when neither run made
    one. Errors are the caller's to catch."""
    found: list[str] = []
    handles = []

    def check(leaf: str) -> Any:
        def hook(m: nn.Module, a: Any, out: Any) -> None:
            if not found and _nonfinite(primary_tensor(out)):
                found.append(leaf)

        return hook

    try:
        for leaf, m in leaves(name, module):
            handles.append(m.register_forward_hook(check(leaf)))
        for keep_modes in (True, False):
            keep = side_forward(module, keep_modes=keep_modes, inputs=(args, kwargs))
            with paused(*pause), keep, torch.no_grad():
                module(*args, **kwargs)
            if found:
                break
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def inputs_nonfinite(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the tensor that stands for the module's input already held a NaN/Inf."""
    return _nonfinite(primary_tensor((*args, *kwargs.values())))


def _params_nonfinite(m: nn.Module, grads: bool) -> bool:
    for p in m.parameters(recurse=False):
        t = p.grad if grads else p
        if t is not None and _nonfinite(norm_view(t.detach())):  # a sparse grad's values
            return True
    return False


def by_parameters(name: str, module: nn.Module) -> str | None:
    """The first leaf of ``module`` (registration order) whose parameters hold a NaN/Inf."""
    for leaf, m in leaves(name, module):
        if _params_nonfinite(m, grads=False):
            return leaf
    return None


def by_gradients(ordered: Iterator[tuple[str, nn.Module]]) -> str | None:
    """Of the leaves given in forward order, the last whose parameter gradients hold a NaN/Inf."""
    last = None
    for leaf, m in ordered:
        if _params_nonfinite(m, grads=True):
            last = leaf
    return last


__all__ = [
    "MAX_OUTSIDE",
    "by_gradients",
    "by_parameters",
    "inputs_nonfinite",
    "leaves",
    "replay",
    "watched_modules",
]
