"""The Recorder: lifecycle, step boundaries and the one host sync per recorded step.

    with stabscope.Recorder(model, out="runs/mine") as rec:
        for batch in data:
            loss = train_step(batch)   # forward, backward, optimizer.step()
            rec.step(loss=loss)        # marks the end of the step

Hooks are attached only for recorded steps (see ``Schedule``); between them the model carries
no hooks at all. Optimizer steps are seen through the global optimizer step hooks, filtered to
optimizers that own this model's parameters, so no optimizer needs to be passed in.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ..probes import BY_NAME as PROBE_ENTRIES
from ..probes.base import BaseProbe, ProbeContext, build_probes
from ..probes.kernels import host_kernels
from ..probes.structured import StructureProbes
from ..store import RUN_MODULE, PartWriter, interrupts, new_meta, save_meta
from ..store import lock as locks
from ..store.atomic import RESERVE_FILE, SpaceReserve
from ..store.rundir import RunExistsError, RunLockedError, prepare_run_dir
from ..store.schema import META_FILE
from ..structure import Structure, capture, discover, from_trace
from .collector import Collector, Rows
from .config import RecorderConfig
from .distributed import distributed_info, prepare_on_rank0
from .distributed import rank as _rank
from .distributed import world_size as _world_size
from .hooks import ModuleHooks
from .lr_plan import LrPlanner
from .module_table import (
    module_table,
    parameter_table,
    select_modules,
    select_parameters,
)
from .optim_closure import after_first_call, closure_of
from .schedule import Schedule

#: Losses of unrecorded steps wait on the device; past this many they are synced anyway.
_MAX_PENDING_LOSSES = 1024


def error_entry(error: BaseException) -> dict[str, Any]:
    """The ``error`` entry of meta.json for a run that ended with ``error``."""
    return {
        "type": type(error).__name__,
        "message": str(error),
        "traceback": traceback.format_exception(type(error), error, error.__traceback__)[-6:],
    }


class Recorder:
    """Records per-module and per-parameter statistics of ``model`` into a run directory."""

    def __init__(
        self,
        model: nn.Module,
        out: str | os.PathLike[str],
        config: RecorderConfig | None = None,
        *,
        preset: str | None = None,
        include: tuple[str, ...] | list[str] | None = None,
        exclude: tuple[str, ...] | list[str] | None = None,
        schedule: Schedule | None = None,
        force: bool = False,
        run_info: dict[str, Any] | None = None,
        forward: Callable[[nn.Module], Any] | None = None,
        structure: Structure | None = None,
        schedulers: Any = None,
        budget: int | None = None,
    ) -> None:
        self.forward = forward
        self.structure = structure
        # The planned lr curve (meta.json's lr_plan), when a scheduler or a budget is given.
        planned = schedulers is not None or budget is not None
        self._lr_planner = LrPlanner(schedulers, budget) if planned else None
        self._plan_at_optimizer_step = False  # start() came after this step's optimizer step
        cfg = (config or RecorderConfig()).replace(
            preset=preset,
            include=tuple(include) if include is not None else None,
            exclude=tuple(exclude) if exclude is not None else None,
            schedule=schedule,
        )
        self.config = cfg
        self.model = model
        self.rank = _rank()
        # Rank 0 takes the directory's lock (or this process's claim from `profile`) here and
        # keeps it until close(); the other ranks write their parts under it.
        self.run_dir = prepare_on_rank0(out, lambda: prepare_run_dir(out, force))
        try:
            self._setup(model, cfg, run_info)
        except BaseException:
            locks.release(self.run_dir)
            raise
        self._lock = locks.adopt(self.run_dir, self) if self.rank == 0 else None
        # Room for the last meta.json on a disk that fills up (rank 0 writes meta.json).
        self._reserve = SpaceReserve(self.run_dir / RESERVE_FILE) if self.rank == 0 else None
        self._signals = False  # whether start() took the SIGINT/SIGTERM handlers

    def _setup(
        self, model: nn.Module, cfg: RecorderConfig, run_info: dict[str, Any] | None
    ) -> None:
        self.writer = PartWriter(self.run_dir, self.rank, cfg.part_rows, cfg.flush_seconds)
        self.rows = Rows(self.writer)
        self.collector = Collector()
        self.step_index = 0
        self.last_loss: float | None = None
        self.first_nonfinite: dict[str, dict[str, Any]] = {}
        self._pending_losses: list[tuple[int, torch.Tensor]] = []
        self._optimizers: dict[int, torch.optim.Optimizer] = {}
        # Per owned optimizer, its groups' lr at its last step() in the current step.
        self._step_lrs: dict[int, list[float | None]] = {}
        self._optimizer_hooks: list[Any] = []
        self._closed = False
        self._started = False
        self.structure_probes: StructureProbes | None = None
        self._capture: Any = None  # trace of the first recorded step when no forward is given
        self._trace: Any = None
        self._sync_seconds = 0.0
        self._recorded_steps = 0
        self.host_syncs = 0  # device->host transfers so far: one per recorded step per device

        modules = select_modules(model, cfg.include, cfg.exclude)
        params = select_parameters(model, cfg.include, cfg.exclude)
        self._module_names = [name for name, _ in modules]
        self._param_ids = {id(p) for p in model.parameters()}
        mod_codes = [(self.writer.modules(name), m) for name, m in modules]
        self._module_codes = [c for c, _ in mod_codes]
        param_codes = [(self.writer.modules(name), p) for name, p in params]
        self._run_code = self.writer.modules(RUN_MODULE)
        # What every probe is built from (the registry, ``stabscope.probes``).
        self._probe_context = ProbeContext(
            model=model,
            config=cfg,
            names=self.writer.modules,
            params=param_codes,
            run_code=self._run_code,
            forward=self.forward,
            on_nonfinite=self._note_nonfinite,
        )
        self.sharpness: Any = None  # the stability-index probe (stage ``due``), once built
        if self.forward is not None:
            self.set_probe_forward(self.forward)
        self._forward_order: dict[int, int] = {}

        # The probes of stage ``model``: the module moments and the parameter statistics.
        self.core: dict[str, BaseProbe] = build_probes("model", self._probe_context)
        self.activations: Any = self.core["activations"]
        self.hooks = ModuleHooks(
            mod_codes,
            on_forward=self._on_forward,
            on_grad=self.activations.on_grad if cfg.grads else None,
            record_eval=cfg.record_eval,
        )
        self.meta = new_meta(
            config=cfg.to_dict(),
            run=run_info or {},
            rank=self.rank,
            world_size=_world_size(),
            distributed=distributed_info(model, list(model.parameters())),
            model_type=type(model).__name__,
            modules=module_table(modules),
            parameters=parameter_table(params),
            parts=0,
            rows=0,
            steps=0,
            recorded_steps=0,
            first_nonfinite={},
            hooks_never_fired={},
            structure=None,
            notes=[],
            error=None,
        )

    @property
    def wants_probe_forward(self) -> bool:
        """Whether the stability index waits for a probe forward (``set_probe_forward``). Not
        in a run of several processes: each rank's own batch, and DDP's reducer hooks on the
        double backward, would make a rank-local, hook-entangled measurement."""
        wanted = PROBE_ENTRIES["sharpness"]
        return (
            self.sharpness is None
            and wanted.load().wanted(self.config, wanted.tier)
            and (_world_size() == 1)
        )

    def set_probe_forward(self, forward: Callable[[nn.Module], Any]) -> None:
        """Measure the stability index with ``forward`` from now on, unless it has one: for
        callers that have a probe batch only once training runs (the framework callbacks,
        zero-code mode). Structure discovery and the model update keep to ``Recorder(
        forward=...)``: the update's reference is the model before its first step."""
        if self.wants_probe_forward:
            ctx = dataclasses.replace(self._probe_context, forward=forward)
            self.sharpness = build_probes("due", ctx).get("sharpness")

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        try:
            self.start()
        except BaseException as err:  # __exit__ is not called when __enter__ raises
            self.close(interrupts.ending_status(err), error=err)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        # KeyboardInterrupt and SIGTERM close the run as `interrupted`, anything else `failed`.
        self.close(interrupts.ending_status(exc), error=exc)

    def start(self) -> Recorder:
        """Write meta.json (status ``running``), register optimizer hooks, arm step 0.

        Also takes SIGINT and SIGTERM where their handlers are Python's defaults and this is
        the main thread (``store/interrupts.py``), and closes the run at interpreter exit if
        nobody did: a signal, or a script that forgot ``close()``, loses no buffered row."""
        if self._started:
            return self
        self._started = True
        self._signals = interrupts.install()
        atexit.register(self._close_at_exit)
        if self.structure is None and self.forward is not None:
            self.structure = discover(self.model, self.forward)  # a forward: Ctrl-C may stop it
        with interrupts.deferred():
            if self.structure is not None:
                self._build_structure_probes()
            if not self._plan_at_optimizer_step:
                self._plan_lr()
            self._save_meta()
            self._optimizer_hooks = [
                register_optimizer_step_pre_hook(self._before_optimizer_step),
                register_optimizer_step_post_hook(self._after_optimizer_step),
            ]
            self._arm(self.step_index)
        return self

    def close(self, status: str = "complete", error: BaseException | None = None) -> None:
        """Remove every hook, write what is left, and finish meta.json. Safe to call twice.

        ``status`` is ``complete`` only if every row reached the disk: when the last rows
        cannot be written (a full disk) the run is ``failed``, with the write error in
        meta.json (``write_error``, and ``error`` unless another error ended the run), and
        that error is raised here unless another one is already on its way. A signal that
        arrives while closing waits until the run is closed."""
        if self._closed:
            return
        self._closed = True
        with interrupts.deferred():
            self._detach_all()
            write_error = self._write_remaining()
            if write_error is not None:
                status = "failed"
                self.meta["write_error"] = error_entry(write_error)
                error = write_error if error is None else error
            self.meta["status"] = status
            self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if error is not None:
                self.meta["error"] = error_entry(error)
            signum = interrupts.interrupting_signal(error) or interrupts.received()
            if status == "interrupted" and signum is not None:
                self.meta["interrupted_by"] = interrupts.signal_name(signum)
            if self._reserve is not None:
                self._reserve.release()  # its room is for this last meta.json
            try:
                self._save_meta()
            finally:
                self._let_go()
        if write_error is not None and error is write_error:
            raise write_error

    def _detach_all(self) -> None:
        self._stop_capture()
        if self.structure_probes is not None:
            self.structure_probes.detach()
        self.hooks.detach()
        for probe in self.core.values():
            probe.release()
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks.clear()

    def _write_remaining(self) -> BaseException | None:
        """Write every buffered row; the error that stopped it, if any."""
        try:
            # A step that was started but never marked is discarded, not half-written.
            self.collector.clear()
            self._sync_losses()
            self.rows.flush_to_writer()
            self.writer.flush()
        except BaseException as err:
            return err
        return None

    def _let_go(self) -> None:
        """Release the directory's lock and the signal handlers; the run is closed."""
        if self._lock is not None:
            locks.release(self.run_dir, self)
            self._lock = None
        if self._signals:
            interrupts.uninstall()
            self._signals = False
        atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        if interrupts.received() is not None:
            self.close("interrupted")
        else:
            self.close("failed", RuntimeError("the process ended before the run was closed"))

    # -- steps -------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Mark the end of the current step; ``loss`` is recorded for every step."""
        if self._closed:
            raise RuntimeError("Recorder.step() after close()")
        if not self._started:
            # This step's optimizer and scheduler have stepped: plan from the next one's lr.
            self._plan_at_optimizer_step = True
            self.start()
        with interrupts.deferred():  # a signal waits until the step is recorded and counted
            self._step(loss)

    def _step(self, loss: torch.Tensor | float | None) -> None:
        step = self.step_index
        if loss is not None:
            value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
            self._pending_losses.append((step, value.reshape(())))
        self._record_lr(step)
        if self.hooks.attached:
            self._finish_recorded_step(step)
        elif len(self._pending_losses) >= _MAX_PENDING_LOSSES:
            self._sync_losses()
        if self.sharpness is not None:
            self._measure_sharpness(step)
        self.step_index += 1
        self.meta["steps"] = self.step_index
        if self.writer.parts_written != self.meta["parts"]:
            self._save_meta()  # meta.json counts the parts on disk
        self._arm(self.step_index)

    @property
    def recording(self) -> bool:
        """Whether the current step is being recorded."""
        return self.hooks.attached

    def _arm(self, step: int) -> None:
        probes = self.structure_probes
        if self.config.schedule.is_recorded(step):
            for probe in self.core.values():
                probe.begin_step(self.collector)
            self.hooks.attach()
            if probes is not None:
                probes.attach()
            elif self.structure is None and self._capture is None:
                # No probe forward was given: learn the structure from this step's forward.
                self._capture = capture(self.model)
                self._trace = self._capture.__enter__()
        else:
            self.hooks.detach()
            if probes is not None:
                probes.detach()

    def _stop_capture(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None

    def _build_structure_probes(self) -> None:
        assert self.structure is not None
        self.structure_probes = StructureProbes(
            self.model, self.structure, self._probe_context, self.hooks
        )
        self.meta["structure"] = self.structure.to_dict()
        # Notes added before the structure was known (by a caller) are kept after its own.
        self.meta["notes"] = [
            *self.structure.notes,
            *self.structure_probes.notes,
            *self.meta["notes"],
        ]

    def _finish_recorded_step(self, step: int) -> None:
        t0 = time.perf_counter()
        for probe in self.core.values():
            probe.end_step(self.collector)
        if self.structure_probes is not None:
            self.structure_probes.end_step(self.collector)
        self.hooks.end_step()
        self._add_losses_to(self.collector)
        self.rows.step = step
        self.host_syncs += self.collector.sync(self.rows)  # the one host sync of this step
        self.rows.flush_to_writer()
        if self.writer.parts_written == 0:
            self.writer.flush()  # the first recorded step is on disk at once
        self._recorded_steps += 1
        self._sync_seconds += time.perf_counter() - t0
        if self._capture is not None:
            self._stop_capture()
            self.structure = from_trace(self.model, self._trace)
            self._trace = None
            self._build_structure_probes()
            self._save_meta()

    def _measure_sharpness(self, step: int) -> None:
        assert self.sharpness is not None
        listeners = self.structure_probes.listeners if self.structure_probes else None
        pause = (self.hooks, listeners) if listeners is not None else (self.hooks,)
        self.sharpness.measure(step, list(self._optimizers.values()), self.rows, pause)
        if self.sharpness.note is not None and self.sharpness.note not in self.meta["notes"]:
            self.meta["notes"].append(self.sharpness.note)

    def _add_losses_to(self, collector: Collector) -> None:
        if not self._pending_losses:
            return
        steps = np.array([s for s, _ in self._pending_losses], np.int32)
        values = torch.stack(
            [v.to(self._pending_losses[0][1].device) for _, v in self._pending_losses]
        )
        self._pending_losses = []
        run = self._run_code

        def decode(v: np.ndarray, rows: Rows) -> None:
            for s, x in zip(steps, v):
                rows.emit("train", run, 0, "loss", x, step=int(s))
            if len(v):
                self.last_loss = float(v[-1])

        collector.add(values, decode)

    def _sync_losses(self) -> None:
        collector = Collector()
        self._add_losses_to(collector)
        self.host_syncs += collector.sync(self.rows)
        self.rows.flush_to_writer()

    def _record_lr(self, step: int) -> None:
        """The lr each param group's ``optimizer.step()`` used in this step, as read just
        before it (a scheduler stepped after the optimizer has already moved the groups' lr
        on to the next step's). Index: the group's position over all owned optimizers."""
        seen = 0
        for key, opt in self._optimizers.items():
            for i, lr in enumerate(self._step_lrs.get(key, ())):
                if lr is not None:
                    self.rows.emit("train", self._run_code, 0, "lr", lr, index=seen + i, step=step)
            seen += len(opt.param_groups)
        self._step_lrs.clear()

    # -- hook targets ------------------------------------------------------------------------
    def _on_forward(self, phase: int, code: int, call: int, output: torch.Tensor) -> None:
        if code not in self._forward_order:
            self._forward_order[code] = len(self._forward_order)
        self.activations.on_forward(phase, code, call, output)

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        key = id(optimizer)
        if key not in self._optimizers:
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not ids & self._param_ids:
                return False
            self._optimizers[key] = optimizer
        return True

    def _plan_lr(self) -> bool:
        """Put the planned lr curve in meta.json once an optimizer is known; whether it did."""
        if self._lr_planner is None:
            return False
        plan = self._lr_planner.plan(self._optimizers.values(), self.step_index, self._param_ids)
        if plan is not None:
            self.meta["lr_plan"] = plan
            self._lr_planner = None
        return plan is not None

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kw: Any) -> Any:
        if not self._owns(optimizer):
            return None
        if self._plan_lr():
            self._save_meta()
        self._step_lrs[id(optimizer)] = [_group_lr(g) for g in optimizer.param_groups]
        if self.hooks.attached:

            def measure() -> None:
                for probe in self.core.values():
                    probe.before_optimizer_step(optimizer)

            if closure_of(args, kw) is None:
                measure()
            else:  # the closure computes this step's gradients: measure after it
                return after_first_call(args, kw, measure)
        return None

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kw: Any) -> None:
        if self._owns(optimizer) and self.hooks.attached:
            for probe in self.core.values():
                probe.after_optimizer_step(optimizer)
            if self.structure_probes is not None:
                self.structure_probes.after_optimizer_step(optimizer)

    def _note_nonfinite(self, direction: str, code: int, call: int) -> None:
        if direction not in self.first_nonfinite:
            self.first_nonfinite[direction] = {
                "step": self.rows.step,
                "module": self.writer.modules.names[code],
                "call": call,
            }
            self.meta["first_nonfinite"] = self.first_nonfinite
            self._save_meta()

    # -- meta --------------------------------------------------------------------------------
    def _save_meta(self) -> None:
        never = self.hooks.never_fired(self.writer.modules.names) if self._recorded_steps else {}
        self.meta.update(
            parts=self.writer.parts_written,
            rows=self.writer.rows_written,
            recorded_steps=self._recorded_steps,
            hooks_never_fired=never,
            sync_seconds=round(self._sync_seconds, 4),
            host_syncs=self.host_syncs,
            cpu_moments=host_kernels.status(),
        )
        errors = self.structure_probes.errors() if self.structure_probes is not None else []
        if errors:
            self.meta["probe_errors"] = errors
        for code, entry in zip(self._module_codes, self.meta["modules"]):
            entry["forward_order"] = self._forward_order.get(code)
            entry.update(self.hooks.counts(code))
        if self.rank == 0:
            save_meta(self.run_dir, self.meta)
        if self._reserve is not None and not self._closed:
            # Twice meta.json: its temporary copy and the old file coexist for a moment.
            self._reserve.ensure(2 * (self.run_dir / META_FILE).stat().st_size + 65536)


def _group_lr(group: dict[str, Any]) -> float | None:
    """A param group's lr as a float; None for a device tensor (reading it would sync) or
    anything that is not a number (this runs inside the user's ``optimizer.step()``)."""
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor):
        if lr.device.type != "cpu" or lr.numel() != 1:
            return None
        lr = lr.detach().item()
    try:
        return float(lr)
    except (TypeError, ValueError):
        return None


__all__ = ["Recorder", "RunExistsError", "RunLockedError", "prepare_run_dir"]
