"""``stabscope profile``: record a model script, or an unmodified training script."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ScriptError, UsageError
from . import values
from .common import Quiet, app, fail
from .profile_run import ProfileOutput, TrainingOptions, interrupted, run_profile


@app.command()
def profile(
    script: Annotated[
        Path, typer.Argument(help="A model script, or a training script to run as __main__.")
    ],
    script_args: Annotated[
        list[str] | None,
        typer.Argument(
            help="The training script's own arguments, after `--` "
            "(their presence means: run SCRIPT as a training script).",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Model script: training steps to run (200 if not given).")
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(
            help="Planned training steps, for the planned lr curve: default --steps (model "
            "script), --max-steps with --stop-script (training script)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory \\[default: runs/SCRIPT]")
    ] = None,
    every: Annotated[
        int | None,
        typer.Option(
            help="After the dense start, record every N steps (0: the dense start only) "
            "\\[default: 25]."
        ),
    ] = None,
    dense: Annotated[
        int | None, typer.Option(help="Record every step for the first K steps \\[default: 10].")
    ] = None,
    log_schedule: Annotated[
        bool, typer.Option("--log-schedule", help="Also record on log-spaced steps.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for torch, numpy and random.")] = 0,
    device: Annotated[str, typer.Option(help="Model script: cpu, cuda, cuda:N or auto.")] = "auto",
    preset: Annotated[
        str, typer.Option(help="cheap, standard or full (ordered by cost).")
    ] = "standard",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a CONFIG value of the script: --set depth=24 (repeatable)."
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(help="Glob on module names to record (repeatable) \\[default: *]."),
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Glob on module names to skip (repeatable).")
    ] = None,
    run_script: Annotated[
        bool,
        typer.Option(
            "--run-script",
            help="Run SCRIPT as a training script, even one that defines model, batches, loss.",
        ),
    ] = False,
    max_steps: Annotated[
        int | None,
        typer.Option(help="Training script: stop recording after N optimizer steps."),
    ] = None,
    stop_script: Annotated[
        bool,
        typer.Option("--stop-script", help="Training script: also stop it at --max-steps."),
    ] = False,
    no_compile: Annotated[
        bool,
        typer.Option(
            "--no-compile",
            help="Training script: run its torch.compile'd code eagerly, so that every module "
            "is recorded.",
        ),
    ] = False,
    on_error: Annotated[
        str,
        typer.Option(
            "--on-error",
            metavar="[warn|stop]",
            help="What an error finding of the rules does while the run trains: warn (a "
            "warning line) or stop (training ends at that step; status stopped, exit 1).",
        ),
    ] = "warn",
    log_to: Annotated[
        list[str] | None,
        typer.Option(
            "--log-to",
            metavar="TARGET",
            help="Also send the headline series and findings, while it trains, to "
            "tensorboard:DIR, wandb or wandb:PROJECT (repeatable, or comma-separated).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite a run already in --out.")
    ] = False,
    quiet: Quiet = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the closing summary and findings as one JSON object on stdout "
            "(the script's own stdout goes to stderr).",
        ),
    ] = False,
) -> None:
    """Record a model script for --steps steps, or an unmodified training script.

    A file that defines model, batches and loss is a model script (README: Model scripts).

    Any other file, or one given arguments after `--` or --run-script, is a training script.

    A training script runs as __main__ with its own arguments (docs/zero-code.md).

    Example: stabscope profile train.py --max-steps 100 -- --lr 3e-4 --epochs 1
    """
    from ..record.config import load_pyproject_config
    from ..record.schedule import Schedule
    from ..rules.online import ON_ERROR

    try:
        values.one_of(on_error, "--on-error", ON_ERROR)
        # Checked before anything is prepared: --force must not clear a run for bad input.
        values.positive_int(steps, "--steps", "200")
        values.positive_int(max_steps, "--max-steps", "100")
        values.positive_int(budget, "--budget", "10000")
        values.non_negative_int(every, "--every", "25")
        values.non_negative_int(dense, "--dense", "10")
        values.seed(seed)
        from ..export.destinations import check_targets

        targets = tuple(check_targets(log_to)) if log_to else None
    except UsageError as e:
        raise _failed(e, as_json) from None
    try:
        config = load_pyproject_config()
        schedule = Schedule(
            dense=config.schedule.dense if dense is None else dense,
            every=config.schedule.every if every is None else every,
            log=log_schedule or config.schedule.log,
            per_decade=config.schedule.per_decade,
        )
        config = config.replace(
            preset=preset,
            schedule=schedule,
            include=tuple(include) if include else None,
            exclude=tuple(exclude) if exclude else None,
            log_to=targets,
        )
    except UsageError as e:  # [tool.stabscope] of the wrong type: names the key
        raise _failed(e, as_json) from None
    except ValueError as e:
        bad = UsageError(str(e), hint="see `stabscope profile --help`")
        raise _failed(bad, as_json) from None
    from ..store import interrupts
    from ..store.atomic import RunWriteError
    from ..store.rundir import release_run_dir

    run_dir = out or Path("runs") / script.stem
    training = TrainingOptions(
        script_args or [], run_script, max_steps, stop_script, no_compile, budget
    )
    stopped = False
    kept = (run_dir, _run_id(run_dir))  # the run an earlier profile left there, if any
    try:
        # SIGTERM closes the run like Ctrl-C does, from the first moment (store/interrupts.py).
        with interrupts.handling():
            try:
                stopped = run_profile(
                    script,
                    run_dir,
                    steps,
                    config,
                    seed,
                    device,
                    set_ or [],
                    force,
                    ProfileOutput(quiet, as_json),
                    training,
                    on_error,
                )
            finally:
                release_run_dir(run_dir)  # a claim no Recorder took over (it ended early)
    except UsageError as e:
        raise _failed(e, as_json, kept if isinstance(e, ScriptError) else None) from None
    except RunWriteError as e:
        raise _failed(_write_failed(run_dir, e.strerror or str(e)), as_json, kept) from None
    except (KeyboardInterrupt, interrupts.Terminated) as e:
        code = interrupted(run_dir, e)
        if as_json:  # the caller parsing stdout learns it too, with what the run kept
            signal = interrupts.signal_name(code - 128)
            _print_json({"error": f"interrupted by {signal}", "exit_code": code}, kept)
        raise typer.Exit(code) from None
    lost = _rows_lost(run_dir)  # the disk filled while it trained: training went on
    if lost is not None:
        raise _failed(_write_failed(run_dir, lost), as_json, kept)
    if stopped:  # --on-error stop ended it: the run has an error finding
        raise typer.Exit(1)


#: A run directory and the ``run_id`` of the run it held before this profile (None: none).
Kept = tuple[Path, "str | None"]


def _run_id(run_dir: Path) -> str | None:
    """The ``run_id`` of the run in ``run_dir``, or None where there is none."""
    from ..store import read_meta

    try:
        return str(read_meta(run_dir).get("run_id"))
    except Exception:  # no run there, or one whose meta.json cannot be read
        return None


def _failed(error: UsageError, as_json: bool, kept: Kept | None = None) -> typer.Exit:
    """The error line on stderr; with ``--json`` also one JSON object on stdout, so a caller
    that parses stdout learns why instead of reading nothing, and, where the training may have
    run (``kept``: the script failed, or the disk filled), what its run kept."""
    if as_json:
        code = error.exit_code if isinstance(error, ScriptError) else 2
        _print_json({"error": error.message, "hint": error.hint, "exit_code": code}, kept)
    return fail(error)


def _print_json(record: dict[str, object], kept: Kept | None) -> None:
    """``record``, with what this profile's run kept when there is one, as the one JSON
    object on stdout."""
    import json

    from ..record.distributed import rank

    if rank() != 0:  # under torchrun, one object: rank 0's, as on success
        return
    if kept is not None:
        record = {**record, **_kept_run(*kept)}
    print(json.dumps(record, indent=1, allow_nan=False), flush=True)


def _kept_run(run_dir: Path, earlier: str | None) -> dict[str, object]:
    """The run this profile left (its status, steps and findings), as ``summary --json``
    gives it; nothing where the run there is the one an earlier profile left (this one
    failed before it recorded: a model script that raises on import) or none is readable."""
    from ..analysis.summary import summarize
    from ..store import NotARunError
    from .verdict import findings_for, json_record

    if _run_id(run_dir) in (None, earlier):
        return {}
    try:
        headline = summarize(run_dir)
        findings, note = findings_for(run_dir)
    except (NotARunError, OSError, UsageError):
        return {}
    return {"run": str(run_dir), **json_record(headline, findings, note)}


def _write_failed(run_dir: Path, why: str) -> UsageError:
    return UsageError(
        f"writing the run in {run_dir} failed: {why}",
        hint="free disk space or choose another --out; the run is marked failed and keeps "
        "the parts written before",
    )


def _rows_lost(run_dir: Path) -> str | None:
    """meta.json's write error of a run whose rows did not all reach the disk, or None."""
    from ..store import read_meta

    try:
        entry = read_meta(run_dir).get("write_error")
    except Exception:  # no readable meta.json: the run says nothing of a write error
        return None
    return str(entry.get("message") or entry) if isinstance(entry, dict) else None
