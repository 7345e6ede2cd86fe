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
        found = _traced(model, forward)
    except Exception as err:  # the user's forward raised: say so, never crash here
        return unrecognised(f"structure trace failed: {type(err).__name__}: {err}")
    if any(b.placement != "pre" for b in found.branches):
        # A Post-LN sum read in eval mode may not hold in training: HF BART, Marian and
        # OPT add F.dropout(f, p, self.training), which eval mode skips. The residual probe
        # reads a Post-LN stream as (norm input - f)/alpha, so such a branch would carry the
        # dropped-out f: a training-mode trace (every module in training mode, whatever the
        # model's mode now: a model may be switched to train() after the Recorder opened;
        # modes, RNG and buffers given back) marks it.
        with contextlib.suppress(Exception):  # best effort: the eval-mode reading stands
            _mark_dropped_in_training(found, _traced(model, forward, training=True))
    return found


def _traced(
    model: nn.Module, forward: Callable[[nn.Module], Any], training: bool = False
) -> Structure:
    with (
        side_forward(model, keep_modes=training),
        torch.no_grad(),
        _without_inference_fastpath(),
        capture(model) as trace,
    ):
        if training:
            for m in model.modules():  # side_forward gives each its own flag back
                m.training = True
        forward(model)
    return from_trace(model, trace)


def _mark_dropped_in_training(found: Structure, training: Structure) -> None:
    """Mark ``transformed`` the branches of ``found`` (eval mode) that the training-mode
    trace found transformed: their sum in training is not the eval-mode one (dropout by
    function), and the residual stats skip them as they do in a training script's run."""
    changed = {(b.name, b.output) for b in training.branches if b.transformed}
    for branch in found.branches:
        if (branch.name, branch.output) in changed and branch.placement != "pre":
            branch.transformed = True


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
