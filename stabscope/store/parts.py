"""Which part files of a run are read: the one policy that every reader follows.

A part is read when its name is ``part-*.parquet`` (a dot-file is a part still being
written), its footer opens, and its schema holds every column of ``SCHEMA`` with a type the
reader can take: the string columns plain or dictionary-encoded, the others exactly as
written (extra columns are ignored). Any other part is skipped, so a truncated file, a file
of another program, or one without the ``value`` column never turns into rows of NaN. Each
skipped part is warned about once per process, with the reason (``StabscopeWarning``).
No torch import here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NotARunError, warn
from ..errors import StabscopeWarning as StabscopeWarning  # re-exported by store
from .layout import META_FILE, PART_PREFIX, PART_SUFFIX, PARTS_DIR
from .schema import SCHEMA

PathLike = str | os.PathLike[str]


@dataclass
class Parts:
    """The readable parts of a run in write order, their rows (from the footers), and the
    parts that were skipped, each with the line that says why."""

    files: list[Path] = field(default_factory=list)
    rows: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return [note for _, note in self.skipped]


def schema_problem(schema: pa.Schema) -> str | None:
    """Why a part's schema cannot be read as the run table, or None when it can."""
    for want in SCHEMA:
        if want.name not in schema.names:
            return f"no column {want.name!r}"
        got = schema.field(want.name).type
        if pa.types.is_dictionary(want.type):
            ok = _is_string(got.value_type if pa.types.is_dictionary(got) else got)
        else:
            ok = got == want.type
        if not ok:
            return f"column {want.name!r} is {got}, expected {want.type}"
    return None


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def part_problem(path: Path) -> tuple[str | None, int]:
    """Why a part is skipped, as one line (None when it is read), and its rows (footer)."""
    try:
        footer = pq.read_metadata(path)
        schema = footer.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as err:  # truncated, or removed since it was listed
        return f"skipping unreadable part {path}: {err}", 0
    why = schema_problem(schema)
    if why is not None:
        return f"skipping part {path} with another schema: {why}", 0
    return None, footer.num_rows


def list_parts(run_dir: PathLike) -> Parts:
    """The parts of a run, sorted into readable and skipped (nothing is warned)."""
    run = Path(run_dir)
    if not (run / META_FILE).is_file() and not (run / PARTS_DIR).is_dir():
        raise NotARunError(
            f"{run} is not a stabscope run (no {META_FILE} or {PARTS_DIR}/); "
            "create one with `stabscope profile` or stabscope.Recorder"
        )
    names = sorted(
        p
        for p in (run / PARTS_DIR).glob(f"{PART_PREFIX}*{PART_SUFFIX}")
        if not p.name.startswith(".")
    )
    parts = Parts()
    for path in names:
        note, rows = part_problem(path)
        if note is None:
            parts.files.append(path)
            parts.rows += rows
        else:
            parts.skipped.append((path, note))
    return parts


_warned: set[str] = set()


def readable_parts(run_dir: PathLike) -> Parts:
    """:func:`list_parts`, warning once per process about each part it skips."""
    parts = list_parts(run_dir)
    for note in parts.notes:
        if note not in _warned:
            _warned.add(note)
            warn(note, stacklevel=2)
    return parts


def part_files(run_dir: PathLike) -> list[Path]:
    """Readable part files of a run, in write order; other parts are skipped with a warning."""
    return readable_parts(run_dir).files
