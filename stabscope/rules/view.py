"""The rules' access to one run: everything they read, collected in one pass.

Rules declare what they read (``Request``, on each ``Rule``); ``run_rules`` plans those
requests, and the first question asked of the view reads all of them in one pass over the
parts (``rules.scan``), keeping compact columns of just the rows asked for. Each
``metrics(...)`` call then builds a fresh DataFrame from them, exactly as
``load_run(..., phase="train", merge_ranks=True)`` would return it (same rows, order and
types; module and metric as plain strings). A request that was not planned still works: it
costs one more pass. Memory is what the rules asked for, never the table: a rule that looks
only at the first or last step asks for that step (``step="first"``).

While the run trains, the view can also hold rows that no part holds yet (``memory``, a
``store.memory.Unwritten``): they are read after the parts, and the parts written after
them are left out (they hold the same rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..store import Parts, RunMeta, load_meta, readable_parts
from ..store.memory import Unwritten
from ..store.ranks import merged, ratio_inputs
from ..store.structure import Structure
from .scan import Read, Rows, Scan

#: A request's ``modules`` that stands for the run's weight matrices (``RunView.matrices``).
MATRICES = "matrices"


@dataclass(frozen=True)
class Request:
    """What a rule reads: training rows of ``metrics``, at every step, or only at the first
    step they have or the last one with a finite value (``rules.scan.Read``), of every module
    or only of the weight matrices (``"matrices"``), with ranks merged or (``per_rank``) one
    row per rank."""

    metrics: tuple[str, ...]
    step: str | None = None
    modules: str | None = None
    per_rank: bool = False

    def __post_init__(self) -> None:
        if self.modules not in (None, MATRICES):
            raise ValueError(f"modules must be None or {MATRICES!r}, not {self.modules!r}")
        Read("", self.step)  # checks the step scope


@dataclass
class RunView:
    """One run as the rules read it (see the module docstring)."""

    run_dir: Path
    meta: RunMeta
    until: int | None = None  # only steps before this one (a verdict from the first steps)
    memory: Unwritten | None = None  # rows no part holds yet (module docstring)
    _planned: list[Read] = field(default_factory=list, repr=False)
    _scan: Scan | None = field(default=None, repr=False)
    _parts: Parts | None = field(default=None, repr=False)
    _tables: list[pa.Table] | None = field(default=None, repr=False)

    @classmethod
    def open(
        cls, run_dir: str | Path, until: int | None = None, memory: Unwritten | None = None
    ) -> RunView:
        return cls(Path(run_dir), load_meta(run_dir), until, memory)

    def plan(self, requests: Iterable[Request]) -> None:
        """Read these requests in the first pass over the parts (a run of one rank reads no
        ``per_rank`` request: the rules that need several ranks return before asking)."""
        for req in requests:
            if req.per_rank and self.meta.world_size <= 1:
                continue
            modules = self.matrices if req.modules == MATRICES else req.modules
            self._planned += self._reads(req.metrics, req.step, modules, not req.per_rank)[0]

    @property
    def parts(self) -> Parts:
        """The readable parts (skipped ones warned about once), less those ``memory`` hides."""
        if self._parts is None:
            memory = self.memory
            if memory is None:
                self._parts = readable_parts(self.run_dir)
            elif memory.with_parts:
                self._parts = _without(readable_parts(self.run_dir), memory)
            else:
                self._parts = Parts()
        return self._parts

    @property
    def tables(self) -> list[pa.Table]:
        """The rows of ``memory`` (none without it), built once."""
        if self._tables is None:
            self._tables = [] if self.memory is None else [self.memory.table()]
        return self._tables

    @property
    def scan(self) -> Scan:
        """What was read so far; the first use reads every planned request."""
        if self._scan is None:
            # A run of several training phases is judged on its last: a fine-tune after a
            # pretraining in one script starts its loss afresh, on other data.
            self._scan = Scan(until=self.until, since=self.meta.phase_start)
            self._read(self._planned)
        return self._scan

    def _read(self, reads: list[Read]) -> None:
        assert self._scan is not None
        self._scan.run(self.parts.files, reads, self.parts.rows, self.tables)

    def has(self, *names: str) -> bool:
        """Whether any of the metrics has a training row (before ``until``)."""
        return any(n in self.scan.present for n in names)

    @property
    def ranks(self) -> int:
        """Number of ranks with training rows."""
        return len(self.scan.ranks)

    def metrics(
        self, *names: str, step: str | None = None, modules: Iterable[str] | None = None
    ) -> pd.DataFrame:
        """Training-phase rows of the named metrics (string columns as plain str), one row per
        number: the ranks of a multi-rank run merged as ``stabscope.store.ranks`` says. Only
        the ``first`` or ``last`` step of those rows with ``step``, only ``modules``' rows
        with ``modules``."""
        return self._frame(names, step, modules, merge=True)

    def per_rank(
        self, *names: str, step: str | None = None, modules: Iterable[str] | None = None
    ) -> pd.DataFrame:
        """Like :meth:`metrics`, with one row per rank (column ``rank``)."""
        return self._frame(names, step, modules, merge=False)

    @property
    def matrices(self) -> set[str]:
        """Parameters with two or more dimensions (weights, not biases or norm gains)."""
        return self.meta.matrices

    @property
    def structure(self) -> Structure | None:
        """What structure discovery found, or None when the run has no structure."""
        data = self.meta.structure
        return Structure.from_dict(data) if isinstance(data, dict) else None

    @property
    def block_names(self) -> list[str]:
        """The residual blocks' names in forward order ([] when none were found)."""
        structure = self.structure
        return [b.name for b in structure.blocks] if structure else []

    def _reads(
        self, names: Iterable[str], step: str | None, modules: Iterable[str] | None, merge: bool
    ) -> tuple[list[Read], list[str]]:
        """The reads behind a request, and the metrics among them only a merge needs."""
        names = list(dict.fromkeys(names))
        extra = ratio_inputs(names, self.meta) if merge else []
        chosen = None if modules is None else frozenset(modules)
        return [Read(m, step, chosen) for m in [*names, *extra]], extra

    def _frame(
        self,
        names: Sequence[str],
        step: str | None,
        modules: Iterable[str] | None,
        merge: bool,
    ) -> pd.DataFrame:
        if not names:
            raise ValueError("name at least one metric")
        reads, extra = self._reads(names, step, modules, merge)
        scan = self.scan
        missing = [r for r in reads if r not in scan.rows]
        if missing:  # not planned: one more pass
            self._read(missing)
        rows = _in_run_order(scan, reads)
        if step is not None and len(rows["step"]):
            at = rows["step"].min() if step == "first" else rows["step"].max()
            rows = {k: v[rows["step"] == at] for k, v in rows.items()}
        frame = _table(scan, rows)
        if merge:
            frame = merged(frame, self.meta, extra)
        for col in ("module", "metric"):
            frame[col] = _as_str(frame[col])
        return frame


