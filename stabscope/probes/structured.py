"""The structure-aware probes of a run, built once the model's structure is known.

Which probes run, by preset (``cheap`` runs none of these unless asked):

| probe | standard | full |
|---|---|---|
| residual dependency (res_*), attention (attn_*), token correlation, norm inputs,
  output logits, Adam eps ratio | on | on |
| model update (||ΔF|| on a probe batch, one extra forward per recorded step) | opt-in | on |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..record.collector import Collector
from ..record.hooks import ListenerHooks, ModuleHooks
from ..record.module_table import ROOT_NAME, clean_name, unwrap_model
from ..store.writer import Interner
from ..structure import Structure, is_norm
from .adam import AdamEpsProbe
from .attention import AttentionProbe, AttentionSampling
from .correlation import CorrelationProbe
from .logits import LogitProbe
from .model_update import ModelUpdateProbe
from .norm_inputs import NormInputProbe
from .residual import ResidualProbe


def _seq_dim(block: nn.Module) -> int:
    """0 for (T, B, D) blocks: those whose nn.MultiheadAttention is not batch_first."""
    for m in block.modules():
        if isinstance(m, nn.MultiheadAttention) and not m.batch_first:
            return 0
    return 1


class StructureProbes:
    """Owns the listener hooks of the structure-aware probes and drives them per step."""

    def __init__(
        self,
        model: nn.Module,
        structure: Structure,
        names: Interner,
        params: list[tuple[int, nn.Parameter]],
        standard: bool,
        model_update: bool,
        forward: Callable[[nn.Module], Any] | None,
        module_hooks: ModuleHooks,
        sampling: AttentionSampling | None = None,
    ) -> None:
        self.listeners = ListenerHooks()
        self.notes: list[str] = []
        root = unwrap_model(model)
        modules = {clean_name(n): m for n, m in root.named_modules()}
        codes = {name: names(name) for name in modules}
        self.probes: list[Any] = []
        self.adam: AdamEpsProbe | None = None
        if standard:
            if structure.recognised:
                residual = ResidualProbe(structure, modules, codes, self.listeners)
                if residual.skipped:
                    self.notes.append(
                        f"residual stats skipped for {len(residual.skipped)} "
                        f"branches without a norm to read the stream from"
                    )
                blocks = {b.name: modules[b.name] for b in structure.blocks}
                seq = {name: _seq_dim(m) for name, m in blocks.items()}
                self.probes += [residual, CorrelationProbe(blocks, codes, self.listeners, seq)]
                if sampling is None or (sampling.queries > 0 and sampling.batch > 0):
                    attention = {a.name: modules[a.name] for a in structure.attention}
                    self.probes.append(AttentionProbe(attention, codes, self.listeners, sampling))
            norms = structure.norms or [n for n, m in modules.items() if is_norm(m)]
            read = residual.norms_read if structure.recognised else set()
            unread = {n: modules[n] for n in norms if n in modules and n not in read}
            self.probes.append(NormInputProbe(unread, codes, self.listeners))
            self.probes.append(LogitProbe(root, codes[ROOT_NAME], self.listeners))
            self.adam = AdamEpsProbe(params)
            self.probes.append(self.adam)
        self.model_update: ModelUpdateProbe | None = None
        if model_update:
            if forward is None:
                self.notes.append(
                    "model_update needs a probe forward (Recorder(forward=...)); not recorded"
                )
            else:
                self.model_update = ModelUpdateProbe(
                    model, forward, names("__run__"), [self.listeners, module_hooks]
                )
                self.model_update.start()

    def attach(self) -> None:
        self.listeners.attach()

    def errors(self) -> list[str]:
        """Distinct errors a probe caught inside the user's forward (the forward went on), with
        how often each occurred (each probe keeps the first few); for meta.json."""
        return [
            f"{message} (x{count})"
            for probe in self.probes
            for message, count in getattr(probe, "errors", {}).items()
        ]

    def detach(self) -> None:
        self.listeners.detach()

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.adam is not None:
            self.adam.after_optimizer_step(optimizer)

    def end_step(self, collector: Collector) -> None:
        # Listeners off before the model-update forward, which must not feed the probes.
        for probe in self.probes:
            probe.end_step(collector)
        if self.model_update is not None:
            self.model_update.end_step(collector)
