"""Running a training script as ``__main__`` under a ``ScriptRecording``, and how it ended.

Library side of ``stabscope profile train.py -- <args>``: no printing, no exiting. How the
script ends decides the result:

- returns, or is stopped by ``--stop-script``: the run is ``complete`` and a
  ``TrainingScriptResult`` comes back;
- is stopped by an error finding (``on_error="stop"``): the run is ``stopped`` (the finding in
  meta.json's ``stopped_by`` and the result's), and a ``TrainingScriptResult`` comes back;
- calls ``sys.exit(0)`` / ``sys.exit()`` after at least one step: as a return (Python's
  success; ``sys.exit(main())``), with a note saying so;
- raises: the run is ``failed``, ``ScriptError`` (exit code 2) names the script's line;
- ``sys.exit(N)`` with N != 0: ``failed``, ``ScriptError`` with exit code N (1 for a message,
  as Python does);
- never ends a step (no optimizer, or none that trains a module it called): ``failed``,
  ``UsageError`` (exit code 2);
- SIGINT or SIGTERM (``KeyboardInterrupt`` / ``Terminated``): ``interrupted``, with every
  step taken so far written, and the exception goes on to the caller.

In every case what was recorded stays in the run directory, readable with ``load_run``.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ScriptError, TrainingError, UsageError
from ...record.config import RecorderConfig
from ...record.distributed import rank
from ...store import RunMeta
from ...store.interrupts import Terminated
from ...store.rundir import prepare_run_dir, release_run_dir
from ...wording import counted
from ..profile import seed_everything
from ..script import script_failure, script_path
from .attach import ScriptRecording, StepProgress, StopOnFinding, StopScript
from .detect import missing_entry_points
from .probe_loss import TAIL_NOTE

#: PyTorch warns that global hooks also fire for the wrapper ``torch.compile(module)`` returns;
#: that call is the root call the recording looks for, so the warning says nothing to the user.
_COMPILE_WRAPPER_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"


@dataclass
class TrainingScriptResult:
    run_dir: Path
    steps: int  # the step index after the last step (the script's optimizer steps)
    recorded_steps: int
    seconds: float
    last_loss: float | None
    notes: list[str] = field(default_factory=list)
    #: The finding that stopped the run (``on_error="stop"``), as meta.json's ``stopped_by``.
    stopped_by: dict[str, Any] | None = None


#: Where a script stopped by ``--on-error stop`` was stopped, in meta.json's notes.
STOPPED_INSIDE_NOTE = (
    "--on-error stop ended the script from inside the last step's optimizer.step(), after "
    "its update: the script's own lines after that call (a print, a scheduler step, a "
    "checkpoint) did not run for that step"
)


def exit_status(code: Any) -> int:
    """The process exit status Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


@contextlib.contextmanager
def as_main(path: Path, args: Sequence[str]) -> Iterator[None]:
    """``sys.argv`` and ``sys.path[0]`` as ``python path args...`` would set them; the
    working directory the script may change (Hydra's ``hydra.job.chdir``) is restored after
    it, so that stabscope's own paths given relative (``--out``) mean what they meant."""
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent))
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        with contextlib.suppress(OSError):
            os.chdir(saved_cwd)


@contextlib.contextmanager
def dynamo_disabled(disable: bool) -> Iterator[None]:
    """With ``disable``, ``torch.compile``'d code runs eagerly (``torch._dynamo.config``)."""
    if not disable:
        yield
        return
    import torch._dynamo

    saved = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = saved


