"""``stabscope profile``: record a model script, or an unmodified training script."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from . import values
from .common import app, err, fail

if TYPE_CHECKING:
    from ..drivers.profile import ProgressFn
    from ..record.config import RecorderConfig


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
    out: Annotated[Path | None, typer.Option(help="Run directory \\[default: runs/SCRIPT]")] = None,
    every: Annotated[
        int | None,
        typer.Option(help="After the dense start, record every N steps \\[default: 25]."),
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
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite a run already in --out.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Record a model script for --steps steps, or an unmodified training script.

    A file that defines model, batches and loss is a model script (README: Model scripts).

    Any other file, or one given arguments after `--` or --run-script, is a training script.

    A training script runs as __main__ with its own arguments (docs/zero-code.md).

    Example: stabscope profile train.py --max-steps 100 -- --lr 3e-4 --epochs 1
    """
    from ..record.config import load_pyproject_config
    from ..record.schedule import Schedule

    try:
        # Checked before anything is prepared: --force must not clear a run for bad input.
        values.positive_int(steps, "--steps", "200")
        values.positive_int(max_steps, "--max-steps", "100")
        values.positive_int(budget, "--budget", "10000")
        values.non_negative_int(every, "--every", "25")
        values.non_negative_int(dense, "--dense", "10")
        values.seed(seed)
    except UsageError as e:
        raise fail(e) from None
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
        )
    except UsageError as e:  # [tool.stabscope] of the wrong type: names the key
        raise fail(e) from None
    except ValueError as e:
        raise fail(UsageError(str(e), hint="see `stabscope profile --help`")) from None
    from ..store import interrupts
    from ..store.atomic import RunWriteError
    from ..store.rundir import release_run_dir

    run_dir = out or Path("runs") / script.stem
    training = _TrainingOptions(
        script_args or [], run_script, max_steps, stop_script, no_compile, budget
    )
    try:
        # SIGTERM closes the run like Ctrl-C does, from the first moment (store/interrupts.py).
        with interrupts.handling():
            try:
                _profile(
                    script, run_dir, steps, config, seed, device, set_ or [], force, quiet, training
                )
            finally:
                release_run_dir(run_dir)  # a claim no Recorder took over (it ended early)
    except UsageError as e:
        raise fail(e) from None
    except RunWriteError as e:
        raise fail(
            UsageError(
                f"writing the run in {run_dir} failed: {e.strerror or e}",
                hint="free disk space or choose another --out; the run is marked failed and "
                "keeps the parts written before",
            )
        ) from None
    except (KeyboardInterrupt, interrupts.Terminated) as e:
        raise typer.Exit(_interrupted(run_dir, e)) from None


@dataclass
class _TrainingOptions:
    """The options of ``profile`` that only a training script takes."""

    args: list[str]
    run_script: bool
    max_steps: int | None
    stop_script: bool
    no_compile: bool
    budget: int | None  # both kinds of script take it

    def requested(self) -> bool:
        return self.run_script or bool(self.args)

    def given(self) -> str | None:
        """The first training-script-only option given, for an error about a model script."""
        given = {
            "--max-steps": self.max_steps is not None,
            "--stop-script": self.stop_script,
            "--no-compile": self.no_compile,
        }
        return next((name for name, on in given.items() if on), None)


