"""The live bridge: the curated series of a run while it trains, forwarded to the dashboards
named by ``log_to`` (``destinations.py``), and each finding of the online rules as it fires.

The Recorder hands over every batch of rows it passes to the Parquet writer (a recorded step's
rows after its one host sync, a flight-recorder ring every ``flight_every`` steps, the losses
with them): nothing here touches the device or runs inside a step. The series are
``series.py``'s choice, within its cap (``blocks_within``):

- run-level: every run-level metric of the catalogue (loss, lr per param group, the gradient
  norm before and after clipping, ...), tag ``NAME`` (``lr/group_N`` past the first group);
- per block, ``BLOCK_SERIES`` (output rms, gradient rms, weight-gradient norm, update ratio,
  attention entropy min, logit max), tag ``NAME/BLOCK``; for each step the most preferred
  source that has it (the every-step tier's ``flight_act_rms`` over the scheduled
  ``act_rms``).

Steps go out in order: with the flight recorder on, a step waits until its ring has been
handed over (at most ``flight_every`` steps), since W&B drops steps older than one it has.
A destination that raises is warned about once (``StabscopeWarning``), noted in meta.json and
dropped; recording goes on. Training phase, first call, this rank only (no rank merge live).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Protocol

import numpy as np

from ..errors import warn
from ..store import RUN_MODULE
from ..store.findings import Finding
from ..store.writer import PartWriter
from .series import BLOCK_SERIES, MAX_SERIES, RUN_METRICS, blocks_within

#: Room kept for run-level series next to RUN_METRICS: extra param groups' lr.
EXTRA_RUN_SERIES = 4

Chunk = tuple[np.ndarray, ...]  # step, phase, module, call, metric, index, value (codes)


class Destination(Protocol):
    """Where live series go: a dashboard writer (``destinations.py``) or a trainer's loggers."""

    name: str

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def finding(self, step: int, finding: Finding, markdown: str) -> None: ...

    def close(self) -> None: ...


