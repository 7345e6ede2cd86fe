"""Which gradients a point of the step saw, and whether an optimizer step received gradients
that were never zeroed since the step before.

A parameter's ``.grad`` is one tensor that backward adds into in place (its version counter
goes up by one per accumulation) until ``zero_grad`` zeroes it in place (one more) or sets
it to None (the next backward makes a new tensor). A loop that never zeroes it hands every
optimizer step the sum of all the gradients so far: the update of step t repeats every
earlier one, the steps grow, and the loss diverges (a whole run: ``loss-divergence`` at the
end; a few steps: nothing else shows it). ``StaleGradients`` watches one parameter with a
post-accumulate-grad hook (``StaleWatches``: the first of each optimizer's, up to
``MAX_WATCHES``, for a loop that zeroes one optimizer's gradients and not another's): at
each accumulation after an optimizer step it notes whether the ``.grad`` is the very tensor
the step used with one version more per accumulation since, added to without being zeroed;
the next optimizer step judges the gradients it receives by the last of those notes. A
backward between steps that the script zeroes before the next step (a gradient-norm logging
pass, a saliency map) is not the next step's. Anything else (a new tensor, a zeroing in
place, a clip or an unscale in between, DDP's copy from its buckets) reads as zeroed: the
check can miss a loop, never accuse one.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .tool_faults import guarded


class GradMark:
    """Which gradients a point of the step saw: the first gradient tensor of some parameters
    (a weak reference: a freed tensor's id can come back) and that tensor's version."""

    def __init__(self, grad: torch.Tensor) -> None:
        self.ref = weakref.ref(grad)
        self.version = grad._version

    @classmethod
    def of(cls, params: list[torch.Tensor]) -> GradMark | None:
        grad = next((p.grad for p in params if p.grad is not None), None)
        return None if grad is None else cls(grad)

    def changed_by_more_than(self, later: GradMark, versions: int) -> bool:
        """Whether ``later`` saw another tensor, or this one changed by more than
        ``versions`` in-place operations since."""
        return self.ref() is not later.ref() or later.version - self.version > versions


class StaleGradients:
    """Whether this step's optimizer step received gradients never zeroed since the last one
    (module docstring); watches ``param``, the first parameter the model trains."""

    def __init__(self, param: torch.Tensor) -> None:
        self._param = param
        self._handle: Any = param.register_post_accumulate_grad_hook(self._accumulated)
        self._stepped: GradMark | None = None  # .grad as the last optimizer step left it
        self._since = 0  # accumulations into param's .grad since that step
        self._onto = False  # the last of them added onto that step's gradients, unzeroed
        self._steps_it: dict[int, bool] = {}  # optimizer id -> whether it steps param
        self.stale = False  # this step's gradients were added onto the last step's

    @classmethod
    def watching(cls, param: torch.Tensor) -> StaleGradients | None:
        """A watch on ``param``, or None where torch takes no such hook on it (a tensor
        subclass or a wrapper's parameter that is not a leaf): then nothing is checked."""
        try:
            return cls(param)
        except RuntimeError:
            return None

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        key = id(optimizer)
        if key not in self._steps_it:
            groups = optimizer.param_groups
            self._steps_it[key] = any(p is self._param for g in groups for p in g["params"])
        if self._steps_it[key]:
            # The gradients this step received, judged by the last accumulation since the
            # step before; then the watch starts again from what this step left.
            self.stale |= self._onto
            self._stepped, self._since, self._onto = GradMark.of([self._param]), 0, False

    @guarded("the gradient-zeroing watch")
    def _accumulated(self, param: torch.Tensor) -> None:
        if self._stepped is None:
            return
        self._since += 1
        now = GradMark.of([param])
        # One version on from the step's per accumulation since: backward's own additions,
        # and no zeroing between them.
        self._onto = now is not None and not self._stepped.changed_by_more_than(now, self._since)

    def watches(self, param: torch.Tensor) -> bool:
        return param is self._param

    def take(self) -> bool:
        """Whether this step's gradients were stale; clears it for the next step."""
        stale, self.stale = self.stale, False
        return stale

    def release(self) -> None:
        self._handle.remove()


#: The most parameters watched: one per optimizer that steps the model (a GAN's two, Muon's
#: matrices beside AdamW's embeddings), each a hook on one parameter.
MAX_WATCHES = 8


class StaleWatches:
    """One ``StaleGradients`` for each optimizer that steps the model's parameters, on its
    first: a loop may zero one optimizer's gradients and not another's (``zero_grad`` on
    AdamW's optimizer only, Muon's matrices left to accumulate), which a watch on one
    parameter sees only when that parameter is the one left."""

    def __init__(self, model_params: set[int]) -> None:
        self._model_params = model_params
        self._watches: list[StaleGradients] = []
        self._covered: set[int] = set()  # ids of optimizers one of the watches sees

    def watch(self, param: torch.Tensor) -> None:
        """Watch ``param`` (the model's first trained parameter, when the run opens)."""
        found = StaleGradients.watching(param)
        if found is not None:
            self._watches.append(found)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for w in self._watches:
            w.after_optimizer_step(optimizer)
        key = id(optimizer)
        if key in self._covered or len(self._watches) >= MAX_WATCHES:
            return
        self._covered.add(key)
        held = [p for g in optimizer.param_groups for p in g["params"]]
        if any(w.watches(p) for w in self._watches for p in held):
            return
        first = next((p for p in held if id(p) in self._model_params and p.requires_grad), None)
        found = None if first is None else StaleGradients.watching(first)
        if found is not None:  # from this step on: what it left is the next step's start
            found.after_optimizer_step(optimizer)
            self._watches.append(found)

    def take(self) -> bool:
        """Whether this step's gradients were stale for any watched optimizer."""
        return any([w.take() for w in self._watches])  # every watch cleared

    def release(self) -> None:
        for w in self._watches:
            w.release()
        self._watches = []
