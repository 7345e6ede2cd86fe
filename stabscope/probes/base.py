"""The probe interface: what the recorder calls on a probe, and what a probe is built from.

A probe turns what it sees during a recorded step into device tensors handed to the step's
``Collector`` with a decoder that writes its rows (one host sync per step for all probes).
The recorder calls, on every probe it built, in registry order:

- ``start()`` once, after every probe of its stage is built (before the first optimizer step
  when the structure is known up front: the model update keeps F(x, θ_0) there);
- ``begin_step(collector)`` when a recorded step is armed;
- ``before_optimizer_step(optimizer)`` / ``after_optimizer_step(optimizer)`` around each
  ``step()`` of an optimizer that owns the model's parameters, on recorded steps;
- ``end_step(collector)`` at the end of a recorded step, where it hands over its tensors;
- ``release()`` when the run closes.

What a probe reads in the forward pass it reads through hooks registered when it is built:
the module hooks feed the activation probe, the structure-aware probes add listeners to
``ProbeContext.listeners`` (attached on recorded steps only). ``stage`` says when a probe is
built: ``model`` with the recorder, ``structure`` once the model's structure is known,
``due`` for a probe that measures on its own steps (the stability index, ``measure``),
``every`` for a probe that watches every step, recorded or not, with its own hooks (the flight
recorder: ``check(step)`` before each optimizer step, ``boundary(step, collector)`` at each
step's end, ``peek(rows)`` for the online rules, ``close(collector)``; built with the
``structure`` probes, from their context).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..record.collector import Collector
from ..record.config import PRESETS, RecorderConfig
from ..store.writer import Interner
from . import PROBES


def reached(preset: str, tier: str) -> bool:
    """Whether ``preset`` includes what ``tier`` records (cheap < standard < full)."""
    order = list(PRESETS)
    return order.index(preset) >= order.index(tier)


def switched(value: bool | None, config: RecorderConfig, tier: str) -> bool:
    """A config switch (None: the tier decides; True/False: on/off whatever the preset)."""
    return reached(config.preset, tier) if value is None else bool(value)


@dataclass
class ProbeContext:
    """What the recorder knows when it builds probes. The ``structure`` fields are set for the
    probes of stage ``structure`` (``structured.py``); ``shared`` carries what an earlier
    probe leaves for a later one (the norms the residual probe already reads)."""

    model: nn.Module
    config: RecorderConfig
    names: Interner  # module name -> code of the run's module column
    params: list[tuple[int, nn.Parameter]]  # (module code, parameter) of the selected ones
    run_code: int  # the code of __run__, the module of run-level rows
    forward: Callable[[nn.Module], Any] | None = None  # the probe batch's forward, if given
    on_nonfinite: Callable[..., None] | None = None  # (direction, code, call[, step, extra])
    structure: Any = None  # stabscope.structure.Structure
    modules: dict[str, nn.Module] = field(default_factory=dict)  # clean name -> module
    codes: dict[str, int] = field(default_factory=dict)  # clean name -> module code
    listeners: Any = None  # record.hooks.ListenerHooks
    module_hooks: Any = None  # record.hooks.ModuleHooks
    notes: list[str] = field(default_factory=list)  # for meta.json's notes
    shared: dict[str, Any] = field(default_factory=dict)


class Probe(Protocol):
    """What the recorder calls (see the module docstring)."""

    stage: ClassVar[str]
    needs_forward: ClassVar[bool]
    needs_optimizer: ClassVar[bool]
    needs_backward: ClassVar[bool]

    def start(self) -> None: ...
    def begin_step(self, collector: Collector) -> None: ...
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def end_step(self, collector: Collector) -> None: ...
    def release(self) -> None: ...
    @property
    def errors(self) -> dict[str, int]: ...


class BaseProbe:
    """A probe with every call a no-op; a probe overrides what it uses, and ``build``."""

    stage: ClassVar[str] = "structure"
    needs_forward: ClassVar[bool] = False  # a probe batch: Recorder(forward=...)
    needs_optimizer: ClassVar[bool] = False  # reads around optimizer.step()
    needs_backward: ClassVar[bool] = False  # reads gradients
    #: A structure-aware probe of the standard preset: ``structure_probes = false`` turns it off.
    structure_aware: ClassVar[bool] = True

    @classmethod
    def wanted(cls, config: RecorderConfig, tier: str) -> bool:
        """Whether ``config`` runs this probe of ``tier``."""
        return reached(config.preset, tier) and (not cls.structure_aware or config.structure_probes)

    @classmethod
    def build(cls, ctx: ProbeContext) -> BaseProbe | None:
        """The probe for this model, or None where it has nothing to measure."""
        raise NotImplementedError

    def start(self) -> None:
        pass

    def begin_step(self, collector: Collector) -> None:
        pass

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def end_step(self, collector: Collector) -> None:
        pass

    def release(self) -> None:
        pass

    @property
    def errors(self) -> dict[str, int]:
        """Errors caught inside the user's forward (the forward went on), with their counts."""
        return {}


def build_probes(stage: str, ctx: ProbeContext) -> dict[str, BaseProbe]:
    """Every registered probe of ``stage`` that ``ctx.config`` runs and that has something to
    measure on this model, by registry name, in registry order; each one started."""
    built: dict[str, BaseProbe] = {}
    for entry in PROBES:
        cls = entry.load()
        if cls.stage == stage and cls.wanted(ctx.config, entry.tier):
            probe = cls.build(ctx)
            if probe is not None:
                built[entry.name] = probe
    for probe in built.values():
        probe.start()
    return built


__all__ = ["BaseProbe", "Probe", "ProbeContext", "build_probes", "reached", "switched"]
