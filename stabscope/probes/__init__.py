"""The probes of a recorded run, and the registry that says which exist.

One line per probe: its name (the ``probe`` of its metrics in ``stabscope.metrics``), the
cheapest preset that runs it (its tier: cheap < standard < full), and where its class lives.
The class says the rest (``base.Probe``): when it is built (with the recorder, once the
model's structure is known, or for its own steps), what it needs (a probe batch, the
optimizer, gradients), whether a config switch overrides its tier, and how it is built from
what the recorder knows (``base.ProbeContext``). The recorder and ``structured.py`` build
every probe from this list, in this order (which is the order of their rows in a step).

Adding a probe: one file with a ``base.BaseProbe`` subclass, and one line here.

Classes are imported when first built, so reading this list imports no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProbeEntry:
    name: str
    tier: str  # the cheapest preset that runs it
    path: str  # "module:Class" inside stabscope.probes

    def load(self) -> Any:
        """The probe's class (a ``base.BaseProbe`` subclass)."""
        module, _, cls = self.path.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


PROBES: tuple[ProbeEntry, ...] = (
    ProbeEntry("activations", "cheap", "activations:ActivationProbe"),
    ProbeEntry("parameters", "cheap", "parameters:ParameterProbe"),
    ProbeEntry("sharpness", "standard", "sharpness:SharpnessProbe"),
    ProbeEntry("residual", "standard", "residual:ResidualProbe"),
    ProbeEntry("correlation", "standard", "correlation:CorrelationProbe"),
    ProbeEntry("attention", "standard", "attention:AttentionProbe"),
    ProbeEntry("norm_inputs", "standard", "norm_inputs:NormInputProbe"),
    ProbeEntry("logits", "standard", "logits:LogitProbe"),
    ProbeEntry("adam", "standard", "adam:AdamEpsProbe"),
    ProbeEntry("model_update", "full", "model_update:ModelUpdateProbe"),
    ProbeEntry("block_input", "standard", "block_input:BlockInputProbe"),
    ProbeEntry("flight", "cheap", "flight:FlightRecorder"),
)

BY_NAME: dict[str, ProbeEntry] = {p.name: p for p in PROBES}

__all__ = ["BY_NAME", "PROBES", "ProbeEntry"]
