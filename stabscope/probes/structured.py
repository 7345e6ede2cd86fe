"""The structure-aware probes of a run, built once the model's structure is known.

Which ones: every probe of stage ``structure`` in the registry (``stabscope.probes``) that the
config runs. With the ``standard`` and ``full`` presets (and ``structure_probes`` on): residual
dependency (res_*), token correlation, attention (attn_*), norm inputs, output logits, Adam's
eps ratio; the model update (||ΔF|| on a probe batch, one extra forward per recorded step) with
``full`` or ``model_update=True``. They share one set of listener hooks, attached on recorded
steps only.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..record.collector import Collector
from ..record.hooks import ListenerHooks, ModuleHooks
from ..record.module_table import modules_by_name
from ..structure import Structure
from .base import BaseProbe, ProbeContext, build_probes


class StructureProbes:
    """Owns the listener hooks of the structure-aware probes and drives them per step."""

    def __init__(
        self,
        model: nn.Module,
        structure: Structure,
        context: ProbeContext,
        module_hooks: ModuleHooks,
    ) -> None:
        self.listeners = ListenerHooks()
        modules = modules_by_name(model)
        ctx = dataclasses.replace(
            context,
            structure=structure,
            modules=modules,
            codes={name: context.names(name) for name in modules},
            listeners=self.listeners,
            module_hooks=module_hooks,
            notes=[],
            shared={},
        )
        self.probes: list[BaseProbe] = list(build_probes("structure", ctx).values())
        self.notes = ctx.notes
        self.context = ctx  # what the probes of stage "every" are built from too

    def attach(self) -> None:
        self.listeners.attach()

    def errors(self) -> list[str]:
        """Distinct errors a probe caught inside the user's forward (the forward went on), with
        how often each occurred (each probe keeps the first few); for meta.json."""
        return [
            f"{message} (x{count})"
            for probe in self.probes
            for message, count in probe.errors.items()
        ]

    def detach(self) -> None:
        self.listeners.detach()

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for probe in self.probes:
            probe.after_optimizer_step(optimizer)

    def end_step(self, collector: Collector) -> None:
        # The model update's own forward pauses every listener: no probe sees it.
        for probe in self.probes:
            probe.end_step(collector)
