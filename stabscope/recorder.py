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

import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .collector import Collector, Rows
from .config import RecorderConfig
from .distributed import distributed_info, prepare_on_rank0
from .distributed import rank as _rank
from .distributed import world_size as _world_size
from .hooks import ModuleHooks
from .module_table import (
    module_table,
    parameter_table,
    select_modules,
    select_parameters,
)
from .optim_closure import after_first_call, closure_of
from .probes import host_kernels
from .probes.activations import ActivationProbe
from .probes.attention import AttentionSampling
from .probes.parameters import ParameterProbe
from .probes.structured import StructureProbes
from .schedule import Schedule
from .store import RUN_MODULE, PartWriter, new_meta, save_meta
from .store.schema import META_FILE, PARTS_DIR
from .structure import Structure, capture, discover, from_trace

#: Losses of unrecorded steps wait on the device; past this many they are synced anyway.
_MAX_PENDING_LOSSES = 1024


def error_entry(error: BaseException) -> dict[str, Any]:
    """The ``error`` entry of meta.json for a run that ended with ``error``."""
    return {
        "type": type(error).__name__,
        "message": str(error),
        "traceback": traceback.format_exception(type(error), error, error.__traceback__)[-6:],
    }


class RunExistsError(FileExistsError):
    """The output directory already holds a run."""


def prepare_run_dir(out: str | os.PathLike[str], force: bool) -> Path:
    """Create ``out`` for a new run; refuse to overwrite an existing run unless ``force``."""
    path = Path(out)
    if (path / META_FILE).exists() or (path / PARTS_DIR).exists():
        if not force:
            raise RunExistsError(f"{path} already holds a run")
        (path / META_FILE).unlink(missing_ok=True)
        shutil.rmtree(path / PARTS_DIR, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable")
    return path


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
    ) -> None:
        cfg = (config or RecorderConfig()).replace(
            preset=preset,
            include=tuple(include) if include is not None else None,
            exclude=tuple(exclude) if exclude is not None else None,
            schedule=schedule,
        )
        self.config = cfg
        self.model = model
        self.rank = _rank()
        self.run_dir = prepare_on_rank0(out, lambda: prepare_run_dir(out, force))
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
        self.forward = forward
        self.structure = structure
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
        self._param_codes = param_codes
        self._forward_order: dict[int, int] = {}

        self.activations = ActivationProbe(grads=cfg.grads, on_nonfinite=self._note_nonfinite)
        self.hooks = ModuleHooks(
            mod_codes,
            on_forward=self._on_forward,
            on_grad=self.activations.on_grad if cfg.grads else None,
            record_eval=cfg.record_eval,
        )
        self.parameters = ParameterProbe(param_codes, updates=cfg.grads, full=cfg.preset == "full")
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

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close("complete")
        else:
            self.close("failed", error=exc)

    def start(self) -> Recorder:
        """Write meta.json (status ``running``), register optimizer hooks, arm step 0."""
        if self._started:
            return self
        self._started = True
        if self.structure is None and self.forward is not None:
            self.structure = discover(self.model, self.forward)
        if self.structure is not None:
            self._build_structure_probes()
        self._save_meta()
        self._optimizer_hooks = [
            register_optimizer_step_pre_hook(self._before_optimizer_step),
            register_optimizer_step_post_hook(self._after_optimizer_step),
        ]
        self._arm(self.step_index)
        return self

    def close(self, status: str = "complete", error: BaseException | None = None) -> None:
        """Remove every hook, write what is left, and finish meta.json. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop_capture()
        if self.structure_probes is not None:
            self.structure_probes.detach()
        self.hooks.detach()
        self.parameters.release()
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks.clear()
        try:
            # A step that was started but never marked is discarded, not half-written.
            self.collector.clear()
            self._sync_losses()
            self.rows.flush_to_writer()
            self.writer.flush()
        finally:
            self.meta["status"] = status
            self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if error is not None:
                self.meta["error"] = error_entry(error)
            self._save_meta()

    # -- steps -------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Mark the end of the current step; ``loss`` is recorded for every step."""
        if self._closed:
            raise RuntimeError("Recorder.step() after close()")
        if not self._started:
            self.start()
        step = self.step_index
        if loss is not None:
            value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
            self._pending_losses.append((step, value.reshape(())))
        self._record_lr(step)
        if self.hooks.attached:
            self._finish_recorded_step(step)
        elif len(self._pending_losses) >= _MAX_PENDING_LOSSES:
            self._sync_losses()
        self.step_index += 1
        self.meta["steps"] = self.step_index
        self._arm(self.step_index)

    @property
    def recording(self) -> bool:
        """Whether the current step is being recorded."""
        return self.hooks.attached

    def _arm(self, step: int) -> None:
        probes = self.structure_probes
        if self.config.schedule.is_recorded(step):
            self.parameters.begin_step(self.collector)
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
        cfg = self.config
        self.structure_probes = StructureProbes(
            self.model,
            self.structure,
            self.writer.modules,
            self._param_codes,
            standard=cfg.preset != "cheap" and cfg.structure_probes,
            model_update=cfg.wants_model_update,
            forward=self.forward,
            module_hooks=self.hooks,
            sampling=AttentionSampling(cfg.attn_batch, cfg.attn_queries),
        )
        self.meta["structure"] = self.structure.to_dict()
        self.meta["notes"] = [*self.structure.notes, *self.structure_probes.notes]

    def _finish_recorded_step(self, step: int) -> None:
        t0 = time.perf_counter()
        self.activations.end_step(self.collector)
        self.parameters.end_step(self.collector)
        if self.structure_probes is not None:
            self.structure_probes.end_step(self.collector)
        self.hooks.end_step()
        self._add_losses_to(self.collector)
        self.rows.step = step
        self.host_syncs += self.collector.sync(self.rows)  # the one host sync of this step
        self.rows.flush_to_writer()
        self._recorded_steps += 1
        self._sync_seconds += time.perf_counter() - t0
        if self._capture is not None:
            self._stop_capture()
            self.structure = from_trace(self.model, self._trace)
            self._trace = None
            self._build_structure_probes()
            self._save_meta()
        if self.writer.parts_written != self.meta["parts"]:
            self._save_meta()

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

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kw: Any) -> Any:
        if not self._owns(optimizer):
            return None
        self._step_lrs[id(optimizer)] = [_group_lr(g) for g in optimizer.param_groups]
        if self.hooks.attached:
            if closure_of(args, kw) is None:
                self.parameters.before_optimizer_step(optimizer)
            else:  # the closure computes this step's gradients: measure after it
                return after_first_call(
                    args, kw, lambda: self.parameters.before_optimizer_step(optimizer)
                )
        return None

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kw: Any) -> None:
        if self._owns(optimizer) and self.hooks.attached:
            self.parameters.after_optimizer_step(optimizer)
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


__all__ = ["Recorder", "RunExistsError"]
