"""The planned learning-rate curve of a run, for rules that look ahead.

Before the first optimizer step the schedulers are stepped forward to the planned last step
on their own, reading every param group's lr after each step, and then put back exactly:
each scheduler's ``state_dict()`` and every param group's entries other than ``params``
(OneCycleLR and CyclicLR also move ``momentum``/``betas``) are saved first and restored
after, so training goes on as if nothing happened. What lands in meta.json (``lr_plan``) and
how it is read is in ``store/lr_plan.py``.

A plan assumes what the recorder's ``lr`` rows assume: each scheduler is stepped once per
training step, after ``optimizer.step()``. A scheduler driven by a metric
(``ReduceLROnPlateau``), one that is not a torch ``LRScheduler``, or one that raises while
stepped cannot be planned: the plan says ``unknown`` and why, and training is not disturbed.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from ..store.lr_plan import METRIC_DRIVEN, plan_entry, unknown_plan

_NO_BUDGET = (
    "the planned number of training steps is not known "
    "(Recorder(budget=N), or stabscope profile --budget N)"
)

#: torch warns when a scheduler steps before its optimizer ever did: the simulation does.
_ORDER_WARNING = r".*lr_scheduler\.step\(\)"


class CannotPlan(Exception):
    """The lr of the coming steps cannot be known; the message says why."""


class Unplannable:
    """Stands, among the schedulers, for one whose steps are not the training's steps (a
    framework's per-epoch scheduler): the plan is ``unknown``, and ``why`` says why."""

    def __init__(self, why: str) -> None:
        self.why = why


def as_list(schedulers: Any) -> list[Any]:
    """``None``, one scheduler or an iterable of them, as a list."""
    if schedulers is None:
        return []
    return list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers]


def _unwrap(scheduler: Any) -> Any:
    """The torch scheduler inside a wrapper (accelerate's ``AcceleratedScheduler``)."""
    inner = getattr(scheduler, "scheduler", None)
    return inner if isinstance(inner, LRScheduler) else scheduler


def _children(scheduler: Any) -> list[Any]:
    """Schedulers a ``SequentialLR`` or ``ChainedScheduler`` steps itself."""
    return list(getattr(scheduler, "_schedulers", None) or [])


def top_level(schedulers: Iterable[Any]) -> list[Any]:
    """``schedulers`` without those another of them steps (a SequentialLR's parts), once each."""
    found = [_unwrap(s) for s in schedulers]
    nested: set[int] = set()
    stack = [c for s in found for c in _children(s)]
    while stack:
        child = stack.pop()
        nested.add(id(child))
        stack.extend(_children(child))
    out: list[Any] = []
    for s in found:
        if id(s) not in nested and all(s is not t for t in out):
            out.append(s)
    return out


def live_schedulers() -> list[LRScheduler]:
    """Every torch ``LRScheduler`` alive in the process, top-level ones only (one scan of
    the garbage collector's objects: no hook sees a scheduler being built, and a
    ``SequentialLR`` does not even call ``LRScheduler.__init__``)."""
    return top_level([obj for obj in gc.get_objects() if _is_scheduler(obj)])


def _is_scheduler(obj: object) -> bool:
    # The object's own type: a weakref.proxy to a scheduler passes isinstance (it forwards
    # __class__) and would count it twice; a dead one raises on any attribute read.
    return issubclass(type(obj), (LRScheduler, ReduceLROnPlateau))


def _groups(optimizers: Iterable[Any]) -> list[dict[str, Any]]:
    """The param groups of ``optimizers``, each once (a wrapper shares its inner groups)."""
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for opt in optimizers:
        for group in opt.param_groups:
            if id(group) not in seen:
                seen.add(id(group))
                out.append(group)
    return out


def _copy_data(value: Any) -> Any:
    """A copy of plain data (numbers, strings, containers, tensors); any other object is
    kept by reference (a scheduler's state may point at a model, which must stay itself)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_data(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_copy_data(v) for v in value)
    return value


class _Snapshot:
    """The state the simulation changes: schedulers' state dicts and param groups' entries."""

    def __init__(self, schedulers: list[LRScheduler], groups: list[dict[str, Any]]) -> None:
        self.schedulers = [(s, _copy_data(s.state_dict())) for s in schedulers]
        self.groups = [
            (g, {k: v for k, v in g.items() if k != "params"}) for g in groups
        ]  # the objects themselves, so each entry gets its identity back
        self.copies = [_copy_data(entries) for _, entries in self.groups]

    def restore(self) -> None:
        for scheduler, state in self.schedulers:
            scheduler.load_state_dict(state)
        for (group, entries), copies in zip(self.groups, self.copies):
            for key in [k for k in group if k != "params" and k not in entries]:
                del group[key]  # added while stepping
            for key, original in entries.items():
                _put_back(original, copies[key])
                group[key] = original


def _put_back(original: Any, copy: Any) -> None:
    """Give a mutable entry its saved contents again (schedulers fill tensor lrs in place)."""
    if isinstance(original, torch.Tensor):
        with torch.no_grad():
            original.copy_(copy)
    elif isinstance(original, list):
        original[:] = copy
    elif isinstance(original, dict):
        original.clear()
        original.update(copy)


def _max_lr(groups: list[dict[str, Any]]) -> float | torch.Tensor:
    """The max lr over ``groups`` now. A tensor lr (on its device: reading it would sync
    every step) gives a new tensor, since schedulers fill tensor lrs in place."""
    values = [g["lr"] for g in groups]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return max(float(v) for v in values)
    device = tensors[0].device
    return torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]
    ).max()


def _floats(values: list[float | torch.Tensor]) -> list[float]:
    """``values`` as floats, with one transfer for all the tensors among them."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    host = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).cpu().tolist())
    return [next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]


