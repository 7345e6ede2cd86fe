"""``stabscope summary RUN``: the headline numbers and findings in the terminal, or as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from .common import app, err, fail


@app.command()
def summary(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object on stdout: the summary and the findings."
        ),
    ] = False,
) -> None:
    """Print the headline numbers of a recorded run and its findings (the rules run now when
    the run has no current findings.json; nothing is written into the run)."""
    from ..analysis.summary import summarize, summary_record
    from ..errors import FindingsError
    from ..report.console import print_findings, print_summary
    from ..store import NotARunError
    from ..store.findings import finding_record
    from .verdict import findings_for

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
        record = {
            "summary": summary_record(headline),
            "findings": None if findings is None else [finding_record(f) for f in findings],
            "findings_source": note or "findings.json",
        }
        typer.echo(json.dumps(record, indent=1, allow_nan=False))
        return
    print_summary(headline, err)
    print_findings(findings, err, note=note)
