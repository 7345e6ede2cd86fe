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
from ..probes.sharpness import BUDGET_NOTE, due
from ..probes.structured import StructureProbes
from .collector import Rows
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
        self._build_every_probes(self.structure_probes.context)
        if self.live is not None:
            self.live.set_blocks()
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

    def _build_every_probes(self, context: ProbeContext) -> None:
        """The probes of stage ``every`` (the flight recorder), once the blocks are known.
        Built at the end of a step they start with the next one."""
        self.every = build_probes("every", context)
        for probe in self.every.values():
            probe.step = self.step_index + (1 if self._recorded_steps else 0)

    def _every_check(self) -> None:
        for probe in self.every.values():
            probe.check(self.step_index)

    def _every_boundary(self, step: int) -> None:
        for probe in self.every.values():
            probe.boundary(step, self.every_collector)
        self._every_sync()

    def _every_peek(self, rows: Rows) -> None:
        """What the every-step probes hold in host memory, emitted into ``rows`` and not
        handed over (the online rules' snapshot, record/verdicts.py)."""
        for probe in self.every.values():
            probe.peek(rows)

    def _every_close(self) -> None:
        for probe in self.every.values():
            probe.close(self.every_collector)
        self._every_sync()

    def _every_sync(self) -> None:
        """One transfer for what the every-step probes handed over (with the pending losses),
        written as a part at once: a killed process loses at most one ring of steps."""
        for probe in self.every.values():
            if probe.note is not None and probe.note not in self.meta["notes"]:
                self.meta["notes"].append(probe.note)
        if not len(self.every_collector):
            return
        self.losses.add_to(self.every_collector)
        self.host_syncs += self.every_collector.sync(self.rows)
        self.rows.flush_to_writer()
        self.writer.flush()

    def _stop_capture(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None

    def probe_pause(self) -> tuple[Any, ...]:
        """What must not see a probe's own forward: the recorder's hooks, the structure
        probes' listeners and the every-step probes."""
        listeners = self.structure_probes.listeners if self.structure_probes else None
        pause = (self.hooks, listeners) if listeners is not None else (self.hooks,)
        return pause + tuple(self.every.values())

    def _measure_sharpness(self, step: int) -> None:
        assert self.sharpness is not None
        pause = self.probe_pause()
        plan = self.meta.get("lr_plan")
        planned = plan.get("budget") if isinstance(plan, dict) else None
        optimizers = list(self.optimizer_watch.optimizers.values())
        self.sharpness.measure(step, optimizers, self.rows, pause, planned)
        if self.sharpness.note is not None and self.sharpness.note not in self.meta["notes"]:
            self.meta["notes"].append(self.sharpness.note)
        budget = self.sharpness.budget
        if due(step):
            # meta.json: how many measurements the budget allowed and skipped, and the time.
            self.meta["stability_index"] = budget.summary()
            note = self.sharpness.budget_note
            notes = [n for n in self.meta["notes"] if not n.startswith(BUDGET_NOTE)]
            self.meta["notes"] = [*notes, note] if note else notes