def _profile(
    script: Path,
    run_dir: Path,
    steps: int | None,
    config: RecorderConfig,
    seed: int,
    device: str,
    sets: list[str],
    force: bool,
    quiet: bool,
    training: _TrainingOptions,
) -> None:
    from ..drivers.profile import pick_device, planned_budget, profile_script
    from ..drivers.script import load_script, parse_set, script_path
    from ..drivers.zerocode import follows_model_script_convention, profile_training_script
    from ..record.distributed import rank
    from .progress import step_progress

    path = script_path(script)
    if training.requested() or not follows_model_script_convention(path):
        _check_training_options(path, steps, sets, device)
        if rank() == 0:  # under torchrun, rank 0 alone prepares the run directory
            _prepare_run_dir(run_dir, force)
        with contextlib.ExitStack() as stack:
            # The bar appears with the first step: errors before it stay one line.
            progress = _lazy_progress(stack, disable=quiet or rank() != 0)
            result = profile_training_script(
                path,
                training.args,
                run_dir,
                config,
                seed=seed,
                max_steps=training.max_steps,
                stop_script=training.stop_script,
                no_compile=training.no_compile,
                budget=training.budget,
                force=True,  # prepared above
                progress=progress,
            )
        if rank() == 0:
            _print_profile_result(result.run_dir, result.seconds, result.notes)
        return
    if training.given() is not None:
        raise UsageError(
            f"{training.given()} applies to training scripts, and {path.name} is a model "
            "script (it defines model, batches and loss)",
            hint="a model script runs --steps steps; pass --run-script to run it as __main__",
        )
    total = 200 if steps is None else steps
    planned_budget(total, training.budget)  # before the run directory is touched
    loaded = load_script(path, parse_set(sets))
    pick_device(device)  # a bad --device fails here, before any output directory is touched
    _prepare_run_dir(run_dir, force)  # fail before any training work
    try:
        with step_progress(err, total, disable=quiet) as progress:
            result = profile_script(
                loaded,
                run_dir,
                total,
                config,
                seed,
                device,
                force=True,
                progress=progress,
                budget=training.budget,
            )
    except UsageError:
        _drop_empty_parts(run_dir)
        raise
    _print_profile_result(result.run_dir, result.seconds, result.notes)


def _drop_empty_parts(run_dir: Path) -> None:
    """A model script refused before its first step (--include matching nothing) leaves the
    empty parts/ the recorder made; without meta.json it would still count as a run that
    needs --force. Only an empty parts/ in a run without meta.json is removed."""
    from ..store.layout import META_FILE, PARTS_DIR

    parts = run_dir / PARTS_DIR
    if not (run_dir / META_FILE).exists() and parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()


def _lazy_progress(stack: contextlib.ExitStack, disable: bool) -> ProgressFn:
    """A progress callback that opens its bar (inside ``stack``) on the first call."""
    from .progress import step_progress

    bar: list[ProgressFn] = []

    def update(done: int, total: int | None, loss: float | None) -> None:
        if not bar:
            bar.append(stack.enter_context(step_progress(err, total, disable=disable)))
        bar[0](done, total, loss)

    return update


def _check_training_options(path: Path, steps: int | None, sets: list[str], device: str) -> None:
    """Options of a model script that a training script cannot take."""
    if steps is not None:
        raise UsageError(
            f"--steps applies to model scripts; {path.name} runs its own training loop",
            hint="--max-steps N stops recording after N optimizer steps "
            "(--stop-script stops the script there too)",
        )
    if sets:
        raise UsageError(
            f"--set applies to a model script's CONFIG; {path.name} is a training script",
            hint=f"pass its own arguments after --: stabscope profile {path.name} -- --lr 1e-3",
        )
    if device != "auto":
        raise UsageError(
            f"--device applies to model scripts; {path.name} places its own model",
            hint="choose the device the way the script does (its arguments or environment)",
        )


def _prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Create and lock ``run_dir`` for a new run, or fail with a usage error before any
    training; the lock passes to the Recorder that records into it."""
    from ..store.rundir import prepare_run_dir, run_dir_error

    try:
        prepare_run_dir(run_dir, force)
    except OSError as e:
        raise run_dir_error(e, run_dir) from None


def _interrupted(run_dir: Path, error: BaseException) -> int:
    """Say in one line that SIGINT/SIGTERM ended the profile and where the run is; the exit
    status the signal stands for (128 + signum)."""
    from rich.markup import escape

    from ..record.distributed import rank
    from ..store import NotARunError, interrupts, load_meta

    signum = interrupts.interrupting_signal(error) or 2
    name = interrupts.signal_name(signum)
    if rank() == 0:
        try:
            meta = load_meta(run_dir)
            kept = (
                f"{meta.steps} steps are kept in {run_dir} "
                f"(status {meta.status}, {meta.rows:,} rows)"
            )
        except (NotARunError, OSError):
            kept = f"nothing was recorded in {run_dir} yet"
        err.print(f"[yellow]interrupted[/] by {name}: {escape(kept)}", soft_wrap=True)
    return 128 + signum


def _print_profile_result(run_dir: Path, seconds: float, notes: list[str]) -> None:
    from ..analysis.summary import summarize
    from ..report.console import print_summary

    print_summary(summarize(run_dir), err)
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    where = escape(str(run_dir))
    err.print(
        f"run directory: [bold]{where}[/] ({seconds:.1f}s) — next: stabscope summary {where}",
        soft_wrap=True,
    )
