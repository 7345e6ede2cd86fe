"""``stabscope summary RUN``: the headline numbers and findings in the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from .common import app, err, fail


@app.command()
def summary(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
) -> None:
    """Print the headline numbers of a recorded run and its findings."""
    from ..analysis.summary import summarize
    from ..errors import FindingsError
    from ..report.console import print_findings, print_summary
    from ..store import NotARunError
    from ..store.findings import load_findings

    try:
        print_summary(summarize(run_dir), err)
    except NotARunError as e:
        hint = getattr(e, "hint", "pass a directory written by `stabscope profile`")
        raise fail(UsageError(str(e), hint=hint)) from None
    try:
        print_findings(load_findings(run_dir), err)
    except FindingsError as e:
        err.print(f"[yellow]warning:[/] {escape(str(e))}", soft_wrap=True)