def profile_training_script(
    script: str | Path,
    args: Sequence[str],
    out: str | Path,
    config: RecorderConfig,
    *,
    seed: int = 0,
    max_steps: int | None = None,
    stop_script: bool = False,
    no_compile: bool = False,
    budget: int | None = None,
    force: bool = False,
    progress: StepProgress | None = None,
    on_error: str = "warn",
) -> TrainingScriptResult:
    """Run ``script`` as ``__main__`` with ``args`` and record its training into ``out``.

    ``budget`` is the script's planned number of optimizer steps, for the planned lr curve
    (meta.json's ``lr_plan``); by default ``max_steps`` when ``stop_script`` ends it there.

    ``out`` is prepared (by rank 0 under torchrun) before the script starts, so a directory
    that already holds a run fails here (``RunExistsError`` unless ``force``), not inside
    the script's first forward pass."""
    path = script_path(script)
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max-steps must be positive, got {max_steps}", hint="e.g. 100")
    if stop_script and max_steps is None:
        raise UsageError("--stop-script needs --max-steps", hint="e.g. --max-steps 100")
    if budget is not None and budget < 1:
        raise UsageError(f"--budget must be positive, got {budget}", hint="e.g. --budget 10000")
    if budget is None and stop_script:
        budget = max_steps
    # The run is written where ``out`` means now: the script may change the working
    # directory (os.chdir, Hydra's hydra.job.chdir) before the model is found.
    out = Path(os.path.abspath(out))
    run_info: dict[str, Any] = {
        "script": str(path),
        "script_args": list(args),
        "mode": "training script",
        "cwd": os.getcwd(),
        "seed": seed,
        "max_steps": max_steps,
        "stop_script": stop_script,
        "no_compile": no_compile,
        "budget": budget,
    }
    recording = ScriptRecording(
        Path(out),
        config,
        run_info,
        max_steps=max_steps,
        stop_script=stop_script,
        compile_disabled=no_compile,
        budget=budget,
        progress=progress,
        on_error=on_error,
    )
    if rank() == 0:
        prepare_run_dir(out, force)
    try:
        return _run(path, args, out, recording, seed, max_steps)
    finally:
        release_run_dir(out)  # a claim no Recorder took over (no model was found)


