"""``stabscope profile``: train a model script for N steps under the Recorder.

The library side of the command: no printing, no exiting. Progress goes to a callback so the
CLI can draw a progress bar; errors in the user's script come back as ``ScriptError``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ScriptError, UsageError
from ..record.config import RecorderConfig
from ..record.constant_loss import constant_read
from ..record.recorder import Recorder
from ..store import update_meta
from ..store.interrupts import Terminated, ending_status
from ..structure import Structure, discover
from .describe_model import write_run_prediction
from .script import ModelScript, script_failure

#: progress(step_done, total, last_recorded_loss)
ProgressFn = Callable[[int, int, float | None], None]


@dataclass
class ProfileResult:
    run_dir: Path
    steps: int
    seconds: float
    last_loss: float | None
    notes: list[str] = field(default_factory=list)
    #: The finding that stopped the run (``on_error="stop"``), as meta.json's ``stopped_by``.
    stopped_by: dict[str, Any] | None = None


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"unknown device {name!r}", hint="use cpu, cuda, cuda:1 or auto") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} is not available here", hint="use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [to_device(b, device) for b in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def planned_budget(steps: int, budget: int | None) -> int:
    """The planned training length of a profile of ``steps`` steps: ``budget``, by default
    ``steps``; bad input when it is shorter than what is profiled."""
    if budget is None:
        return steps
    if budget < steps:
        raise UsageError(
            f"--budget {budget} is less than --steps {steps}",
            hint="--budget is the planned length of the whole training; leave it out to "
            "plan the steps profiled",
        )
    return budget


def build_for_inspection(script: ModelScript, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The script's model on CPU and a forward over its first batch, for structure discovery."""
    seed_everything(seed)
    model = _call(script, "building the model", script.model, script.config)
    batch = _next_batch(
        script,
        iter(_call(script, "creating batches", script.batches, script.config)),
        0,
        torch.device("cpu"),
    )
    if batch is None:
        raise UsageError(
            f"{script.path.name}: batches(cfg) yielded nothing",
            hint="batches(cfg) must yield at least one batch",
        )
    return model, lambda m: script.loss(m, batch)


def _next_batch(script: ModelScript, data: Any, step: int, dev: torch.device) -> Any:
    try:
        return to_device(next(data), dev)
    except StopIteration:
        return None
    except Exception as err:
        raise script_failure(script.path, err, f"producing batch {step}") from err


def _call(script: ModelScript, where: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Terminated:  # SIGTERM, not the script's own sys.exit
        raise
    except SystemExit as err:
        raise ScriptError(
            f"{script.path.name} called sys.exit({err.code}) while {where}",
            hint="model-script functions must return, not exit",
        ) from err
    except Exception as err:
        raise script_failure(script.path, err, where) from err


def step_scheduler(sched: Any, loss: torch.Tensor) -> None:
    """One scheduler step per training step; ReduceLROnPlateau's takes the metric it watches,
    here the step's loss (the only one a model script's loop has)."""
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(float(loss.detach()))
    else:
        sched.step()


def profile_script(
    script: ModelScript,
    out: str | Path,
    steps: int,
    config: RecorderConfig,
    seed: int = 0,
    device: str = "auto",
    force: bool = False,
    progress: ProgressFn | None = None,
    structure: Structure | None = None,
    budget: int | None = None,
    on_error: str = "warn",
) -> ProfileResult:
    """Build the script's model, train it ``steps`` steps under a Recorder, return a summary.
    ``on_error="stop"`` ends training at the step boundary where an error finding of the
    online rules arrives (the run's status is then ``stopped``).
    ``structure`` skips structure discovery (for a model whose wiring was found elsewhere).
    ``budget`` is the planned length of the training (default ``steps``): the scheduler's
    lr is planned that far (meta.json's ``lr_plan``)."""
    if steps < 1:
        raise UsageError(f"--steps must be positive, got {steps}", hint="e.g. --steps 200")
    budget = planned_budget(steps, budget)
    dev = pick_device(device)
    seed_everything(seed)
    cfg = script.config
    model = _call(script, "building the model", script.model, cfg)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"{script.path.name}: model(cfg) returned {type(model).__name__}",
            hint="model(cfg) must return a torch.nn.Module",
        )
    model.to(dev)
    if not model.training:  # e.g. from_pretrained's eval mode: train it as a training loop would
        model.train()  # (a model built in train mode keeps its submodules' own modes)
    if script.optimizer is not None:
        opt = _call(script, "building the optimizer", script.optimizer, model, cfg)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.get("lr", 1e-3)))
    sched = (
        _call(script, "building the scheduler", script.scheduler, opt, cfg)
        if script.scheduler is not None
        else None
    )
    data = iter(_call(script, "creating batches", script.batches, cfg))

    run_info = {
        "script": str(script.path),
        "script_config": dict(cfg),
        "seed": seed,
        "device": str(dev),
        "steps_requested": steps,
        "optimizer": type(opt).__name__,
    }
    start = time.perf_counter()
    first = _next_batch(script, data, 0, dev)
    if first is None:
        raise UsageError(
            f"{script.path.name}: batches(cfg) yielded nothing",
            hint="batches(cfg) must yield at least one batch",
        )

    # The first batch doubles as the probe batch: structure discovery and the model update.
    def forward(m: torch.nn.Module) -> Any:
        return script.loss(m, first)

    # Found once, for the recorder's probes and the theory's prediction alike.
    if structure is None:
        structure = discover(model, forward)
    rec = Recorder(
        model,
        out,
        config,
        force=force,
        run_info=run_info,
        forward=forward,
        structure=structure,
        schedulers=sched,
        budget=budget,
        on_error=on_error,
    )
    try:
        # The theory's profile at init, from the model as built (see docs/theory.md).
        prediction_note = write_run_prediction(model, structure, forward, rec.run_dir, rec.rank)
    except BaseException as err:  # Ctrl-C here: the run is closed and its lock released
        rec.close(ending_status(err), err)
        raise
    with rec:
        if prediction_note:
            update_meta(rec.meta, [prediction_note])
        for step in range(steps):
            batch = first if step == 0 else _next_batch(script, data, step, dev)
            if batch is None:
                # Kept in meta.json, not only printed: `summary`, `report` and `check` of a run
                # shorter than --steps (a one-epoch DataLoader) say why it is.
                update_meta(rec.meta, [f"batches(cfg) ran out after {step} of {steps} steps"])
                break
            opt.zero_grad(set_to_none=True)
            loss = _call(script, f"computing the loss at step {step}", script.loss, model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise UsageError(
                    f"{script.path.name}: loss(model, batch) must return a scalar "
                    f"tensor, got {type(loss).__name__}",
                    hint="return loss.mean()",
                )
            # A NaN loss is data: backward and the optimizer run as they would in training.
            # The optimizer and scheduler are the script's (its own classes, its arguments):
            # an error there is reported as one line, like one in loss or batches.
            rec.note_loss_function(loss)  # once, before backward frees what it saved
            constant = constant_read(loss)
            if constant is not None:
                rec.note_constant_loss(constant)
            loss.backward()
            _call(script, f"stepping the optimizer at step {step}", opt.step)
            if sched is not None:
                _call(script, f"stepping the scheduler at step {step}", step_scheduler, sched, loss)
            rec.step(loss=loss)
            if progress is not None:
                progress(step + 1, steps, rec.last_loss)
            if rec.should_stop:
                break
    return ProfileResult(
        rec.run_dir,
        rec.step_index,
        time.perf_counter() - start,
        rec.last_loss,
        stopped_by=rec.stopped_by if rec.meta.get("status") == "stopped" else None,
    )
