"""``stabscope summary RUN``: the headline numbers and findings in the terminal, or as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from .common import Quiet, app, err, fail


@app.command()
def summary(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object on stdout: the summary and the findings."
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Print the headline numbers of a recorded run and its findings.

    The rules run now when the run has no current findings.json; nothing is written into
    the run."""
    from ..analysis.summary import summarize
    from ..errors import FindingsError
    from ..report.console import print_findings, print_summary
    from ..store import NotARunError
    from .verdict import findings_for, json_record, verdict_line

    try:
        headline = summarize(run_dir)
    except NotARunError as e:
        hint = getattr(e, "hint", "pass a directory written by `stabscope profile`")
        raise fail(UsageError(str(e), hint=hint)) from None
    try:
        findings, note = findings_for(run_dir)
    except FindingsError as e:
        findings, note = None, None
        err.print(f"[yellow]warning:[/] {escape(str(e))}", soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(json_record(headline, findings, note), indent=1, allow_nan=False))
    elif quiet:
        err.print(escape(verdict_line(headline, findings)), soft_wrap=True)
    else:
        print_summary(headline, err)
        print_findings(findings, err, note=note)
