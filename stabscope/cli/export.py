"""``stabscope export RUN --to tensorboard``: a run's curated series, findings and heatmaps
for a dashboard, from the run store alone (no torch)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from . import values
from .common import Quiet, app, err, fail


class Target(str, Enum):
    tensorboard = "tensorboard"
    wandb = "wandb"


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    to: Annotated[Target, typer.Option("--to", help="The dashboard's format.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Log directory \\[default: tensorboard/RUN; wandb: the current directory, "
            "which gets wandb/offline-run-*].",
        ),
    ] = None,
    project: Annotated[str, typer.Option(help="W&B project of the offline run.")] = "stabscope",
    max_series: Annotated[
        int, typer.Option(help="Most scalar series to write (blocks are thinned to fit).")
    ] = 256,
    images: Annotated[
        bool, typer.Option("--images/--no-images", help="The report's heatmaps as images.")
    ] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the event files of an earlier export.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Export a run to TensorBoard or W&B.

    Per block a few headline series, loss and lr, the findings (text, W&B alerts), heatmaps
    as images (TensorBoard); `tensorboard --logdir tensorboard` shows it, `wandb sync DIR`
    uploads the W&B offline run."""
    if to == Target.wandb:
        _export_wandb(run_dir, out or Path("."), project, max_series)
        return
    from ..export.tensorboard import event_files, export_tensorboard, require_tensorboard
    from ..store.rundir import refuse_output_in_run
    from .verdict import findings_for

    target = out or Path("tensorboard") / run_dir.resolve().name
    try:
        values.positive_int(max_series, "--max-series", "256")
        require_tensorboard()  # before any reading: a missing extra is said at once
        values.run_meta(run_dir)
        refuse_output_in_run(target, "--out")
        old = event_files(target)
        if old and not force:
            raise UsageError(
                f"{target} already holds {len(old)} TensorBoard event files",
                hint="pass --force to replace them, or choose another --out",
            )
        found, note = findings_for(run_dir)
        source = note or "the last `stabscope check`"
        if old:
            for path in old:
                path.unlink()
        done = export_tensorboard(run_dir, target, (found or [], source), max_series, images)
    except UsageError as e:
        raise fail(e) from None
    if quiet:
        return
    err.print(
        f"export: [bold]{escape(str(done.out))}[/] ({escape(done.selection.note)}; "
        f"{done.findings} findings, {done.images} heatmaps, {done.steps} steps)",
        soft_wrap=True,
    )
    err.print(f"view it: tensorboard --logdir {escape(str(done.out))}", soft_wrap=True)


def _export_wandb(run_dir: Path, out: Path, project: str, max_series: int) -> None:
    from ..export.wandb import export_wandb, require_wandb
    from ..store.rundir import refuse_output_in_run
    from .verdict import findings_for

    try:
        values.positive_int(max_series, "--max-series", "256")
        require_wandb()  # before any reading: a missing extra is said at once
        values.run_meta(run_dir)
        refuse_output_in_run(out, "--out")
        found, note = findings_for(run_dir)
        source = note or "the last `stabscope check`"
        done = export_wandb(run_dir, out, (found or [], source), project, max_series)
    except UsageError as e:
        raise fail(e) from None
    err.print(
        f"export: [bold]{escape(str(done.path))}[/] ({escape(done.selection.note)}; "
        f"{done.findings} findings, {done.steps} steps)",
        soft_wrap=True,
    )
    err.print(f"upload it: wandb sync {escape(str(done.path))}", soft_wrap=True)
