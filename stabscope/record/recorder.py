"""The Recorder: lifecycle, step boundaries and the one host sync per recorded step.

    with stabscope.Recorder(model, out="runs/mine") as rec:
        for batch in data:
            loss = train_step(batch)   # forward, backward, optimizer.step()
            rec.step(loss=loss)        # marks the end of the step

Hooks are attached only for recorded steps (see ``Schedule``); between them the model carries
no hooks at all. Optimizer steps are seen through the global optimizer step hooks, filtered to
optimizers that own this model's parameters, so no optimizer needs to be passed in.

The recorder's parts: ``lifecycle`` (opening and closing the run), ``probe_wiring`` (the
probes, built from the registry), ``run_meta`` (meta.json), ``optimizers`` (owned optimizers
and their lr), ``losses`` (the loss of every step); this module drives the step boundary.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import OptionError
from ..export.destinations import Target, check_targets
from ..probes.base import ProbeContext
from ..probes.structured import StructureProbes
from ..store import RUN_MODULE, PartWriter, interrupts
from ..store import lock as locks
from ..store.atomic import RESERVE_FILE, SpaceReserve
from ..store.findings import Finding
from ..store.meta_check import INPUT_GRADIENT
from ..store.rundir import RunExistsError, RunLockedError, keyword_hint, prepare_run_dir
from ..structure import Structure, capture, from_trace
from . import model_samples
from .collector import Collector, Rows
from .config import RecorderConfig, keyword_names, with_options
from .constant_loss import READ_FIELDS
from .distributed import prepare_on_rank0
from .distributed import rank as _rank
from .hooks import ModuleHooks
from .lifecycle import RunLifecycle
from .live import LiveBridge, live_targets
from .log_prob_dim import wrong_log_softmax_dim
from .loss_broadcast import loss_broadcast
from .loss_function import UNKNOWN, loss_function
from .losses import PendingLosses, nonfinite_on_host
from .lr_plan import LrPlanner
from .model_changes import ParameterMembership
from .module_table import scripted_note, select_modules, select_parameters
from .optim_closure import after_first_call, closure_of
from .optimizers import OptimizerWatch
from .probe_wiring import ProbeWiring
from .run_meta import MetaWriting, error_entry, initial_meta
from .schedule import Schedule
from .squashed_logits import squashed_logits
from .step_norms import StepNorms
from .tool_faults import FAULTS, catching, guarded
from .verdicts import VerdictActions, check_on_error


class Recorder(RunLifecycle, ProbeWiring, MetaWriting, VerdictActions):
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
        on_finding: Callable[[Finding], Any] | None = None,
        on_error: str = "warn",
        log_to: Any = None,
        **options: Any,
    ) -> None:
        """``options``: any field of ``RecorderConfig`` (``part_rows=3000``), over ``config``."""
        if not isinstance(model, nn.Module):
            raise OptionError(
                f"Recorder records an nn.Module, got {type(model).__name__}",
                hint="pass the model itself: stabscope.Recorder(model, 'runs/mine')",
            )
        check_on_error(on_error)  # before the run directory is touched
        schedule = _schedule_value(schedule)
        self.forward = forward
        self.structure = structure
        # The planned lr curve (meta.json's lr_plan), when a scheduler or a budget is given.
        planned = schedulers is not None or budget is not None
        planner = LrPlanner(schedulers, budget) if planned else None
        self.optimizer_watch = OptimizerWatch(
            {id(p) for p in model.parameters()},
            planner,
            live_ids=lambda: {id(p) for p in model.parameters()},
        )
        self._plan_at_optimizer_step = False  # start() came after this step's optimizer step
        cfg = (config or RecorderConfig()).replace(
            preset=preset,
            include=tuple(include) if include is not None else None,
            exclude=tuple(exclude) if exclude is not None else None,
            schedule=schedule,
        )
        cfg = with_options(cfg, options, "Recorder", keyword_names(Recorder.__init__))
        targets = live_targets(cfg.log_to, log_to)
        # before the directory too
        check_targets([getattr(t, "spec", t) for t in targets if isinstance(t, (str, Target))])
        self.config = cfg
        self.model = model
        self.rank = _rank()
        # Rank 0 takes the directory's lock (or this process's claim from `profile`) here and
        # keeps it until close(); the other ranks write their parts under it.
        try:
            prepared = prepare_on_rank0(out, lambda: prepare_run_dir(out, force))
            # Absolute: a script that changes its working directory (Hydra's
            # ``hydra.job.chdir``) keeps writing here.
            self.run_dir = Path(os.path.abspath(prepared))
        except RunExistsError as err:  # one line with the force hint, not a chain
            raise keyword_hint(err) from None
        self.live: LiveBridge | None = None
        try:
            self._setup(model, cfg, run_info)
            notes = self._setup_verdicts(on_finding, on_error, self.meta["world_size"])
            self.meta["notes"] += notes
            self.live = LiveBridge(self, targets, cfg.live_max_series) if targets else None
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
        self.writer = PartWriter(
            self.run_dir, self.rank, cfg.part_rows, cfg.flush_seconds, keep_going=True
        )
        self.writer.on_write_error = self._on_write_error
        self._write_warned = False
        self.rows = Rows(self.writer)
        self.collector = Collector()
        self.every_collector = Collector()  # the flight recorder's transfers
        self.every: dict[str, Any] = {}  # probes of stage "every", once the structure is known
        self.step_index = 0
        self.first_nonfinite: dict[str, dict[str, Any]] = {}
        self._optimizer_hooks: list[Any] = []
        self._closed = False
        self._started = False
        self.structure_probes: StructureProbes | None = None
        self._capture: Any = None  # trace of the first recorded step when no forward is given
        self._trace: Any = None
        self._sync_seconds = 0.0
        self._recorded_steps = 0
        self._recorded_through = 0  # 1 + the last step whose rows were flushed
        self.host_syncs = 0  # device->host transfers so far: one per recorded step per device

        modules = select_modules(model, cfg.include, cfg.exclude)
        params = select_parameters(model, cfg.include, cfg.exclude)
        self._module_names = [name for name, _ in modules]
        mod_codes = [(self.writer.modules(name), m) for name, m in modules]
        self._module_codes = [c for c, _ in mod_codes]
        param_codes = [(self.writer.modules(name), p) for name, p in params]
        self._run_code = self.writer.modules(RUN_MODULE)
        self.losses = PendingLosses(self._run_code)
        # Gradient norms before/after clipping and block update norms, every step.
        self.step_norms = StepNorms(select_parameters(model), self._run_code, cfg.step_updates)
        self._membership = ParameterMembership(model)  # a block replaced mid-run
        self._input_steps: set[int] = set()  # steps that moved inputs by their gradient
        self._step_constant: torch.Tensor | None = None  # this step's loss_constant
        # What every probe is built from (the registry, ``stabscope.probes``).
        context = ProbeContext(
            model=model,
            config=cfg,
            names=self.writer.modules,
            params=param_codes,
            run_code=self._run_code,
            forward=self.forward,
            on_nonfinite=self._note_nonfinite,
            # The step being run, for a probe whose reading spans a boundary (parameters.py).
            shared={"departed_params": self._membership.departed, "step": lambda: self.step_index},
        )
        self._build_core_probes(context)
        self._forward_order: dict[int, int] = {}
        self._output_dtypes: dict[int, str] = {}
        self.hooks = ModuleHooks(
            mod_codes,
            on_forward=self._on_forward,
            on_grad=self.activations.on_grad if cfg.grads else None,
            record_eval=cfg.record_eval,
        )
        self.meta = initial_meta(model, cfg, run_info, self.rank, modules, params)
        if (note := scripted_note(model)) is not None:
            self.meta["notes"].append(note)
        self._table_params = params  # the parameters of meta.json's table, in its order
        # (parameters the owned optimizers held, their ids) when last marked
        self._held: tuple[int, tuple[int, ...]] = (-1, ())

    @property
    def last_loss(self) -> float | None:
        """The newest loss readable without a device sync: the last step's when its loss is
        in host memory (CPU), else that of the last step synced (the progress bar's)."""
        return self.losses.latest

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
            if FAULTS.error is None:  # stabscope's own error stopped the recording
                with catching("a step boundary"):
                    self._step(loss)
        # Not under the guard: the user's on_finding may raise to stop the training.
        self._judge_step()  # the online rules' verdicts (record/verdicts.py)

    def begin_phase(self, step: int, optimizers: list[str]) -> None:
        """A new training phase from ``step`` on: new optimizers (``optimizers``, their class
        names) took over from the phase before, over other parameters (meta.json's
        ``phases``; the rules judge the last phase, ``RunMeta.phase_start``). Zero-code
        mode calls it where it sees the optimizers change; a script may call it itself."""
        phases = self.meta.setdefault("phases", [{"step": 0}])
        if step <= phases[-1]["step"]:
            return
        phases.append({"step": int(step), "optimizers": list(optimizers)})
        self.meta["notes"].append(
            f"a new training phase began at step {step}: {', '.join(optimizers)} took over "
            "from the optimizers before it, over other parameters (a fine-tune after a "
            f"pretraining in one script); the rules judge the run from step {step}"
        )
        self._save_meta()

    def note_loss_function(self, loss: torch.Tensor) -> None:
        """Read which loss function ``loss`` is from its graph, once (meta.json's
        ``loss_function``; record/loss_function.py). Zero-code mode hands over the loss of
        the first backward, before any scaling or division; ``step(loss)`` the step's."""
        if "loss_function" in self.meta or getattr(loss, "grad_fn", None) is None:
            return
        broadcast = loss_broadcast(loss)  # where the graph still holds what it saved
        if broadcast is not None:
            self.meta["loss_broadcast"] = broadcast
        squashed = squashed_logits(loss)
        if squashed is not None:
            self.meta["squashed_logits"] = squashed
        misnormalised = wrong_log_softmax_dim(loss)
        if misnormalised is not None:
            self.meta["log_softmax_dim"] = misnormalised
        read = loss_function(loss)
        if read is not None:  # always, for a loss with a graph
            self.meta["loss_function"], classes = read
            if classes is not None:
                self.meta["loss_classes"] = classes

    def note_constant_loss(self, read: torch.Tensor) -> None:
        """The loss a constant prediction scores on this step's targets, and their moments
        (``constant_read``'s ``(4,)`` tensor on the loss's device laid out as
        ``READ_FIELDS``, or ``constant_loss``'s 0-d bar alone; record/constant_loss.py): the
        step's ``loss_constant`` and ``target_*`` rows, written with its loss. Zero-code
        mode reads it from the loss's graph before its backward."""
        read = read.detach().reshape(-1).float()
        if read.numel() == 1:  # constant_loss's bar alone: no moments to pool it with
            read = torch.cat(
                [read, torch.full((len(READ_FIELDS) - 1,), math.nan, device=read.device)]
            )
        self._step_constant = read

    def _decode_constant(self, values: np.ndarray, rows: Rows, step: int) -> None:
        if np.isfinite(values[0]):  # NaN: this step's bar could not be read (no row)
            rows.emit("train", self._run_code, 0, READ_FIELDS[0], values[0], step=step)
            self.losses.synced_bar(step, float(values[0]))  # for the loss checks
        if np.isfinite(values[1:]).all():  # NaN: a loss without target moments
            for name, value in zip(READ_FIELDS[1:], values[1:]):
                rows.emit("train", self._run_code, 0, name, value, step=step)

    def _read_loss_function(self, loss: torch.Tensor | float) -> None:
        """The first step's loss: its loss function from its graph, or ``unknown`` where it
        came without one (a float, a detached tensor)."""
        if isinstance(loss, torch.Tensor):
            self.note_loss_function(loss)
        self.meta.setdefault("loss_function", UNKNOWN)

    def _step(self, loss: torch.Tensor | float | None) -> None:
        step = self.step_index
        FAULTS.step = step
        if loss is not None:
            if "loss_function" not in self.meta:
                self._read_loss_function(loss)
            self.losses.add(step, loss)
            if self.verdicts is not None and not self._loss_nonfinite and nonfinite_on_host(loss):
                # Already in host memory (no device sync): write the losses now, so that this
                # step's boundary judges the run (``_judge_step``) and can stop it here.
                self.host_syncs += self.losses.sync(self.rows)
        for values, decode in self.step_norms.take():
            self.losses.add_values(step, values, decode)
        if self._step_constant is not None:
            self.losses.add_bar(step, self._step_constant, self._decode_constant)
            self._step_constant = None
        self.optimizer_watch.record_lr(self.rows, self._run_code, step)
        if self.hooks.attached:
            self._finish_recorded_step(step)
        elif self.losses.full:
            self.host_syncs += self.losses.sync(self.rows)
        self._every_boundary(step)
        if self.sharpness is not None:
            self._measure_sharpness(step)
        self.step_index += 1
        FAULTS.step = self.step_index  # the next step's hooks run in it
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

    def _finish_recorded_step(self, step: int) -> None:
        t0 = time.perf_counter()
        for probe in self.core.values():
            probe.end_step(self.collector)
        if self.structure_probes is not None:
            self.structure_probes.end_step(self.collector)
        self.hooks.end_step()
        self.losses.add_to(self.collector)
        self.rows.step = step
        self.host_syncs += self.collector.sync(self.rows)  # the one host sync of this step
        self.rows.flush_to_writer()
        if self.writer.parts_written == 0:
            self.writer.flush()  # the first recorded step is on disk at once
        self._recorded_steps += 1
        self._recorded_through = step + 1
        self._sync_seconds += time.perf_counter() - t0
        if self._capture is not None:
            self._stop_capture()
            self.structure = from_trace(self.model, self._trace)
            self._trace = None
            self._build_structure_probes()
            self._save_meta()

    # -- hook targets ------------------------------------------------------------------------
    def _on_forward(self, phase: int, code: int, call: int, output: torch.Tensor) -> None:
        if code not in self._forward_order:
            self._forward_order[code] = len(self._forward_order)
            # What the module computes in (autocast's float16, a bf16 model): the nonfinite
            # rule's remedy differs for an overflow of float16 and of float32.
            self._output_dtypes[code] = str(output.dtype).removeprefix("torch.")
        self.activations.on_forward(phase, code, call, output)

    def _plan_lr(self) -> bool:
        """Put the planned lr curve in meta.json once an optimizer is known; whether it did."""
        plan = self.optimizer_watch.plan(self.step_index)
        if plan is not None:
            self.meta["lr_plan"] = plan
        return plan is not None

    @guarded("a draw from the model's outputs")  # runs inside the script's sampling call
    def _on_model_sample(self, function: str, step: int | None = None) -> None:
        """The script drew from a distribution its model output (``model_samples``): once,
        in meta.json (``samples_model``, saved now for the rules judging while it trains)."""
        if "samples_model" not in self.meta:
            first = self.step_index if step is None else step
            self.meta["samples_model"] = {"function": function, "step": first}
            self._save_meta()

    @guarded("a torch.autograd.grad call")  # runs inside the script's call, before it
    def _on_grad_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A ``torch.autograd.grad`` call that moves inputs along the model's gradient
        (``model_samples.input_gradient_step``: Langevin sampling, adversarial examples), seen
        at two steps (once is a look, a saliency map for a log): ``samples_model``."""
        if "samples_model" in self.meta or not model_samples.input_gradient_step(args, kwargs):
            return
        self._input_steps.add(self.step_index)
        if len(self._input_steps) >= 2:
            self._on_model_sample(INPUT_GRADIENT, min(self._input_steps))

    @guarded("an optimizer step's start")
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kw: Any) -> Any:
        if not self.optimizer_watch.owns(optimizer):
            return None
        # An optimizer not yet in meta.json: new, or first seen at the end of a step that
        # began before the run did (a model first called inside LBFGS's closure).
        new = (self.meta.get("optimizers") or []) != self.optimizer_watch.settings
        if new:  # its settings
            self.meta["optimizers"] = list(self.optimizer_watch.settings)
        # Which parameters the owned optimizers hold: again whenever their count changes
        # (``add_param_group`` when a frozen part is released) or an owned optimizer is new (a
        # block replaced by one of the same shape, and the optimizer rebuilt for it).
        held = self.optimizer_watch.holding()
        regrouped = held != self._held
        if regrouped:
            self._held = held
            changed = self._membership.update(
                self.model,
                self.meta["parameters"],
                self._table_params,
                self.optimizer_watch.held(),
                self.step_index,
            )
            if changed is not None:
                self.meta["notes"].append(changed)
        if self._plan_lr() or new or regrouped:
            self._save_meta()
        self.optimizer_watch.note_lrs(optimizer)
        recorded = self.hooks.attached

        @guarded("an optimizer step's start")  # also inside the user's closure
        def measure() -> None:
            self._every_check()  # gradients in place, weights as the step's forward used them
            every = self.config.step_updates_every
            self.step_norms.before_optimizer_step(
                optimizer, updates=recorded or self.step_index % every == 0
            )
            if recorded:
                for probe in self.core.values():
                    probe.before_optimizer_step(optimizer)

        if closure_of(args, kw) is None:
            measure()
            return None
        # The closure computes this step's gradients (and may clip them): measure after it.
        return after_first_call(args, kw, measure)

    @guarded("an optimizer step's end")
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kw: Any) -> None:
        if self.optimizer_watch.owns(optimizer):
            # A step that began before the run did has no lr noted yet: the lr it used is
            # still in its groups (a scheduler steps after optimizer.step() returns).
            self.optimizer_watch.note_lrs(optimizer, unless_noted=True)
            self.step_norms.after_optimizer_step(optimizer)
        if self.optimizer_watch.owns(optimizer) and self.hooks.attached:
            for probe in self.core.values():
                probe.after_optimizer_step(optimizer)
            if self.structure_probes is not None:
                self.structure_probes.after_optimizer_step(optimizer)


def _schedule_value(schedule: Any) -> Schedule | None:
    """A ``Schedule``, or its text (``"dense=10,every=25"``, as the CLI's ``--schedule``)."""
    if schedule is None or isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        try:
            return Schedule.parse(schedule)
        except ValueError as err:
            raise OptionError(str(err), hint="schedule=Schedule(dense=10, every=25)") from None
    raise OptionError(
        f"schedule takes a Schedule or its text, got {type(schedule).__name__}",
        hint="schedule=Schedule(dense=10, every=25) or schedule='dense=10,every=25'",
    )


__all__ = ["Recorder", "RunExistsError", "RunLockedError", "error_entry", "prepare_run_dir"]
