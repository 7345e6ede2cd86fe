"""Moments of every module's output and of the gradient with respect to it.

Metrics: ``act_{mean,rms,absmax,nonfinite}`` and ``grad_{mean,rms,absmax,nonfinite}``, one row
each per (module, call, phase) on a recorded step. Entries are kept in firing order, so the
first non-finite entry is the first module where a NaN/Inf appeared, in forward order for
activations and in backward order for gradients.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch

from ..record.collector import Collector, Rows
from ..record.hooks import EVAL, TRAIN
from ..store.schema import PHASES
from .base import BaseProbe, ProbeContext
from .moments import MOMENT_METRICS, MomentRows, decode_moments

#: Called with (direction, module code, call) for a step's first non-finite entry.
NonfiniteSink = Callable[[str, int, int], None]


class _Entries:
    """Moment vectors of one kind (activations or gradients) in firing order."""

    def __init__(self, prefix: str, direction: str) -> None:
        self.prefix = prefix
        self.direction = direction
        self.moments = MomentRows()  # one entry per key
        self.keys: list[tuple[int, int, int, int]] = []  # (phase, module, call, numel)

        # A tensor seen earlier in the step reuses that entry's reductions: forward, a block
        # returning its last child's output; backward, a residual add hands the very same
        # gradient tensor to both of its inputs (on the sample GPT 64 gradient hooks per step
        # see about 30 distinct tensors). id -> (weakref, version, entry index).
        self._seen: dict[int, tuple[weakref.ref, int, int]] = {}

    def _add_moments(self, t: torch.Tensor) -> None:
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t and seen[1] == t._version:
            self.moments.repeat(seen[2])
        else:
            self._seen[id(t)] = (weakref.ref(t), t._version, self.moments.add(t))

    def add(self, phase: int, module: int, call: int, t: torch.Tensor) -> None:
        self._add_moments(t)
        self.keys.append((phase, module, call, t.numel()))

    def add_shared(self, keys: list[tuple[int, int]], t: torch.Tensor) -> None:
        """One tensor that stands for several (module, call) entries (training phase)."""
        for module, call in keys:
            self._add_moments(t)
            self.keys.append((TRAIN, module, call, t.numel()))

    def hand_over(self, collector: Collector, on_nonfinite: NonfiniteSink) -> None:
        if not self.keys:
            return
        keys = np.array(self.keys, np.int64)  # (R, 4)
        moments, self.moments, self.keys = self.moments, MomentRows(), []
        self._seen.clear()

        def decode(values: np.ndarray, rows: Rows) -> None:
            metrics = decode_moments(values, keys[:, 3])
            for phase_code, phase in ((TRAIN, PHASES[0]), (EVAL, PHASES[1])):
                mask = keys[:, 0] == phase_code
                if not mask.any():
                    continue
                for suffix in MOMENT_METRICS:
                    rows.emit(
                        phase,
                        keys[mask, 1],
                        keys[mask, 2],
                        f"{self.prefix}_{suffix}",
                        metrics[suffix][mask],
                    )
                bad = np.flatnonzero(metrics["nonfinite"][mask])
                if len(bad):
                    first = np.flatnonzero(mask)[bad[0]]
                    module, call = int(keys[first, 1]), int(keys[first, 2])
                    rows.emit(phase, module, call, f"first_nonfinite_{self.direction}", 1.0)
                    if phase_code == TRAIN:
                        on_nonfinite(self.direction, module, call)

        moments.hand_over(collector, decode)


class ActivationProbe(BaseProbe):
    """Collects forward (and optionally gradient) moments during a recorded step; fed by the
    recorder's module hooks (``on_forward``, ``on_grad``)."""

    stage = "model"
    structure_aware = False
    needs_backward = True

    @classmethod
    def build(cls, ctx: ProbeContext) -> ActivationProbe:
        assert ctx.on_nonfinite is not None
        return cls(grads=ctx.config.grads, on_nonfinite=ctx.on_nonfinite)

    def __init__(self, grads: bool, on_nonfinite: NonfiniteSink) -> None:
        self.grads = grads
        self.on_nonfinite = on_nonfinite
        self.forward = _Entries("act", "forward")
        self.backward = _Entries("grad", "backward")

    def on_forward(self, phase: int, module: int, call: int, output: torch.Tensor) -> None:
        self.forward.add(phase, module, call, output)

    def on_grad(self, keys: list[tuple[int, int]], grad: torch.Tensor) -> None:
        self.backward.add_shared(keys, grad)

    def end_step(self, collector: Collector) -> None:
        self.forward.hand_over(collector, self.on_nonfinite)
        self.backward.hand_over(collector, self.on_nonfinite)
