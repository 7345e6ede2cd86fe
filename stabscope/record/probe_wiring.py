"""Which probes a run has and when they are built (a mixin of ``Recorder``).

Every probe comes from the registry (``stabscope.probes``): those of stage ``model`` with the
recorder, the structure-aware ones (``StructureProbes``) once the model's structure is known
(from the probe forward before the first step, else from a trace of the first recorded step),
and the stability index (stage ``due``) once a probe forward is known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from ..probes import BY_NAME as PROBE_ENTRIES
from ..probes.base import BaseProbe, ProbeContext, build_probes
from ..probes.structured import StructureProbes
from .distributed import world_size as _world_size


class ProbeWiring:
    """Building the probes from the registry, and the structure they need."""

    def _build_core_probes(self, context: ProbeContext) -> None:
        """The probes of stage ``model`` (module moments, parameter statistics), and the
        stability index when a probe forward is given."""
        self._probe_context = context
        self.sharpness: Any = None  # the stability-index probe (stage ``due``), once built
        if self.forward is not None:
            self.set_probe_forward(self.forward)
        self.core: dict[str, BaseProbe] = build_probes("model", context)
        self.activations: Any = self.core["activations"]

    @property
    def wants_probe_forward(self) -> bool:
        """Whether the stability index waits for a probe forward (``set_probe_forward``). Not
        in a run of several processes: each rank's own batch, and DDP's reducer hooks on the
        double backward, would make a rank-local, hook-entangled measurement."""
        wanted = PROBE_ENTRIES["sharpness"]
        return (
            self.sharpness is None
            and wanted.load().wanted(self.config, wanted.tier)
            and (_world_size() == 1)
        )

    def set_probe_forward(self, forward: Callable[[nn.Module], Any]) -> None:
        """Measure the stability index with ``forward`` from now on, unless it has one: for
        callers that have a probe batch only once training runs (the framework callbacks,
        zero-code mode). Structure discovery and the model update keep to ``Recorder(
        forward=...)``: the update's reference is the model before its first step."""
        if self.wants_probe_forward:
            ctx = dataclasses.replace(self._probe_context, forward=forward)
            self.sharpness = build_probes("due", ctx).get("sharpness")

    def _build_structure_probes(self) -> None:
        assert self.structure is not None
        self.structure_probes = StructureProbes(
            self.model, self.structure, self._probe_context, self.hooks
        )
        self.meta["structure"] = self.structure.to_dict()
        blocks = [(b.name, self._probe_context.names(b.name)) for b in self.structure.blocks]
        self.step_norms.set_blocks(blocks)
        if self.step_norms.note is not None:
            self.meta["notes"].append(self.step_norms.note)
        # Notes added before the structure was known (by a caller) are kept after its own.
        self.meta["notes"] = [
            *self.structure.notes,
            *self.structure_probes.notes,
            *self.meta["notes"],
        ]

    def _stop_capture(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None

    def _measure_sharpness(self, step: int) -> None:
        assert self.sharpness is not None
        listeners = self.structure_probes.listeners if self.structure_probes else None
        pause = (self.hooks, listeners) if listeners is not None else (self.hooks,)
        self.sharpness.measure(
            step, list(self.optimizer_watch.optimizers.values()), self.rows, pause
        )
        if self.sharpness.note is not None and self.sharpness.note not in self.meta["notes"]:
            self.meta["notes"].append(self.sharpness.note)
