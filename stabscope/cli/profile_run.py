"""``stabscope profile`` once its options are read: a model script for --steps steps, or an
unmodified training script followed from outside; the progress bar, the summary at the end,
and the one line when a signal ended it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from ..errors import UsageError
from ..record.announce import announced_by
from .common import err, finding_line, stdout_for_data_only

if TYPE_CHECKING:
    from ..drivers.profile import ProgressFn
    from ..record.config import RecorderConfig


@dataclass
class TrainingOptions:
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


@dataclass(frozen=True)
class ProfileOutput:
    """What ``profile`` prints: ``quiet`` keeps the verdict line only (no bar, no summary),
    ``as_json`` prints the closing summary as one JSON object on stdout instead, with
    whatever the script writes to stdout meanwhile sent to stderr."""

    quiet: bool = False
    as_json: bool = False

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Around the script's code: its stdout kept off a JSON summary, and the run's
        error findings while it trains printed as ``error:`` lines whatever its warning
        filters."""
        with contextlib.ExitStack() as stack:
            if self.as_json:
                stack.enter_context(stdout_for_data_only())
            stack.enter_context(announced_by(finding_line))
            yield


def run_profile(
    script: Path,
    run_dir: Path,
    steps: int | None,
    config: RecorderConfig,
    seed: int,
    device: str,
    sets: list[str],
    force: bool,
    output: ProfileOutput,
    training: TrainingOptions,
    on_error: str = "warn",
) -> bool:
    """Profile the script; whether an error finding stopped it (``--on-error stop``)."""
    from ..drivers.profile import pick_device, planned_budget, profile_script
    from ..drivers.script import load_script, parse_set, script_path
    from ..drivers.zerocode import follows_model_script_convention, profile_training_script
    from ..record.distributed import rank
    from ..store.rundir import drop_empty_parts
    from .progress import step_progress

    path = script_path(script)
    if training.requested() or not follows_model_script_convention(path):
        _check_training_options(path, steps, sets, device)
        if rank() == 0:  # under torchrun, rank 0 alone prepares the run directory
            _prepare_run_dir(run_dir, force)
        with contextlib.ExitStack() as stack:
            stack.enter_context(output.training())
            # The bar appears with the first step: errors before it stay one line.
            progress = _lazy_progress(
                stack, disable=output.quiet or rank() != 0, planned=training.budget
            )
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
                on_error=on_error,
            )
        if rank() == 0:
            _print_profile_result(run_dir, result.seconds, result.notes, output)
        return result.stopped_by is not None
    if training.given() is not None:
        raise UsageError(
            f"{training.given()} applies to training scripts, and {path.name} is a model "
            "script (it defines model, batches and loss)",
            hint="a model script runs --steps steps; pass --run-script to run it as __main__",
        )
    total = 200 if steps is None else steps
    planned_budget(total, training.budget)  # before the run directory is touched
    with output.training():  # the script's top level may print
        loaded = load_script(path, parse_set(sets))
    pick_device(device)  # a bad --device fails here, before any output directory is touched
    _prepare_run_dir(run_dir, force)  # fail before any training work
    try:
        with output.training(), step_progress(err, total, disable=output.quiet) as progress:
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
                on_error=on_error,
            )
    except UsageError:
        drop_empty_parts(run_dir)
        raise
    _print_profile_result(run_dir, result.seconds, result.notes, output)
    return result.stopped_by is not None


def _lazy_progress(
    stack: contextlib.ExitStack, disable: bool, planned: int | None = None
) -> ProgressFn:
    """A progress callback that opens its bar (inside ``stack``) on the first call. A script
    run without ``--max-steps`` has no known end; ``planned`` (``--budget``) gives the bar one."""
    from .progress import step_progress

    bar: list[ProgressFn] = []

    def update(done: int, total: int | None, loss: float | None) -> None:
        total = total if total is not None else planned
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


def interrupted(run_dir: Path, error: BaseException) -> int:
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
            first = meta.error or {}
            if first.get("rank"):  # torchrun ended this rank because another one failed
                kept += f"; rank {first['rank']} failed first: {first.get('type')}: "
                kept += str(first.get("message"))
        except (NotARunError, OSError):
            kept = f"nothing was recorded in {run_dir} yet"
        err.print(f"[yellow]interrupted[/] by {name}: {escape(kept)}", soft_wrap=True)
    return 128 + signum


def _print_profile_result(
    run_dir: Path, seconds: float, notes: list[str], output: ProfileOutput
) -> None:
    from ..analysis.summary import summarize
    from ..report.console import print_summary

    headline = summarize(run_dir)
    if output.as_json or output.quiet:
        import json

        from .verdict import findings_for, json_record, verdict_line

        findings, note = findings_for(run_dir)  # the rules on the fresh run, as `summary`
        if output.as_json:
            record = {**json_record(headline, findings, note), "seconds": seconds, "notes": notes}
            print(json.dumps(record, indent=1, allow_nan=False), flush=True)
        else:
            err.print(escape(verdict_line(headline, findings)), soft_wrap=True)
        return
    # A stopped run's summary says by which finding, on its status line.
    print_summary(headline, err)
    from .verdict import withdrawn

    notes = [*notes, *withdrawn(run_dir)]
    shown = {str(n) for n in headline.notes}  # the summary printed meta.json's notes
    for note in dict.fromkeys(n for n in notes if n not in shown):
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    where = escape(str(run_dir))
    err.print(
        f"run directory: [bold]{where}[/] ({seconds:.1f}s) — next: stabscope summary {where}",
        soft_wrap=True,
    )
