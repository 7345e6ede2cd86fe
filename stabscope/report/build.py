"""``build_report``: run directories in, one HTML file out, and what went wrong on the way.

A directory that is not a run is bad input (``UsageError``). Everything else that is wrong
with a run (corrupt or foreign parts, no rows, still being written, an unreadable
findings.json) is a warning: the report renders what it can and says what it skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ..errors import FindingsError, UsageError
from ..store.atomic import write_text_atomically
from ..store.findings import Finding, load_findings
from .aggregate import Census
from .data import Budget, RunData, census_of, collect, planned_heatmaps
from .html import page
from .runs import open_run, run_names
from .sections import Context, Section
from .sections.attention import attention_section
from .sections.findings_list import findings_section
from .sections.header import header_section
from .sections.heatmaps import heatmaps_section
from .sections.nonfinite import nonfinite_section
from .sections.propagation import propagation_section
from .sections.ranks import ranks_section
from .sections.residual import residual_section
from .sections.training import training_section
from .sections.updates import updates_section

PAGE = (
    header_section,
    findings_section,
    propagation_section,
    heatmaps_section,
    residual_section,
    attention_section,
    updates_section,
    training_section,
    ranks_section,
    nonfinite_section,
)


#: A run's findings (None: no rules have run) and, when they are not its findings.json, a
#: note on where they came from. ``stabscope report`` passes one that runs the rules when the
#: run has no current findings.json (report/ never imports rules/, cli/report.py joins them).
FindingsSource = Callable[[Path], tuple[list[Finding] | None, str | None]]


def stored_findings(path: Path) -> tuple[list[Finding] | None, str | None]:
    """The run's findings.json as it is, or None when no rules have run."""
    return load_findings(path), None


@dataclass
class ReportResult:
    path: Path
    size: int  # bytes
    runs: list[str]
    sections: list[Section]
    warnings: list[str] = field(default_factory=list)

    @property
    def plots(self) -> int:
        return sum(s.plots for s in self.sections)


def _read(run_data: list[RunData], budget: Budget, warnings: list[str]) -> None:
    """Second pass for each run; a run whose parts fail mid-read keeps what was read."""
    for i, d in enumerate(run_data):
        try:
            run_data[i] = collect(d.run, d.census, budget)
        except (pa.ArrowException, OSError) as err:
            warnings.append(
                f"{d.run.name}: reading its parts failed, some plots are missing: {err}"
            )


def read_runs(run_dirs: Sequence[str | Path]) -> tuple[list[RunData], list[str]]:
    """Everything the page draws for each run (two passes over its parts, within the page's
    budget), and the warnings met on the way. ``UsageError`` for a directory that is no run."""
    paths = [Path(p) for p in run_dirs]
    runs = [open_run(p, n) for p, n in zip(paths, run_names(paths))]
    warnings = [w for r in runs for w in r.warnings]
    data = []
    for run in runs:
        try:
            census = census_of(run)
        except (pa.ArrowException, OSError) as err:
            warnings.append(f"{run.name}: its parts could not be read: {err}")
            census = Census()
        data.append(RunData(run, census))
    budget = Budget.for_heatmaps(sum(len(planned_heatmaps(d.census)) for d in data))
    _read(data, budget, warnings)
    return data, warnings


def build_report(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    findings_of: FindingsSource = stored_findings,
) -> ReportResult:
    """Write the HTML report of ``run_dirs`` (several are compared) to ``out``; each run's
    findings come from ``findings_of``."""
    if not run_dirs:
        raise UsageError("no run directory given", hint="stabscope report RUN_DIR ... -o out.html")
    data, warnings = read_runs(run_dirs)
    runs = [d.run for d in data]

    findings: dict[str, list[Finding] | None] = {}
    sources: dict[str, str] = {}
    for run in runs:
        try:
            findings[run.name], note = findings_of(run.path)
        except FindingsError as err:
            warnings.append(str(err))
            findings[run.name], note = None, None
        if note:
            sources[run.name] = note
    ctx = Context(data, findings, sources)
    # Findings link to plots, so they are built after every plot; the propagation plot is
    # only the link target for what no heatmap shows.
    late = (propagation_section, findings_section)
    built = {f: f(ctx) for f in [*(f for f in PAGE if f not in late), *late]}
    sections = [s for f in PAGE if (s := built[f]) is not None]  # some apply to some runs only
    text = page([r.name for r in runs], sections)
    target = Path(out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(target, text)
    except OSError as err:
        raise UsageError(
            f"cannot write the report to {target}: {err.strerror or err}",
            hint="choose a writable path with -o",
        ) from None
    return ReportResult(target, len(text.encode()), [r.name for r in runs], sections, warnings)
