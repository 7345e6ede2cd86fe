"""Per-step collection: statistics stay on the device until one host sync at the step's end.

Probes hand the collector device tensors together with a decoder; ``sync`` concatenates every
pending tensor per device, copies it to the host once, and lets each decoder turn its slice
into rows. Rows are kept as interned integer codes, ready for the Parquet writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..store.writer import PartWriter

Decoder = Callable[[np.ndarray, "Rows"], None]


@dataclass
class Rows:
    """Rows of one or more steps, as column chunks of interned codes."""

    writer: PartWriter
    step: int = 0
    _cols: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    #: Sees the chunks handed to the writer (the live bridge, record/live.py); must not raise.
    tap: Callable[[list[tuple[np.ndarray, ...]]], None] | None = None

    def emit(
        self,
        phase: str,
        module: np.ndarray | int,
        call: np.ndarray | int,
        metric: str,
        value: np.ndarray | float,
        index: np.ndarray | int = -1,
        step: int | None = None,
    ) -> None:
        """Append rows; ``module`` holds module codes (from ``writer.modules``)."""
        value = np.atleast_1d(np.asarray(value, np.float32))
        n = len(value)

        def full(x: np.ndarray | int, dtype: type) -> np.ndarray:
            # Called six times per emit, tens of emits per step: np.broadcast_to costs ~2 µs
            # a call, an array that already fits nothing, a filled one ~0.25 µs.
            if isinstance(x, np.ndarray) and x.shape == (n,):
                return x.astype(dtype, copy=False)
            column = np.empty(n, dtype)
            column[...] = x
            return column

        self._cols.append(
            (
                full(self.step if step is None else step, np.int32),
                full(self.writer.phases(phase), np.int32),
                full(module, np.int32),
                full(call, np.int16),
                full(self.writer.metrics(metric), np.int32),
                full(index, np.int16),
                value,
            )
        )

    @property
    def chunks(self) -> tuple[tuple[np.ndarray, ...], ...]:
        """The rows emitted and not yet handed to the writer (``store.memory.Chunk``s)."""
        return tuple(self._cols)

    def flush_to_writer(self) -> int:
        """Hand the rows to the writer; returns how many rows were written."""
        n = 0
        chunks, self._cols = self._cols, []
        for i, cols in enumerate(chunks):
            try:
                self.writer.append(*cols)  # buffers the chunk, then maybe writes a part
            except BaseException:
                # The chunk is in the writer's buffer even when its part failed: keep only the
                # rest, so that a retry (close() after a full disk) writes no row twice.
                self._cols = chunks[i + 1 :]
                if self.tap is not None:
                    self.tap(chunks[: i + 1])
                raise
            n += len(cols[-1])
        if self.tap is not None and chunks:
            self.tap(chunks)
        return n


class Collector:
    """Pending device tensors of the current step and what to do with their values."""

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, Decoder]] = []

    def add(self, values: torch.Tensor, decode: Decoder) -> None:
        """Queue ``values`` (any shape, stays on device); ``decode`` gets them as float64 numpy."""
        self._pending.append((values, decode))

    def __len__(self) -> int:
        return len(self._pending)

    def sync(self, rows: Rows) -> int:
        """Copy all pending values to the host with one transfer per device, then decode.

        Returns the number of device->host transfers made (one per device, 0 when empty).
        """
        if not self._pending:
            return 0
        by_device: dict[torch.device, list[int]] = {}
        for i, (t, _) in enumerate(self._pending):
            by_device.setdefault(t.device, []).append(i)
        host: list[np.ndarray | None] = [None] * len(self._pending)
        for indices in by_device.values():
            flats = [self._pending[i][0].detach().reshape(-1).to(torch.float64) for i in indices]
            joined = torch.cat(flats).cpu().numpy()  # the one device->host sync
            offset = 0
            for i, flat in zip(indices, flats):
                host[i] = joined[offset : offset + flat.numel()]
                offset += flat.numel()
        pending, self._pending = self._pending, []
        for (_, decode), values in zip(pending, host):
            decode(values, rows)  # type: ignore[arg-type]
        return len(by_device)

    def clear(self) -> None:
        self._pending.clear()


class ModuleScalars:
    """One 0-d device tensor per module and step, handed over as a single stacked tensor.

    The shape most probes share: collect ``(module code, value)`` during the step, then emit
    one row per module under ``metric`` at the step's sync.
    """

    def __init__(
        self, metric: str, transform: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        self.metric = metric
        self.transform = transform
        self._values: list[tuple[int, torch.Tensor]] = []
        self._seen: set[int] = set()

    def add(self, code: int, value: torch.Tensor) -> None:
        self._values.append((code, value))

    def first_time(self, code: int) -> bool:
        """True once per module and step: later calls of the same module are not measured."""
        if code in self._seen:
            return False
        self._seen.add(code)
        return True

    def hand_over(self, collector: Collector) -> None:
        self._seen.clear()
        if not self._values:
            return
        codes = np.array([c for c, _ in self._values])
        stacked = torch.stack([v for _, v in self._values])
        self._values = []
        metric, transform = self.metric, self.transform

        def decode(values: np.ndarray, rows: Rows) -> None:
            rows.emit("train", codes, 0, metric, transform(values) if transform else values)

        collector.add(stacked, decode)