def _run(
    path: Path,
    args: Sequence[str],
    out: str | Path,
    recording: ScriptRecording,
    seed: int,
    max_steps: int | None,
) -> TrainingScriptResult:
    notes: list[str] = []
    ending = "ended"
    returned = False  # the script ran to its own end: its last step ends its training
    seed_everything(seed)
    start = time.perf_counter()
    try:
        with (
            as_main(path, args),
            dynamo_disabled(recording.compile_disabled),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", message=_COMPILE_WRAPPER_WARNING)
            recording.install()
            runpy.run_path(str(path), run_name="__main__")
            returned = True
    except StopOnFinding as stop:
        notes.append(f"{stop} (on error: stop)")
        # Raised from the optimizer step's end: the script's own lines after that call (a
        # print, a scheduler step, a checkpoint) did not run for that step; meta.json says so.
        recording.notes.append(STOPPED_INSIDE_NOTE)
    except StopScript:
        notes.append(f"stopped {path.name} after {max_steps} steps (--stop-script)")
    except (KeyboardInterrupt, Terminated) as exc:  # Terminated is a SystemExit: first
        recording.close("interrupted", exc)
        raise
    except SystemExit as exc:
        status = exit_status(exc.code)
        if status != 0:
            when = _steps(recording)
            recording.close("failed", exc)
            raise ScriptError(
                f"{path.name} called sys.exit({exc.code!r}) {when}",
                hint=f"its exit status {status} is passed through; what was recorded is kept "
                f"in {out}",
                exit_code=status,
            ) from None
        # Success, as Python reads it (``sys.exit(main())`` with main() returning None): the
        # end of the script's training, as a return is.
        ending = f"called sys.exit({exc.code!r})"
        returned = True
        if recording.steps_marked:
            recording.notes.append(f"{path.name} {ending} {_steps(recording)}: taken as its end")
    except UsageError as exc:  # stabscope's own refusal (e.g. --include matching nothing)
        recording.close("failed", exc)
        raise
    except Exception as exc:
        when = _steps(recording)
        recording.close("failed", exc)
        failure = script_failure(path, exc, f"training ({when})")
        first = _failed_first_elsewhere(recording)
        if first is not None:  # this rank's error is the knock-on of another rank's
            failure = ScriptError(
                f"rank {first.get('rank')} failed first: {first.get('type')}: "
                f"{first.get('message')}; then {failure.message}",
                failure.hint,
            )
        raise failure from exc
    _require_steps(recording, path, ending)
    recording.close("complete", script_ended=returned)
    rec = recording.recorder
    if rec is None:  # stabscope's own error before the model was found (tool_fault.py)
        return TrainingScriptResult(
            run_dir=recording.out,
            steps=0,
            recorded_steps=0,
            seconds=time.perf_counter() - start,
            last_loss=None,
            notes=notes,
        )
    # Said on the terminal too: without it the forecast lacks the stability index.
    notes += [n for n in recording.notes if n.startswith(TAIL_NOTE)]
    return TrainingScriptResult(
        run_dir=rec.run_dir,
        steps=rec.step_index,
        recorded_steps=RunMeta(rec.meta).recorded_steps,
        seconds=time.perf_counter() - start,
        last_loss=rec.last_loss,
        notes=notes,  # the recording's own notes are in meta.json
        stopped_by=rec.stopped_by if rec.meta.get("status") == "stopped" else None,
    )


def _failed_first_elsewhere(recording: ScriptRecording) -> dict[str, Any] | None:
    """Under torchrun: another rank's error that came before this rank's (rank 0 took it
    into meta.json as the run's error when it closed; store/rank_errors.py), or None."""
    rec = recording.recorder
    error = rec.meta.get("error") if rec is not None else None
    if not isinstance(error, dict) or error.get("rank") in (None, rank()):
        return None
    return error


def _steps(recording: ScriptRecording) -> str:
    """How far the script got, read before the run is closed for its failure. Once
    ``--max-steps`` (or a stop the script caught) closed the recording, its steps are no
    longer counted: say where the recording ended, so a raise at step 12 does not read as
    "after 5 steps"."""
    rec = recording.recorder
    if not recording.closed or rec is None:
        return "after " + counted(recording.optimizer_steps, "optimizer step")
    status = rec.meta.get("status", "complete")
    return f"after the recording ended at step {rec.step_index}; that run is {status}"


def _require_steps(recording: ScriptRecording, path: Path, ending: str) -> None:
    """A script that ended without a single step is bad input: say why, close as failed.
    Not where stabscope's own error stopped the recording first (tool_fault.py): the script
    is fine, and the run says what happened."""
    if recording.steps_marked or recording.tool_error is not None:
        return
    # A file that built no optimizer may have been meant as a model script: say both readings.
    missing = [] if recording.optimizers.constructed else missing_entry_points(path)
    what = f"{path.name} "
    if missing:  # read both ways: a model script lacks these, a training script did this
        what = f"{path.name} is no model script (it does not define {', '.join(missing)}); as a "
        what += "training script it "
    if recording.optimizer_steps == 0:
        problem = UsageError(
            f"{what}{ending} without calling optimizer.step() of a torch.optim optimizer: "
            "nothing was recorded",
            hint="stabscope marks each training step at optimizer.step(): an update written by "
            "hand (p -= lr * p.grad) is not seen; use torch.optim.SGD for it, or record the "
            "loop with the Python API (Recorder, rec.step(loss) each step; README); one "
            "that trains in processes it starts itself "
            "(torch.multiprocessing.spawn) is profiled under torchrun (`torchrun "
            "--nproc_per_node=N -m stabscope profile ...`); a model script defines model(cfg), "
            "batches(cfg) and loss(model, batch) (README: Model scripts)",
        )
    elif recording.loose_pending:
        problem = UsageError(
            f"{what}{ending} after {recording.optimizer_steps} optimizer step, over tensors no "
            "module holds: nothing was recorded",
            hint="such tensors (raw tensors, parameters stacked for vmap) are recorded from "
            "the second optimizer step on (docs/zero-code.md, Tensors no module holds); "
            "train for two steps or more",
        )
    else:
        called = recording.untrained_calls()
        trains = (
            f": the optimizer trains none of {called}, which the script called" if called else ""
        )
        # A training that steps nothing it runs: exit 1 where it called a trained module
        # (its own fault), 2 where it called none (bad input: no model to record).
        error = TrainingError if called else UsageError
        problem = error(
            f"{what}{ending} after calling optimizer.step() {recording.optimizer_steps} times, "
            f"but no module it called holds the optimizer's parameters{trains}; nothing was "
            "recorded",
            hint="stabscope records the first module, called from the script, whose parameters "
            "an optimizer trains (docs/zero-code.md); an optimizer built over a copy of the "
            "model (an EMA or a teacher: `copy.deepcopy(model)`), or before a reload, steps "
            "parameters the script never calls: build it over the model's own",
        )
    recording.close("failed", problem)
    raise problem
