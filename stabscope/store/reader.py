"""Reading runs back: ``load_run`` returns a pandas DataFrame of only what was asked for.

Which parts are read is decided in one place, ``stabscope.store.parts``: dot-files (parts
still being written) are left out, and parts that cannot be opened (a truncated file from a
crash on a filesystem without atomic rename) or whose schema is not the run table's are
skipped with a warning. No torch import here: reports and the CI gate run on machines
without a GPU stack.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ..errors import MetaError, NotARunError, StabscopeWarning
from .meta import read_meta
from .parts import PathLike, part_files, readable_parts
from .ranks import merged, ratio_inputs
from .schema import RUN_MODULE, SCHEMA

StepSelection = int | range | slice | Iterable[int] | None


def metric_names(dataset: ds.Dataset) -> list[str]:
    """Distinct metric names of a run (reads the dictionary-encoded metric column only)."""
    column = dataset.to_table(columns=["metric"]).column("metric")
    return [str(v) for v in pc.unique(column.cast(pa.string())).to_pylist()]


def _expand(
    patterns: str | Iterable[str] | None, names: Iterable[str] | Callable[[], Iterable[str]]
) -> list[str] | None:
    """Expand glob patterns against the names known to the run (looked up only if needed)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not any(ch in p for p in patterns for ch in "*?["):
        return patterns
    known = list(names() if callable(names) else names)
    out: list[str] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            out.extend(n for n in known if fnmatch.fnmatchcase(n, pat))
        else:
            out.append(pat)
    return list(dict.fromkeys(out))


def _step_filter(steps: StepSelection) -> ds.Expression | None:
    if steps is None:
        return None
    field = ds.field("step")
    if isinstance(steps, int):
        return field == steps
    if isinstance(steps, slice):
        expr = None
        if steps.start is not None:
            expr = field >= steps.start
        if steps.stop is not None:
            stop = field < steps.stop
            expr = stop if expr is None else expr & stop
        if steps.step not in (None, 1):
            raise ValueError("a step slice cannot have a stride; pass a range instead")
        return expr
    if isinstance(steps, range) and steps.step == 1:
        return (field >= steps.start) & (field < steps.stop)
    return field.isin(pa.array(sorted({int(s) for s in steps}), pa.int32()))


def meta_if_any(run_dir: PathLike) -> dict[str, Any]:
    """The run's meta, or {} for parts without a meta.json (nothing is known about them);
    a damaged meta.json is an error (``MetaError``), not "nothing known"."""
    try:
        return read_meta(run_dir)
    except NotARunError as err:
        if isinstance(err, MetaError):
            raise
        return {}


def known_names(run_dir: PathLike) -> list[str]:
    """Module and parameter names a run's meta lists (used to expand glob filters)."""
    meta = meta_if_any(run_dir)
    if not meta:
        return []
    names = [m["name"] for m in meta.get("modules", [])]
    names += [p["name"] for p in meta.get("parameters", [])]
    return [*names, RUN_MODULE]


def load_table(
    run_dir: PathLike,
    modules: str | Iterable[str] | None = None,
    metrics: str | Iterable[str] | None = None,
    steps: StepSelection = None,
    phase: str | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Like :func:`load_run`, but returns the pyarrow Table (no pandas conversion)."""
    files = part_files(run_dir)
    if not files:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    dataset = ds.dataset([str(f) for f in files], schema=SCHEMA, format="parquet")
    filters = []
    module_list = _expand(modules, lambda: known_names(run_dir))
    if module_list is None and modules is not None:
        module_list = []
    if module_list is not None:
        filters.append(ds.field("module").isin(pa.array(module_list, pa.string())))
    if metrics is not None:
        metric_list = _expand(metrics, lambda: metric_names(dataset))
        filters.append(ds.field("metric").isin(pa.array(metric_list, pa.string())))
    if phase is not None:
        filters.append(ds.field("phase") == phase)
    step_expr = _step_filter(steps)
    if step_expr is not None:
        filters.append(step_expr)
    expr = None
    for f in filters:
        expr = f if expr is None else expr & f
    return dataset.to_table(columns=columns, filter=expr)


def load_run(
    run_dir: PathLike,
    modules: str | Iterable[str] | None = None,
    metrics: str | Iterable[str] | None = None,
    steps: StepSelection = None,
    phase: str | None = None,
    columns: list[str] | None = None,
    merge_ranks: bool = False,
) -> pd.DataFrame:
    """Load a run's long table as a DataFrame, reading only the rows that were asked for.

    ``modules`` and ``metrics`` take names or glob patterns (``"blocks.*.attn"``); ``steps``
    takes an int, a ``range``, a ``slice`` or any iterable of ints; ``phase`` is ``"train"`` or
    ``"eval"``. String columns come back as pandas categoricals. A multi-rank run has one row
    per rank; ``merge_ranks=True`` merges them (``stabscope.store.ranks``) and drops ``rank``.
    """
    if merge_ranks:
        meta = meta_if_any(run_dir)  # is the run sharded?
        wanted = [metrics] if isinstance(metrics, str) else None if metrics is None else [*metrics]
        extra = ratio_inputs(wanted, meta)
        load = None if wanted is None else [*wanted, *extra]
        return merged(load_run(run_dir, modules, load, steps, phase, columns), meta, extra)
    table = load_table(run_dir, modules, metrics, steps, phase, columns)
    # Dictionaries may differ between parts; unify so pandas gets one categorical per column.
    table = table.unify_dictionaries()
    return table.to_pandas().reset_index(drop=True)


def count_rows(run_dir: PathLike) -> int:
    """Number of rows in the readable parts, from footers only."""
    return readable_parts(run_dir).rows


__all__ = [
    "NotARunError",
    "StabscopeWarning",
    "count_rows",
    "load_run",
    "load_table",
    "part_files",
]