class LiveSeries:
    """Turns the rows handed to the writer into the curated series (module docstring)."""

    def __init__(
        self,
        destinations: Sequence[Destination],
        writer: PartWriter,
        max_series: int = MAX_SERIES,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.destinations = list(destinations)
        self.writer = writer
        self.max_series = max_series
        self._note = note or (lambda text: None)
        self.tags: set[str] = set()  # every tag sent so far: never more than max_series
        self.dropped: set[str] = set()  # tags refused by the cap
        self.blocks: list[str] = []  # the blocks whose series are sent
        self._owner: dict[str, int | None] = {}  # module name -> position in self.blocks
        self._blocks_at: dict[str, int] = {}
        self._flight_from: int | None = None  # first step the flight ring covers; None: off
        self._flight_seen = -1  # last step a ring has been handed over for
        self._pending: dict[int, dict[str, tuple[int, float]]] = {}  # step -> tag -> (rank, v)
        self._sent = -1  # last step sent

    # -- configuration -----------------------------------------------------------------------
    def set_blocks(self, blocks: list[str], flight_from: int | None) -> None:
        """The model's blocks once known; ``flight_from``: the first step of the every-step
        tier (None when it is off): later steps wait for their ring."""
        reserved = len(RUN_METRICS) + EXTRA_RUN_SERIES
        self.blocks = blocks_within(blocks, reserved, len(BLOCK_SERIES), self.max_series)
        self._blocks_at = {b: i for i, b in enumerate(self.blocks)}
        self._owner = {}
        self._flight_from = flight_from if self.blocks else None
        left = len(blocks) - len(self.blocks)
        if left:
            self._note(
                f"live series: {len(self.blocks)} of {len(blocks)} blocks within the cap of "
                f"{self.max_series} series"
            )

    def _block_of(self, module: str) -> int | None:
        """Position of the block ``module`` is (or is inside), None outside every block."""
        if module not in self._owner:
            name, position = module, None
            while name:
                if name in self._blocks_at:
                    position = self._blocks_at[name]
                    break
                name = name.rpartition(".")[0]
            self._owner[module] = position
        return self._owner[module]

    # -- rows --------------------------------------------------------------------------------
    def rows(self, chunks: Iterable[Chunk]) -> None:
        """The rows of one hand-over to the writer (a step's, or a ring's)."""
        chunks = [c for c in chunks if len(c[-1])]
        if not chunks or not self.destinations:
            return
        step, phase, module, call, metric, index, value = (np.concatenate(c) for c in zip(*chunks))
        train = self.writer.phases.codes.get("train")
        keep = (phase == train) & (call == 0)
        step, module, metric, index, value = (x[keep] for x in (step, module, metric, index, value))
        names = self.writer.metrics.names
        modules = self.writer.modules.names
        metric_names = np.array(names, dtype=object)[metric] if len(metric) else metric
        run = module == self.writer.modules.codes.get(RUN_MODULE, -1)
        for name in RUN_METRICS:
            mask = run & (metric_names == name)
            for s, i, v in zip(step[mask], index[mask], value[mask]):
                self._put(int(s), name if i <= 0 else f"{name}/group_{int(i)}", 0, float(v))
        if self.blocks:
            flight = np.char.startswith(metric_names.astype(str), "flight_") & ~run
            if flight.any():
                self._flight_seen = max(self._flight_seen, int(step[flight].max()))
            codes, inverse = np.unique(module, return_inverse=True)
            owned = [self._block_of(modules[c]) for c in codes.tolist()]
            owner = np.array([-1 if p is None else p for p in owned], np.int64)[inverse]
            is_block = np.array([modules[c] in self._blocks_at for c in codes.tolist()], bool)
            self._per_block(step, is_block[inverse], metric_names, value, owner)
        self._release(final=False)

    def _per_block(
        self,
        step: np.ndarray,
        own: np.ndarray,
        metric: np.ndarray,
        value: np.ndarray,
        owner: np.ndarray,
    ) -> None:
        """Per block and step: each spec's sources, ranked by preference (module docstring).
        ``own``: the row is a block's own; ``owner``: the block's position, -1 for none."""
        inside = owner >= 0
        for spec in BLOCK_SERIES:
            for rank, (source, how) in enumerate(spec.sources):
                if how == "ratio":
                    upd = _grouped(step, owner, value, inside & (metric == "update_norm"), "rss")
                    par = _grouped(step, owner, value, inside & (metric == "param_norm"), "rss")
                    found = {k: upd[k] / par[k] for k in upd.keys() & par.keys() if par[k] > 0}
                else:
                    mask = (own if how == "own" else inside) & (metric == source)
                    found = _grouped(step, owner, value, mask, "first" if how == "own" else how)
                for (s, b), v in found.items():
                    self._put(s, f"{spec.name}/{self.blocks[b]}", rank, v)

    def _put(self, step: int, tag: str, rank: int, value: float) -> None:
        if step <= self._sent:
            return  # a lower-ranked source of a step already sent
        slot = self._pending.setdefault(step, {})
        old = slot.get(tag)
        if old is None or rank <= old[0]:
            slot[tag] = (rank, value)

    def _release(self, final: bool) -> None:
        """Send the steps that can go, in order (module docstring)."""
        ready = sorted(
            s
            for s in self._pending
            if final or self._flight_from is None or s < self._flight_from or s <= self._flight_seen
        )
        for s in ready:
            values = {}
            for tag, (_, v) in self._pending.pop(s).items():
                if tag not in self.tags and len(self.tags) >= self.max_series:
                    self.dropped.add(tag)
                    continue
                self.tags.add(tag)
                values[tag] = v
            self._sent = max(self._sent, s)
            if values:
                self._each(partial(_send_scalars, step=s, values=values))

    # -- findings and the end ----------------------------------------------------------------
    def finding(self, step: int, finding: Finding) -> None:
        from .tensorboard import finding_markdown

        text = finding_markdown(finding)
        self._each(lambda d: d.finding(step, finding, text))

    def close(self) -> None:
        """Send what waits, then close every destination."""
        self._release(final=True)
        if self.dropped:
            self._note(f"live series: {len(self.dropped)} series left out for the cap")
        self._each(lambda d: d.close())
        self.destinations = []

    def _each(self, call: Callable[[Any], None]) -> None:
        for d in list(self.destinations):
            try:
                call(d)
            except Exception as err:  # a dashboard never stops training: warn once, drop it
                self.destinations.remove(d)
                message = (
                    f"live logging to {d.name} stopped: {type(err).__name__}: {err}; "
                    "the run keeps recording"
                )
                self._note(message)
                warn(message, stacklevel=2)
                with contextlib.suppress(Exception):
                    d.close()


def _grouped(
    step: np.ndarray, owner: np.ndarray, value: np.ndarray, mask: np.ndarray, how: str
) -> dict[tuple[int, int], float]:
    """(step, block position) -> the ``how`` (first, min, max, rss) of ``value`` over ``mask``."""
    out: dict[tuple[int, int], float] = {}
    if not mask.any():
        return out
    keys = list(zip(step[mask].tolist(), owner[mask].tolist()))
    for key, v in zip(keys, value[mask].astype(np.float64).tolist()):
        # NaN is skipped unless nothing else is there, as pandas' groupby reductions do.
        old = out.get(key)
        if old is None or (math.isnan(old) and not math.isnan(v)):
            out[key] = v * v if how == "rss" else v
        elif math.isnan(v):
            continue
        elif how == "rss":
            out[key] = old + v * v
        elif how == "min":
            out[key] = min(old, v)
        elif how == "max":
            out[key] = max(old, v)
    if how == "rss":
        out = {k: math.sqrt(v) for k, v in out.items()}
    return out


def _send_scalars(destination: Any, step: int, values: dict[str, float]) -> None:
    destination.scalars(step, values)
