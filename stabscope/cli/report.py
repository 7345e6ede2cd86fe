"""``stabscope report RUN``: the self-contained HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from ..wording import counted
from . import values
from .common import Quiet, app, err, fail

REPORT = Path("report.html")


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories; several are compared side by side.")
    ],
    output: Annotated[
        Path, typer.Option("--out", "-o", "--output", help="HTML file to write.")
    ] = REPORT,
    quiet: Quiet = False,
) -> None:
    """Write one self-contained HTML report of one or more runs; it opens offline."""
    from ..report.build import build_report
    from ..store.rundir import refuse_output_in_run
    from .verdict import findings_for

    try:
        refuse_output_in_run(output, "-o")
        values.output_file(
            output, "-o", "the report to"
        )  # before reading the runs, which can take a while
        result = build_report(run_dirs, output, findings_for)
    except UsageError as e:
        raise fail(e) from None
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if quiet:
        return
    err.print(
        f"report: [bold]{escape(str(result.path))}[/] ({result.size / 1e6:.1f} MB, "
        f"{counted(len(result.runs), 'run')}, {result.plots} plots)",
        soft_wrap=True,
    )
