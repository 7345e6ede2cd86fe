"""A run as a W&B offline run, from the run store alone (no torch): the curated series
(``series.py``) against their steps, each finding a W&B alert with its remedy and all of them
as markdown in the run summary (``stabscope/findings``). ``wandb sync`` uploads it later.
``wandb`` is an optional extra, imported here only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..store import load_meta
from ..store.findings import Finding
from .destinations import _wandb
from .series import MAX_SERIES, Selection, select
from .tensorboard import finding_markdown, findings_markdown


@dataclass
class ExportedRun:
    path: Path  # the offline run's directory, for `wandb sync`
    selection: Selection
    findings: int
    steps: int


def require_wandb() -> None:
    """``UsageError`` with the install hint when the optional extra is missing."""
    _wandb()


def export_wandb(
    run_dir: Path,
    out: Path,
    findings: tuple[list[Finding], str],
    project: str = "stabscope",
    max_series: int = MAX_SERIES,
) -> ExportedRun:
    """Write ``run_dir``'s curated series and ``findings`` as a new offline run under
    ``out/wandb``."""
    wandb = _wandb()
    selection = select(str(run_dir), load_meta(run_dir), max_series)
    by_step: dict[int, dict[str, float]] = {}
    for series in selection.series:
        for step, value in zip(series.steps.tolist(), series.values.tolist()):
            by_step.setdefault(step, {})[series.tag] = value
    out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        name=Path(run_dir).resolve().name,
        dir=str(out),
        mode="offline",
        config={"stabscope_run": str(Path(run_dir).resolve()), "export": selection.note},
    )
    try:
        for step in sorted(by_step):
            run.log(by_step[step], step=step)
        found, source = findings
        run.summary["stabscope/findings"] = findings_markdown(found, source)
        for f in found:
            level = wandb.AlertLevel.ERROR if f.severity == "error" else wandb.AlertLevel.WARN
            run.alert(title=f"stabscope: {f.rule}", text=finding_markdown(f), level=level)
        path = Path(run.dir).parent
    finally:
        run.finish()
    return ExportedRun(path, selection, len(findings[0]), len(by_step))
