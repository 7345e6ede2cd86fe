"""Parameters an optimizer trains that no module holds: raw tensors
(``w = torch.randn(..., requires_grad=True)``), or a model's parameters stacked for
``torch.func.vmap`` (``stack_module_state``, then ``functional_call`` on a meta copy).

A zero-code run records the first module the script calls whose parameters an optimizer
trains; such a script calls none, so nothing was recorded. When the first optimizer step
ends and no live module holds any tensor the optimizers step, those tensors are gathered in
a ``LooseParameters`` module that is never called: the run then has the loss, the learning
rates, the gradient norm before and after a clip, and each tensor's gradient, update and
weight statistics; no activation, attention or residual statistics (there is no module to
hook), and a note says so.
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

from .optimizers import trained_parameter_ids
from .roots import live_modules

LOOSE_NOTE = (
    "the optimizer's parameters belong to no module (raw tensors, or parameters stacked for "
    "torch.func.vmap): they are recorded as LooseParameters from step {step} on, named by "
    "param group and position; the loss, learning rates, gradient norms and each tensor's "
    "gradient and update statistics are recorded, no activation, attention or residual "
    "statistics"
)

#: The structure of such a run: there is no forward of a module to trace.
LOOSE_STRUCTURE = "no module computes with the optimizer's tensors (LooseParameters)"


class LooseParameters(nn.Module):
    """The script's own tensors (not copies) under ``group{g}_{i}`` names (``opt{k}_`` first
    where several optimizers are alive), in the order the optimizers hold them. Never
    called: ``computes = False`` keeps it out of the hooks that never fired."""

    computes = False

    def __init__(self, optimizers: list[Optimizer]) -> None:
        super().__init__()
        seen: set[int] = set()
        for k, optimizer in enumerate(optimizers):
            prefix = f"opt{k}_" if len(optimizers) > 1 else ""
            for g, group in enumerate(optimizer.param_groups):
                for i, tensor in enumerate(group["params"]):
                    if id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    # Into the table directly: register_parameter would want an
                    # nn.Parameter, and wrapping a plain tensor makes a new object whose
                    # gradients the script's backward never fills.
                    self._parameters[f"{prefix}group{g}_{i}"] = tensor  # type: ignore[assignment]

    def forward(self) -> None:  # never called: no module computes with these tensors
        raise RuntimeError("LooseParameters holds tensors for recording; it computes nothing")


def held_by_no_module(optimizers: list[Optimizer]) -> bool:
    """Whether the optimizers step tensors and no live module holds any of them (one scan of
    the garbage collector's objects, at the first optimizer step only)."""
    trained = set().union(*(trained_parameter_ids(o) for o in optimizers)) if optimizers else set()
    if not trained:
        return False
    return not any(
        id(p) in trained
        for m in live_modules()
        if type(m) is not LooseParameters
        for p in m._parameters.values()
        if p is not None
    )


__all__ = ["LOOSE_NOTE", "LOOSE_STRUCTURE", "LooseParameters", "held_by_no_module"]
