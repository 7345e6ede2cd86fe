"""A run as TensorBoard event files, from the run store alone: the curated series
(``series.py``) as scalars, the findings as one text (markdown, worst first, with remedies),
and the report's layer x step heatmaps as images. ``tensorboard`` is an optional extra,
imported here only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..store import load_meta
from ..store.findings import Finding
from .images import heatmap_pngs
from .series import MAX_SERIES, Selection, select

INSTALL_HINT = "pip install 'stabscope[tensorboard]' (or pip install tensorboard)"
EVENTS = "events.out.tfevents."


@dataclass
class Exported:
    out: Path
    selection: Selection
    findings: int
    images: int
    steps: int  # distinct steps written


def require_tensorboard() -> None:
    """``UsageError`` with the install hint when the optional extra is missing."""
    _writer_api()


def _writer_api() -> tuple[Any, Any, Any]:
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise UsageError("tensorboard is not installed", hint=INSTALL_HINT) from None
    return EventFileWriter, event_pb2, summary_pb2


def findings_markdown(findings: list[Finding], source: str) -> str:
    """The findings as TensorBoard shows text: markdown, worst first, one item each."""
    if not findings:
        return f"The rules found nothing ({source})."
    lines = [f"**{len(findings)} findings**, worst first ({source}):", ""]
    lines += ["1. " + finding_markdown(f).replace("\n", "\n   ") for f in findings]
    return "\n".join(lines)


def finding_markdown(f: Finding) -> str:
    """One finding: severity, rule, where, message, and its remedy on a second line."""
    where = ", ".join(x for x in (f.module or "", "" if f.step is None else f"step {f.step}") if x)
    text = f"**{f.severity}** `{f.rule}`{f' ({where})' if where else ''}: {f.message}"
    return text + (f"\n*remedy:* {f.remedy}" if f.remedy else "")


def export_tensorboard(
    run_dir: Path,
    out: Path,
    findings: tuple[list[Finding], str],
    max_series: int = MAX_SERIES,
    images: bool = True,
    heatmaps: Callable[[Path], list[tuple[str, bytes, int, int]]] = heatmap_pngs,
) -> Exported:
    """Write ``run_dir``'s curated series, ``findings`` (with where they came from) and,
    with ``images``, its heatmaps as PNGs into one event file under ``out``."""
    EventFileWriter, event_pb2, summary_pb2 = _writer_api()
    from tensorboard.plugins.text.summary_v2 import text_pb

    selection = select(str(run_dir), load_meta(run_dir), max_series)
    by_step: dict[int, list[Any]] = {}
    for series in selection.series:
        for step, value in zip(series.steps.tolist(), series.values.tolist()):
            by_step.setdefault(step, []).append(
                summary_pb2.Summary.Value(tag=series.tag, simple_value=value)
            )
    last = max(by_step, default=0)
    out.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(out))
    wall = time.time()

    def write(step: int, values: list[Any]) -> None:
        summary = summary_pb2.Summary(value=values)
        writer.add_event(event_pb2.Event(wall_time=wall, step=step, summary=summary))

    try:
        for step in sorted(by_step):
            write(step, by_step[step])
        found, source = findings
        texts = [text_pb("stabscope/findings", findings_markdown(found, source))]
        texts.append(text_pb("stabscope/export", f"exported by stabscope: {selection.note}"))
        for text in texts:
            write(last, list(text.value))
        pictures = heatmaps(run_dir) if images else []
        for tag, png, height, width in pictures:
            image = summary_pb2.Summary.Image(
                height=height, width=width, colorspace=3, encoded_image_string=png
            )
            write(last, [summary_pb2.Summary.Value(tag=f"heatmaps/{tag}", image=image)])
    finally:
        writer.close()
    return Exported(out, selection, len(findings[0]), len(pictures), len(by_step))


def event_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(f"{EVENTS}*") if p.is_file()) if out.is_dir() else []


__all__ = [
    "INSTALL_HINT",
    "Exported",
    "event_files",
    "export_tensorboard",
    "finding_markdown",
    "findings_markdown",
    "require_tensorboard",
]
