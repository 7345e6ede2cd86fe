"""Structure discovery: residual blocks, branches, norm placement and attention in any model.

What it finds (``Structure`` and its parts) is torch-free and lives in ``stabscope.store``.

structure = discover(model, lambda m: m(example_batch))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..record.module_table import clean_name, unwrap_model
from ..record.side_forward import side_forward
from ..store.structure import AttentionInfo, Block, Branch, Structure, unrecognised
from .detect import detect
from .kinds import is_norm
from .trace import Trace, capture


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): clean_name(n) for n, m in unwrap_model(model).named_modules()}


def discover(model: nn.Module, forward: Callable[[nn.Module], Any]) -> Structure:
    """Run ``forward(model)`` once (eval mode, no grad) and detect.

    Eval mode keeps dropout and batch-norm statistics out of the way; ``side_forward`` gives
    every submodule its own mode back, and the RNG states and buffers, so training is
    unaffected. torch's
    inference fast path for ``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` is off
    meanwhile: under ``no_grad`` in eval mode it would turn a padded batch into nested tensors
    (no shapes to trace) and run fused kernels that the training forward never calls.
    """
    try:
        with (
            side_forward(model),
            torch.no_grad(),
            _without_inference_fastpath(),
            capture(model) as trace,
        ):
            forward(model)
    except Exception as err:  # the user's forward raised: say so, never crash here
        return unrecognised(f"structure trace failed: {type(err).__name__}: {err}")
    return from_trace(model, trace)


def from_trace(model: nn.Module, trace: Trace) -> Structure:
    """Detect the structure from a trace captured elsewhere (e.g. a recorded step)."""
    try:
        return detect(unwrap_model(model), trace, module_names(model))
    except Exception as err:  # detection is best effort: unknown beats a crash
        return unrecognised(f"structure detection failed: {type(err).__name__}: {err}")


@contextlib.contextmanager
def _without_inference_fastpath() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


__all__ = [
    "AttentionInfo",
    "Block",
    "Branch",
    "Structure",
    "Trace",
    "capture",
    "discover",
    "from_trace",
    "is_norm",
    "unrecognised",
]
