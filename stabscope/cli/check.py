"""``stabscope check``: the CI gate over a run (or a model script it profiles first)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from ..wording import counted
from . import values
from .common import Quiet, app, err, fail


@app.command()
def check(
    target: Annotated[
        Path,
        typer.Argument(
            help="A run directory, or a model script to profile briefly (seeded) and then check."
        ),
    ],
    fail_on: Annotated[
        values.Severity,
        typer.Option(help="Exit 1 on findings of this severity or worse."),
    ] = values.Severity.error,
    output_format: Annotated[
        values.CheckFormat,
        typer.Option(
            "--format", help="table (stderr), json (stdout) or github (workflow annotations)."
        ),
    ] = values.CheckFormat.table,
    junit: Annotated[Path | None, typer.Option(help="Also write JUnit XML here.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML file with a \\[tool.stabscope.rules] table \\[default: pyproject.toml]."
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="A stored run: fail when a layer's "
            "act/grad rms moved by more than "
            "--baseline-factor."
        ),
    ] = None,
    baseline_factor: Annotated[
        float, typer.Option(help="Allowed change against the baseline.")
    ] = 10.0,
    steps: Annotated[
        int | None,
        typer.Option(help="Steps to profile when TARGET is a script \\[default: 50]."),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(
            help="The planned length of the training when TARGET is a script (default: "
            "--steps): the failure forecast looks ahead along the scheduler's lr up to it."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="CONFIG override for a script (repeatable).")
    ] = None,
    allow_incomplete: Annotated[
        bool,
        typer.Option(
            "--allow-incomplete",
            help="A killed or interrupted run is a warning, not an error (it still fails "
            "--fail-on warning).",
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """The CI gate: run the rules on a run; exit 1 when findings reach --fail-on."""
    try:
        code = _check(
            target,
            fail_on.value,
            output_format.value,
            junit,
            config,
            baseline,
            baseline_factor,
            steps,
            set_ or [],
            allow_incomplete,
            budget,
            quiet,
        )
    except UsageError as e:
        raise fail(e) from None
    raise typer.Exit(code)


def _check(
    target: Path,
    fail_on: str,
    output_format: str,
    junit: Path | None,
    config: Path | None,
    baseline: Path | None,
    factor: float,
    steps: int,
    sets: list[str],
    allow_incomplete: bool = False,
    budget: int | None = None,
    quiet: bool = False,
) -> int:
    from rich.markup import escape

    from ..report.console import print_findings
    from ..rules.applicability import INAPPLICABLE
    from ..rules.base import UNRECORDED
    from ..rules.gate import load_settings, run_gate
    from ..rules.output import failure_lines, to_github, to_json, to_junit
    from ..store.findings import SEVERITIES
    from ..store.rundir import refuse_output_in_run
    from .verdict import withdrawn

    if output_format not in ("table", "json", "github"):
        raise UsageError(f"bad --format {output_format!r}", hint="table, json or github")
    if fail_on not in SEVERITIES:
        raise UsageError(f"bad --fail-on {fail_on!r}", hint=f"one of {', '.join(SEVERITIES)}")
    # factor >= 1: a change is max(ratio, 1/ratio), so below 1 every module would fail.
    ok = math.isfinite(factor) and factor >= 1
    values.require(ok, "--baseline-factor", factor, "a number >= 1", "10")
    if target.suffix != ".py":
        # A run directory was recorded with its own CONFIG, length and plan: an override
        # would be silently ignored, and the verdict read as that of another configuration.
        overrides = (("--steps", steps), ("--budget", budget), ("--set", sets or None))
        given = [name for name, value in overrides if value is not None]
        if given:
            raise UsageError(
                f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} read only for a "
                f"model script, and {target} is a run directory",
                hint="profile the script again with them, or check the run without them",
            )
    steps = 50 if steps is None else steps
    values.positive_int(steps, "--steps", "50")
    if budget is not None:
        values.positive_int(budget, "--budget", "10000")
        if target.suffix == ".py":
            from ..drivers.profile import planned_budget

            # Shorter than --steps: bad input, before profiling.
            planned_budget(steps, budget)
    if junit is not None:
        refuse_output_in_run(junit, "--junit")  # findings.json is the one file check writes there
        values.output_file(junit, "--junit")
    if target.suffix == ".py":
        load_settings(config)  # a bad --config fails before the script is profiled
        _refuse_training_script(target)
        from ..drivers.check_script import profile_for_check  # torch: only for a script

        run_dir = profile_for_check(target, steps, sets, budget, None if quiet else _announce)
    else:
        run_dir = target
    gate = run_gate(run_dir, fail_on, config, baseline, factor, allow_incomplete)
    findings, failing = gate.findings, gate.failing
    if output_format == "json":
        typer.echo(to_json(gate))
    elif output_format == "github":
        text = to_github(gate)
        if text:
            typer.echo(text)
    elif quiet:  # only the findings that fail the gate
        if failing:
            print_findings(failing, err)
    else:
        print_findings(findings, err)
        # Rules whose metrics this run did not record (a preset without them, no probe
        # batch): one line; any other reason, one line each.
        unrecorded = [rule for rule, why in gate.skipped.items() if why.startswith(UNRECORDED)]
        if unrecorded:
            err.print(
                f"[dim]skipped {counted(len(unrecorded), 'rule')} whose metrics this run did "
                f"not record: {escape(', '.join(unrecorded))} (--format json names the "
                "metrics; `stabscope profile --preset full` records the most)[/]",
                soft_wrap=True,
            )
        # Rules that cannot apply to this model (attention rules without attention): one
        # line, so that the line above names only what a richer preset would run.
        moot = [rule for rule, why in gate.skipped.items() if why.startswith(INAPPLICABLE)]
        if moot:
            err.print(
                f"[dim]skipped as not applicable to this model: {escape(', '.join(moot))} "
                "(--format json says why)[/]",
                soft_wrap=True,
            )
        for rule, why in gate.skipped.items():
            if rule not in unrecorded and rule not in moot:
                err.print(f"[dim]skipped {escape(rule)}: {escape(why)}[/]", soft_wrap=True)
        for line in withdrawn(run_dir, findings):  # the profile's console showed them
            err.print(f"[yellow]note:[/] {escape(line)}", soft_wrap=True)
    for line in failure_lines(gate):  # on stderr in every format: never a silent gap
        err.print(f"[bold red]{escape(line)}[/]", soft_wrap=True)
    reasons = [f"{counted(len(failing), 'finding')} at {fail_on} or worse"] if failing else []
    if gate.failed_blocking:
        n = len(gate.failed_blocking)
        reasons.append(f"{counted(n, 'rule')} that could fail it raised")
    verdict = f"[red]failed[/]: {'; '.join(reasons)}" if reasons else "[green]passed[/]"
    if gate.failed and not gate.failed_blocking:
        verdict += (
            f" ({counted(len(gate.failed), 'rule')} raised; none can reach --fail-on {fail_on})"
        )
    err.print(f"check {escape(str(run_dir))}: {verdict}", soft_wrap=True)
    if junit is not None:
        _write_junit(junit, to_junit(gate, fail_on), run_dir)
    return 0 if gate.passed else 1


def _refuse_training_script(script: Path) -> None:
    """``check`` profiles model scripts only (briefly, seeded); a training script is recorded
    by ``profile`` with its own arguments, and its run then checked."""
    from ..drivers.script import missing_entry_points  # reads the source, runs nothing

    if script.is_file() and missing_entry_points(script):
        run = f"runs/{script.stem}"
        raise UsageError(
            f"{script.name} is a training script (no model, batches and loss): check profiles "
            "model scripts only",
            hint=f"record it, then check the run: stabscope profile {script} --out {run} -- "
            f"ARGS && stabscope check {run}",
        )


def _write_junit(path: Path, text: str, run_dir: Path) -> None:
    """The findings are in RUN/findings.json already: a failed write here loses nothing."""
    from ..store.layout import FINDINGS_FILE

    kept = f"the findings are kept in {run_dir / FINDINGS_FILE}; "
    values.write_output(path, text, "--junit", kept)


def _announce(line: str) -> None:
    err.print(escape(line), soft_wrap=True)