def _check_plannable(schedulers: list[Any]) -> None:
    stack = list(schedulers)
    while stack:
        s = stack.pop()
        if isinstance(s, Unplannable):
            raise CannotPlan(s.why)
        if isinstance(s, ReduceLROnPlateau):
            raise CannotPlan(f"ReduceLROnPlateau {METRIC_DRIVEN}, not on a plan")
        if not isinstance(s, LRScheduler):
            raise CannotPlan(f"{type(s).__name__} is not a torch LRScheduler")
        stack.extend(_children(s))


def simulate(
    groups: list[dict[str, Any]], schedulers: list[LRScheduler], steps: int
) -> list[float]:
    """The max lr over ``groups`` at each of the next ``steps`` steps: now, then after each
    of ``steps - 1`` scheduler steps; the schedulers and groups are put back after."""
    snapshot = _Snapshot(schedulers, groups)
    lrs: list[float | torch.Tensor] = [_max_lr(groups)]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ORDER_WARNING, category=UserWarning)
            for _ in range(steps - 1):
                for scheduler in schedulers:
                    scheduler.step()
                lrs.append(_max_lr(groups))
    finally:
        snapshot.restore()
    return _floats(lrs)


def plan_lrs(
    optimizers: Iterable[Optimizer] | None,
    schedulers: Any,
    budget: int | None,
    start_step: int = 0,
) -> dict[str, Any] | None:
    """meta.json's ``lr_plan`` for steps ``start_step .. budget-1`` (see store/lr_plan.py).

    ``optimizers`` are those whose param groups count (the recorder's own); when empty,
    those the ``schedulers`` hold. Schedulers of other optimizers are left alone. None
    when there is no optimizer to read an lr from yet. Never raises: a scheduler that
    cannot be planned gives a plan whose source is ``unknown``, with a note."""
    try:
        return _plan(optimizers, schedulers, budget, start_step)
    except Exception as err:  # never let planning break training
        why = str(err) if isinstance(err, CannotPlan) else f"{type(err).__name__}: {err}"
        return unknown_plan(budget, start_step, f"cannot plan the lr: {why}")


def _plan(
    optimizers: Iterable[Optimizer] | None, schedulers: Any, budget: int | None, start_step: int
) -> dict[str, Any] | None:
    scheds = top_level(as_list(schedulers))
    opts = list(optimizers or []) or [s.optimizer for s in scheds if hasattr(s, "optimizer")]
    groups = _groups(opts)
    if not groups:
        return None
    mine = {id(g) for g in groups}
    scheds = [
        s
        for s in scheds
        if not hasattr(s, "optimizer") or {id(g) for g in s.optimizer.param_groups} & mine
    ]
    if budget is None:
        return unknown_plan(None, start_step, _NO_BUDGET)
    if budget <= start_step:
        return unknown_plan(budget, start_step, f"no planned step: budget {budget} <= {start_step}")
    _check_plannable(scheds)
    lrs = simulate(groups, scheds, budget - start_step)
    return plan_entry("scheduler" if scheds else "constant", budget, start_step, lrs)


def _trains(optimizer: Any, param_ids: set[int]) -> bool:
    return any(id(p) in param_ids for g in optimizer.param_groups for p in g["params"])


class LrPlanner:
    """What a Recorder needs to plan: the schedulers and the budget.

    ``plan`` is called at ``start()``, and again at each optimizer step of the model until
    it returns a plan (there is no optimizer to read before the first one is seen, when no
    scheduler names it), and once more when an optimizer the plan did not cover steps."""

    def __init__(self, schedulers: Any, budget: int | None) -> None:
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise TypeError(f"budget must be an int (planned training steps), got {budget!r}")
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be positive (planned training steps), got {budget}")
        self.schedulers = as_list(schedulers)
        self.budget = budget

    def planned_optimizers(self, param_ids: set[int]) -> list[Optimizer]:
        """The schedulers' optimizers that train one of ``param_ids``."""
        held = [getattr(_unwrap(s), "optimizer", None) for s in self.schedulers]
        return [o for o in held if o is not None and _trains(o, param_ids)]

    def plan(
        self, optimizers: Iterable[Optimizer], start_step: int, param_ids: set[int]
    ) -> dict[str, Any] | None:
        """The plan from ``start_step``, for ``optimizers`` or, when none is known yet, for
        the schedulers' optimizers that train one of ``param_ids``; None to try later."""
        opts = list(optimizers) or self.planned_optimizers(param_ids)
        if not opts:
            return None
        return plan_lrs(opts, self.schedulers, self.budget, start_step)


__all__ = [
    "CannotPlan",
    "LrPlanner",
    "Unplannable",
    "live_schedulers",
    "plan_lrs",
    "simulate",
    "top_level",
]
