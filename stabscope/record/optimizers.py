"""The optimizers that train the recorded model, and the lr each param group used per step.

Optimizer steps are seen through torch's global optimizer step hooks, so no optimizer needs to
be passed in; an optimizer is owned when it holds one of the model's parameters: those it had
when recording began, or those it has when the optimizer first steps (a head put in place of
another for a fine-tune, with a new optimizer over it: its lr is recorded, and the head that
left is no longer read, ``model_changes.py``). Owned
optimizers are held weakly: a script that builds a new optimizer every step (or once, to
change its settings) frees the old one and its state, and the old one stops counting.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .collector import Rows
from .lr_plan import LrPlanner
from .optimizer_settings import describe, host_value
from .weak_optimizers import WeakOptimizers


class OptimizerWatch:
    """The owned optimizers, the lr of their groups at their last ``step()`` in the current
    step, and the planned lr curve once an optimizer is known."""

    def __init__(
        self,
        param_ids: set[int],
        planner: LrPlanner | None,
        live_ids: Callable[[], set[int]] | None = None,
    ) -> None:
        self.param_ids = param_ids
        self.planner = planner
        # The model's parameters now, read for an optimizer over none of those it began with.
        self.live_ids = live_ids
        # Optimizers found over none of them, weakly (a freed one's id may come back).
        self._outside: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._owned = WeakOptimizers()
        self._step_lrs: dict[int, list[float | None]] = {}
        self._planned_for: set[int] | None = None  # the optimizers the plan covers, once made
        self.settings: list[dict[str, Any]] = []  # meta.json's ``optimizers``, in owned order

    @property
    def optimizers(self) -> dict[int, torch.optim.Optimizer]:
        """The owned optimizers still alive, by id, in the order they were first seen."""
        live = self._owned.alive()
        for key in self._step_lrs.keys() - live.keys():
            del self._step_lrs[key]
        return live

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        if optimizer not in self._owned:
            if optimizer in self._outside:
                return False
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not ids & self.param_ids and not (self.live_ids and ids & self.live_ids()):
                self._outside.add(optimizer)  # read once: its step is not the model's
                return False
            replaced = len(self.optimizers) < len(self.settings)  # one of them was freed
            self._owned.add(optimizer)
            settings = describe(optimizer)
            # A replacement (a new optimizer each step, or one rebuilt with a new lr) takes
            # the place of the last entry of its class: meta.json's list says which
            # optimizers train the model, and stays as long as the script's own list.
            same = [i for i, s in enumerate(self.settings) if s["class"] == settings["class"]]
            if replaced and same:
                self.settings[same[-1]] = settings
            else:
                self.settings.append(settings)
        return True

    def holding(self) -> tuple[int, tuple[int, ...]]:
        """(how many parameters the owned optimizers' groups hold, the optimizers' ids): what
        changes when a group is added or an optimizer rebuilt; cheap enough for every step
        (one ``len`` per group)."""
        owned = self.optimizers
        count = sum(len(g["params"]) for o in owned.values() for g in o.param_groups)
        return count, tuple(owned)

    def held(self) -> set[int]:
        """The ids of the parameters the owned optimizers hold, over all their groups."""
        return {
            id(p) for o in self.optimizers.values() for g in o.param_groups for p in g["params"]
        }

    def note_lrs(self, optimizer: torch.optim.Optimizer, unless_noted: bool = False) -> None:
        """Called just before ``optimizer.step()``: the lr each of its groups uses
        (``unless_noted``: only if this step's are not noted yet)."""
        if not (unless_noted and id(optimizer) in self._step_lrs):
            self._step_lrs[id(optimizer)] = [_group_lr(g) for g in optimizer.param_groups]

    def record_lr(self, rows: Rows, run_code: int, step: int) -> None:
        """The lr each param group's ``optimizer.step()`` used in this step, as read just
        before it (a scheduler stepped after the optimizer has already moved the groups' lr
        on to the next step's). Index: the group's position over all owned optimizers."""
        seen = 0
        for key, opt in self.optimizers.items():
            for i, lr in enumerate(self._step_lrs.get(key, ())):
                if lr is not None:
                    rows.emit("train", run_code, 0, "lr", lr, index=seen + i, step=step)
            seen += len(opt.param_groups)
        self._step_lrs.clear()

    def plan(self, step: int) -> dict[str, Any] | None:
        """The planned lr curve (meta.json's ``lr_plan``) from ``step`` on: None before an
        optimizer is known, and while the plan made covers every owned optimizer. A second
        optimizer seen stepping after the plan was made (Adam for some parameters, SGD for
        the others, stepped one after the other) is planned with the first from its step on:
        the plan is the max lr over all of them, as the ``lr`` rows and the index read it."""
        if self.planner is None:
            return None
        if self._planned_for is not None and set(self.optimizers) <= self._planned_for:
            return None
        known = list(self.optimizers.values())
        plan = self.planner.plan(known, step, self.param_ids)
        if plan is not None:
            # Before any step the plan comes from the schedulers' optimizers (none known yet).
            held = known or self.planner.planned_optimizers(self.param_ids)
            self._planned_for = {id(o) for o in held}
        return plan


def _group_lr(group: dict[str, Any]) -> float | None:
    """A param group's lr as a float; None for a device tensor (reading it would sync) or
    anything that is not a number (this runs inside the user's ``optimizer.step()``)."""
    lr = host_value(group.get("lr"))
    try:
        return float(lr)
    except (TypeError, ValueError):
        return None
