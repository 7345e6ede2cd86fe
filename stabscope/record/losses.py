"""The loss of every step, kept on the device until a host sync writes it.

A recorded step syncs its losses with the step's other statistics; between recorded steps they
wait, and past ``MAX_PENDING`` they are synced on their own (one transfer for all of them).
Other every-step values (``step_norms.py``: gradient norms, block update norms) wait with them,
each with the decoder that turns it into rows. A non-finite loss already in host memory (a
float, a CPU tensor) is written at once, so that the online rules judge that very step.

For the online rules (``record/verdicts.py``), without a sync and without consuming anything:
``history`` keeps every loss synced so far (4 + 4 bytes a loss), ``on_host`` gives the
pending losses already in host memory (a float, a CPU tensor: no transfer), and ``peek``
emits their rows.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from ..errors import OptionError
from ..store.memory import Chunk
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


def run_chunk(steps: np.ndarray, values: np.ndarray, phase: int, module: int, metric: int) -> Chunk:
    """Rows of the run (``module``: its code) as a chunk, the constant columns as zero-stride
    views (O(1)): the losses, their bars, the probe batch's losses."""
    n = len(values)

    def const(code: int, dtype: type) -> np.ndarray:
        return np.broadcast_to(np.array(code, dtype), (n,))

    call, index = const(0, np.int16), const(-1, np.int16)
    ints = (const(phase, np.int32), const(module, np.int32))
    return (steps, *ints, call, const(metric, np.int32), index, values)


class LossHistory:
    """Every loss synced so far, in arrays that grow by doubling: ``view()`` is O(1), and a
    view stays valid for a reader on another thread (later losses go past its end, or into
    new arrays)."""

    def __init__(self) -> None:
        self.steps = np.zeros(256, np.int32)
        self.values = np.zeros(256, np.float32)
        self.n = 0

    def extend(self, steps: np.ndarray, values: np.ndarray) -> None:
        end = self.n + len(steps)
        if end > len(self.steps):
            size = max(end, 2 * len(self.steps))
            self.steps = np.concatenate([self.steps[: self.n], np.zeros(size - self.n, np.int32)])
            self.values = np.concatenate(
                [self.values[: self.n], np.zeros(size - self.n, np.float32)]
            )
        self.steps[self.n : end] = steps
        self.values[self.n : end] = values
        self.n = end

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the losses so far (views, not copies)."""
        return self.steps[: self.n], self.values[: self.n]


class PendingLosses:
    """``loss`` rows (module ``__run__``) of the steps not yet synced."""

    def __init__(self, run_code: int) -> None:
        self.run_code = run_code
        self.last: float | None = None  # the last loss synced
        self.history = LossHistory()
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, 0-d tensor)
        # The constant prediction's loss of each step (``loss_constant``), beside the losses
        # for the loss checks: those synced, and those pending in host memory (step, value).
        self.bars = LossHistory()
        self._bars_on_host: deque[tuple[int, float]] = deque()  # in step order
        self._values: list[tuple[int, torch.Tensor, StepDecoder]] = []  # other values
        self._on_host = 0  # pending losses in host memory

    def add_values(self, step: int, values: torch.Tensor, decode: StepDecoder) -> None:
        """Keep ``values`` (any shape, on its device) of ``step`` until the next sync."""
        self._values.append((step, values, decode))

    def add_bar(self, step: int, read: torch.Tensor, decode: StepDecoder) -> None:
        """The step's ``constant_read`` (``loss_constant`` first), kept as other values are;
        in host memory already (a CPU tensor), the loss checks see its bar at once."""
        self._values.append((step, read, decode))
        if read.device.type == "cpu":
            bar = float(read.reshape(-1)[0])
            if math.isfinite(bar):
                self._bars_on_host.append((step, bar))

    def synced_bar(self, step: int, bar: float) -> None:
        """A step's ``loss_constant`` as the sync decoded it (finite)."""
        self.bars.extend(np.array([step], np.int32), np.array([bar], np.float32))
        while self._bars_on_host and self._bars_on_host[0][0] <= step:
            self._bars_on_host.popleft()  # synced now: in the history

    def add(self, step: int, loss: torch.Tensor | float) -> None:
        value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if value.numel() != 1:
            raise OptionError(
                f"rec.step(loss=...) takes the step's loss, one number; got a tensor of shape "
                f"{tuple(value.shape)}",
                hint="pass the scalar the step's backward started from (e.g. loss.mean())",
            )
        self._pending.append((step, value.reshape(())))
        self._on_host += value.device.type == "cpu"

    @property
    def latest(self) -> float | None:
        """The newest loss readable without a device sync: the last pending one when it is
        in host memory, else the last synced (None before any)."""
        if self._pending and self._pending[-1][1].device.type == "cpu":
            return float(self._pending[-1][1])
        return self.last

    @property
    def visible(self) -> int:
        """How many losses a reader on the host can see without a sync: those synced and
        those pending in host memory (it grows with each one that becomes visible)."""
        return self.history.n + self._on_host

    def on_host(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the pending losses in host memory, not consumed."""
        host = [(s, v) for s, v in self._pending if v.device.type == "cpu"]
        if not host:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        values = torch.stack([v for _, v in host]).to(torch.float32).numpy()
        return np.array([s for s, _ in host], np.int32), values

    def chunks(self, phase: int, metric: int) -> tuple[Chunk, Chunk]:
        """Every loss in host memory (synced, and pending on the host) as two chunks of
        rows (``store.memory.Chunk``) under the codes of phase ``train`` and metric
        ``loss``; O(1) but for the pending ones (their columns are views)."""
        synced, pending = self.history.view(), self.on_host()
        return run_chunk(*synced, phase, self.run_code, metric), run_chunk(
            *pending, phase, self.run_code, metric
        )

    @property
    def has_bars_on_host(self) -> bool:
        return bool(self._bars_on_host)

    def bars_on_host(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the pending ``loss_constant`` in host memory (a copy)."""
        host = list(self._bars_on_host)
        steps = np.array([s for s, _ in host], np.int32)
        return steps, np.array([b for _, b in host], np.float32)

    def bar_chunks(self, phase: int, metric: int) -> tuple[Chunk, Chunk]:
        """``chunks`` of the steps' ``loss_constant`` (metric code ``metric``)."""
        return run_chunk(*self.bars.view(), phase, self.run_code, metric), run_chunk(
            *self.bars_on_host(), phase, self.run_code, metric
        )

    def peek(self, rows: Rows) -> None:
        """Emit into ``rows`` the rows the next sync will write of the pending losses in host
        memory, and their ``loss_constant`` there; nothing is consumed. (Not the other values:
        no rule that acts online reads them, and decoding them costs ~40 µs a step's worth;
        they wait for the sync.)"""
        steps, values = self.on_host()
        if len(steps):
            rows.emit("train", self.run_code, 0, "loss", values, step=steps)
        if self._bars_on_host:  # their bars, which loss-divergence reads the losses against
            at, bars = self.bars_on_host()
            rows.emit("train", self.run_code, 0, "loss_constant", bars, step=at)

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
        self._pending, self._on_host = [], 0
        run = self.run_code

        def decode(v: np.ndarray, rows: Rows) -> None:
            rows.emit("train", run, 0, "loss", v, step=steps)
            if len(v):
                self.last = float(v[-1])
                self.history.extend(steps, v)

        collector.add(values, decode)

    def sync(self, rows: Rows) -> int:
        """Write every pending loss now; the host transfers it took."""
        collector = Collector()
        self.add_to(collector)
        syncs = collector.sync(rows)
        rows.flush_to_writer()
        return syncs