def _without(parts: Parts, memory: Unwritten) -> Parts:
    """``parts`` less the files that ``memory`` hides. Their rows still count: ``rows`` only
    sizes the row positions of a pass (``Scan.run``), and an upper bound does that."""
    files = [f for f in parts.files if not memory.hides(f)]
    return Parts(files, parts.rows, parts.skipped)


def _in_run_order(scan: Scan, reads: list[Read]) -> dict[str, np.ndarray]:
    """The reads' rows as one set of columns, in the order they have in the run."""
    kept = [scan.rows[r] for r in reads]
    # (a metric with rows is in the run's names; one without has no rows to label)
    ids = [scan.metrics.ids.get(r.metric, 0) for r in reads]
    rows = {"metric": np.concatenate([np.full(len(k), i, np.int32) for i, k in zip(ids, kept)])}
    rows |= {name: _joined(kept, name) for name in ("step", "rank", "module", "call", "index")}
    rows["value"] = _joined(kept, "value")
    if len(kept) > 1:  # one read is in run order already; several are interleaved in the run
        order = np.argsort(_joined(kept, "seq"), kind="stable")
        rows = {name: column[order] for name, column in rows.items()}
    return rows


def _joined(kept: list[Rows], name: str) -> np.ndarray:
    return np.concatenate([k.column(name) for k in kept])


def _table(scan: Scan, rows: dict[str, np.ndarray]) -> pd.DataFrame:
    """``rows`` as ``load_run`` gives them: the run table's columns, string columns as
    categoricals over every part's dictionary (in ``unify_dictionaries``' order)."""

    def categorical(codes: np.ndarray, names: list[str]) -> pd.Categorical:
        return pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype="str"))

    n = len(rows["step"])
    phase = scan.phases.ids.get(scan.phase, 0)
    columns = {
        "step": rows["step"],
        "rank": rows["rank"],
        "phase": categorical(np.full(n, phase, np.int32), scan.phases.names),
        "module": categorical(rows["module"], scan.modules.names),
        "call": rows["call"],
        "metric": categorical(rows["metric"], scan.metrics.names),
        "index": rows["index"],
        "value": rows["value"],
    }
    return pd.DataFrame(columns, copy=False)


def _as_str(column: pd.Series) -> pd.Series:
    """A categorical column as pandas strings, the same as ``astype(str)`` but by one take
    over the categories (``astype`` goes through every row: 1.3 s for 2M rows)."""
    names = pa.array(column.cat.categories.to_numpy(object), pa.large_string())
    taken = pc.take(names, pa.array(column.cat.codes.to_numpy()))
    return pd.Series(pd.array(taken, dtype="str"), index=column.index, name=column.name)
