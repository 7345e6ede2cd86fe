"""The ``stabscope`` command: parse, call the library, print, exit.

Exit codes: 0 success, 1 the gate found problems, 2 bad input (one line with a hint).
Human-readable output goes to stderr; data goes to stdout or ``--output``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import cli_profile  # noqa: F401  (registers `profile` first: it leads --help)
from . import cli_values as values
from .cli_common import app, err, fail
from .errors import UsageError

REPORT = Path("report.html")


@app.command()
def summary(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
) -> None:
    """Print the headline numbers of a recorded run and its findings."""
    from .report.console import print_findings, print_summary
    from .report.findings import FindingsError, load_findings
    from .store import NotARunError
    from .summary import summarize

    try:
        print_summary(summarize(run_dir), err)
    except NotARunError as e:
        hint = getattr(e, "hint", "pass a directory written by `stabscope profile`")
        raise fail(UsageError(str(e), hint=hint)) from None
    try:
        print_findings(load_findings(run_dir), err)
    except FindingsError as e:
        err.print(f"[yellow]warning:[/] {escape(str(e))}", soft_wrap=True)


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories; several are compared side by side.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.")] = REPORT,
) -> None:
    """Write one self-contained HTML report of one or more runs; it opens offline."""
    from .report.build import build_report
    from .store.rundir import refuse_output_in_run

    try:
        refuse_output_in_run(output, "-o")
        values.output_file(
            output, "-o", "the report to"
        )  # before reading the runs, which can take a while
        result = build_report(run_dirs, output)
    except UsageError as e:
        raise fail(e) from None
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    err.print(
        f"report: [bold]{escape(str(result.path))}[/] ({result.size / 1e6:.1f} MB, "
        f"{len(result.runs)} run{'s' if len(result.runs) > 1 else ''}, {result.plots} plots)",
        soft_wrap=True,
    )


@app.command()
def inspect(
    script: Annotated[Path, typer.Argument(help="Model script (see README: Model scripts).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a CONFIG value (repeatable).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the structure as JSON on stdout.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for building the model.")] = 0,
) -> None:
    """Show the detected structure: blocks, branches, norm placement, attention heads."""
    try:
        values.seed(seed)
        _inspect(script, set_ or [], as_json, seed)
    except UsageError as e:
        raise fail(e) from None


def _inspect(script: Path, sets: list[str], as_json: bool, seed: int) -> None:
    import json

    from .profile import build_for_inspection
    from .report.structure_tree import print_structure
    from .script import load_script, parse_set
    from .structure import discover

    loaded = load_script(script, parse_set(sets))
    model, forward = build_for_inspection(loaded, seed)
    structure = discover(model, forward)
    if as_json:
        typer.echo(json.dumps(structure.to_dict(), indent=1))
        return
    title = f"{type(model).__name__} from {script.name} ({len(structure.blocks)} blocks)"
    print_structure(structure, title, err)


@app.command()
def amplification(
    script: Annotated[Path, typer.Argument(help="Model script whose CONFIG has 'depth'.")],
    depths: Annotated[str, typer.Option(help="Comma-separated depths.")] = "6,12,24,48",
    out: Annotated[
        Path | None, typer.Option(help="Run directory \\[default: runs/SCRIPT-amplification]")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Perturbations averaged per depth.")] = 5,
    delta: Annotated[float, typer.Option(help="Perturbation size per weight.")] = 1e-4,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a CONFIG value (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a run in --out.")] = False,
) -> None:
    """Output change under a δ-perturbation of every weight, against depth (Admin)."""
    from .amplification import run_amplification
    from .script import load_script, parse_set
    from .store.rundir import NestedRunError, RunExistsError, run_dir_error

    run_dir = out or Path("runs") / f"{script.stem}-amplification"
    try:
        try:
            depth_list = [int(d) for d in depths.split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"bad --depths {depths!r}", hint="e.g. --depths 6,12,24") from None
        values.positive_int(seeds, "--seeds", "5")
        values.positive_finite(delta, "--delta", "1e-4")
        loaded = load_script(script, parse_set(set_ or []))
        result = run_amplification(loaded, depth_list, run_dir, seeds, delta, device, force)
    except (RunExistsError, NestedRunError) as e:
        raise fail(run_dir_error(e, run_dir)) from None
    except UsageError as e:
        raise fail(e) from None
    from rich.table import Table

    table = Table(title="mean squared output change after a δ-perturbation of every weight")
    table.add_column("depth N", justify="right")
    table.add_column("E[ΔF²]", justify="right")
    table.add_column("std over seeds", justify="right")
    for n, c, s in zip(result.depths, result.change, result.spread):
        table.add_row(str(n), f"{c:.4g}", f"{s:.2g}")
    err.print(table)
    err.print(
        f"fit against N: R² {result.fit_n.r2:.3f}; against log N: R² "
        f"{result.fit_log_n.r2:.3f} -> grows like [bold]{result.better}[/] "
        "(theory: N for Post-LN, log N for Pre-LN)"
    )
    err.print(f"run directory: [bold]{escape(str(result.run_dir))}[/]", soft_wrap=True)


@app.command()
def check(
    target: Annotated[
        Path,
        typer.Argument(
            help="A run directory, or a model script to profile briefly (seeded) and then check."
        ),
    ],
    fail_on: Annotated[
        str,
        typer.Option(help="Exit 1 on findings of this severity or worse: error, warning or info."),
    ] = "error",
    output_format: Annotated[
        str, typer.Option("--format", help="table, json (stdout) or github (workflow annotations).")
    ] = "table",
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
    steps: Annotated[int, typer.Option(help="Steps to profile when TARGET is a script.")] = 50,
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
) -> None:
    """The CI gate: run the rules on a run; exit 1 when findings reach --fail-on."""
    try:
        code = _check(
            target,
            fail_on,
            output_format,
            junit,
            config,
            baseline,
            baseline_factor,
            steps,
            set_ or [],
            allow_incomplete,
            budget,
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
) -> int:
    from rich.markup import escape

    from .report.console import print_findings
    from .report.findings import SEVERITIES
    from .rules.gate import load_settings, run_gate
    from .rules.output import failure_lines, to_github, to_json, to_junit
    from .store.rundir import refuse_output_in_run

    if output_format not in ("table", "json", "github"):
        raise UsageError(f"bad --format {output_format!r}", hint="table, json or github")
    if fail_on not in SEVERITIES:
        raise UsageError(f"bad --fail-on {fail_on!r}", hint=f"one of {', '.join(SEVERITIES)}")
    # factor >= 1: a change is max(ratio, 1/ratio), so below 1 every module would fail.
    ok = math.isfinite(factor) and factor >= 1
    values.require(ok, "--baseline-factor", factor, "a number >= 1", "10")
    values.positive_int(steps, "--steps", "50")
    if budget is not None:
        from .profile import planned_budget

        values.positive_int(budget, "--budget", "10000")
        planned_budget(steps, budget)  # shorter than --steps: bad input, before profiling
    if junit is not None:
        refuse_output_in_run(junit, "--junit")  # findings.json is the one file check writes there
        values.output_file(junit, "--junit")
    if target.suffix == ".py":
        load_settings(config)  # a bad --config fails before the script is profiled
        run_dir = _profile_for_check(target, steps, sets, budget)
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
    else:
        print_findings(findings, err)
        for rule, why in gate.skipped.items():
            err.print(f"[dim]skipped {escape(rule)}: {escape(why)}[/]", soft_wrap=True)
    for line in failure_lines(gate):  # on stderr in every format: never a silent gap
        err.print(f"[bold red]{escape(line)}[/]", soft_wrap=True)
    reasons = [f"{len(failing)} findings at {fail_on} or worse"] if failing else []
    if gate.failed_blocking:
        reasons.append(f"{len(gate.failed_blocking)} rules that could fail it raised")
    verdict = f"[red]failed[/]: {'; '.join(reasons)}" if reasons else "[green]passed[/]"
    if gate.failed and not gate.failed_blocking:
        verdict += f" ({len(gate.failed)} rules raised; none can reach --fail-on {fail_on})"
    err.print(f"check {escape(str(run_dir))}: {verdict}", soft_wrap=True)
    if junit is not None:
        _write_junit(junit, to_junit(gate, fail_on), run_dir)
    return 0 if gate.passed else 1


def _write_junit(path: Path, text: str, run_dir: Path) -> None:
    """The findings are in RUN/findings.json already: a failed write here loses nothing."""
    from .report.findings import FINDINGS_FILE

    kept = f"the findings are kept in {run_dir / FINDINGS_FILE}; "
    values.write_output(path, text, "--junit", kept)


def _profile_for_check(script: Path, steps: int, sets: list[str], budget: int | None) -> Path:
    from .config import RecorderConfig
    from .profile import profile_script
    from .schedule import Schedule
    from .script import load_script, parse_set
    from .store.rundir import NestedRunError, RunExistsError, run_dir_error

    loaded = load_script(script, parse_set(sets))
    run_dir = Path("runs") / f"{script.stem}-check"
    config = RecorderConfig(schedule=Schedule(dense=10, every=5))
    err.print(
        escape(f"profiling {script.name} for {steps} steps into {run_dir} (seed 0)"),
        soft_wrap=True,
    )
    try:
        result = profile_script(
            loaded, run_dir, steps, config, seed=0, device="auto", force=True, budget=budget
        )
    except (RunExistsError, NestedRunError) as e:  # another check of this script is running
        raise run_dir_error(e, run_dir) from None
    return result.run_dir


def _register_extra_commands() -> None:
    # Imported for their side effect: each module decorates its commands onto ``app``.
    from . import cli_grow, cli_predict  # noqa: F401


_register_extra_commands()


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
