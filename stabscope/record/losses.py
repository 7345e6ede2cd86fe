"""The loss of every step, kept on the device until a host sync writes it.

A recorded step syncs its losses with the step's other statistics; between recorded steps they
wait, and past ``MAX_PENDING`` they are synced on their own (one transfer for all of them).
Other every-step values (``step_norms.py``: gradient norms, block update norms) wait with them,
each with the decoder that turns it into rows. A non-finite loss already in host memory (a
float, a CPU tensor) is written at once, so that the online rules judge that very step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .collector import Collector, Rows

#: Turns one step's values (float64, as the collector decodes them) into rows of that step.
StepDecoder = Callable[[np.ndarray, Rows, int], None]

#: Losses of unrecorded steps wait on the device; past this many they are synced anyway.
MAX_PENDING = 1024


def nonfinite_on_host(loss: torch.Tensor | float) -> bool:
    """Whether ``loss`` is a NaN/Inf that can be read without a device sync (a float or a CPU
    tensor); False for a loss on an accelerator, whose value waits for the next sync."""
    if isinstance(loss, torch.Tensor):
        return loss.device.type == "cpu" and not bool(torch.isfinite(loss.detach()).all())
    return not math.isfinite(float(loss))


class PendingLosses:
    """``loss`` rows (module ``__run__``) of the steps not yet synced."""

    def __init__(self, run_code: int) -> None:
        self.run_code = run_code
        self.last: float | None = None  # the last loss synced
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, 0-d tensor)
        self._values: list[tuple[int, torch.Tensor, StepDecoder]] = []  # other values

    def add_values(self, step: int, values: torch.Tensor, decode: StepDecoder) -> None:
        """Keep ``values`` (any shape, on its device) of ``step`` until the next sync."""
        self._values.append((step, values, decode))

    def add(self, step: int, loss: torch.Tensor | float) -> None:
        value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._pending.append((step, value.reshape(())))

    @property
    def full(self) -> bool:
        return max(len(self._pending), len(self._values)) >= MAX_PENDING

    def add_to(self, collector: Collector) -> None:
        """Hand every pending loss to ``collector`` (one stacked tensor), and the other
        values (the collector joins them per device: one transfer for all)."""
        for step, values, decode_values in self._values:
            collector.add(values, lambda v, rows, s=step, d=decode_values: d(v, rows, s))
        self._values = []
        if not self._pending:
            return
        steps = np.array([s for s, _ in self._pending], np.int32)
        values = torch.stack([v.to(self._pending[0][1].device) for _, v in self._pending])
        self._pending = []
        run = self.run_code

        def decode(v: np.ndarray, rows: Rows) -> None:
            for s, x in zip(steps, v):
                rows.emit("train", run, 0, "loss", x, step=int(s))
            if len(v):
                self.last = float(v[-1])

        collector.add(values, decode)

    def sync(self, rows: Rows) -> int:
        """Write every pending loss now; the host transfers it took."""
        collector = Collector()
        self.add_to(collector)
        syncs = collector.sync(rows)
        rows.flush_to_writer()
        return syncs
