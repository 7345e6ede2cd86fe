"""The Recorder's live bridge (``Recorder(log_to=...)``, ``[tool.stabscope] log_to``): opens
the destinations, taps the rows on their way to the Parquet writer (``Rows.tap``) and passes
on the online rules' findings. The series and the cap are ``export/live.py``'s."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import warn
from ..export.destinations import Target, open_targets, target_items
from ..export.live import Chunk, LiveSeries
from ..store import update_meta
from ..store.findings import Finding


class LiveBridge:
    """One run's live series; every call is safe: a failure of its own warns once and turns it
    off, and the run keeps recording."""

    def __init__(self, rec: Any, targets: Sequence[Any], max_series: int) -> None:
        self.rec = rec
        names = [t for t in targets if isinstance(t, (str, Target))]
        objects = [t for t in targets if not isinstance(t, (str, Target))]  # a trainer's loggers
        opened, failed = open_targets(names, rec.run_dir.name) if names else ([], [])
        for message in failed:
            self._note(message)
            warn(message, stacklevel=3)
        destinations = [*opened, *objects]
        self.series: LiveSeries | None = LiveSeries(
            destinations, rec.writer, max_series, note=self._note
        )
        # The rows of the step the structure is learned from (no probe forward given): they
        # reach the writer just before the blocks are known, and wait for them here.
        self._early: list[Chunk] = []
        rec.rows.tap = self.rows

    def _note(self, text: str) -> None:
        update_meta(self.rec.meta, [text])

    def _guard(self, what: str, call: Any) -> None:
        if self.series is None:
            return
        try:
            call(self.series)
        except Exception as err:  # never stop training for a dashboard
            self.series = None
            message = f"live logging stopped ({what}): {type(err).__name__}: {err}"
            self._note(message)
            warn(message, stacklevel=3)

    def rows(self, chunks: list[Chunk]) -> None:
        if self.rec.structure is None and self.rec._capture is not None:
            self._early += chunks  # one recorded step's rows, sent by set_blocks
            return
        self._guard("rows", lambda s: s.rows(chunks))

    def set_blocks(self) -> None:
        """Once the structure is known: its blocks, and the step the flight ring starts at."""
        structure = self.rec.structure
        blocks = [b.name for b in structure.blocks] if structure is not None else []
        starts = [p.step for p in self.rec.every.values()]
        self._guard("blocks", lambda s: s.set_blocks(blocks, min(starts) if starts else None))
        early, self._early = self._early, []
        if early:
            self.rows(early)

    def finding(self, step: int, finding: Finding) -> None:
        self._guard("finding", lambda s: s.finding(step, finding))

    def close(self) -> None:
        early, self._early = self._early, []  # a run closed before its structure was learned
        self._guard("rows", lambda s: s.rows(early))
        self._guard("close", lambda s: s.close())
        self.series = None


def live_targets(config_targets: Sequence[str], log_to: Any) -> list[Any]:
    """The keyword's targets (a string, a comma list, destinations), else the config's."""
    return list(config_targets) if log_to is None else target_items(log_to)
