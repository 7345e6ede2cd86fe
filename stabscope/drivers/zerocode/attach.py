"""Following a running training script: find its model, mark its steps, drive a Recorder.

The rules (also in docs/zero-code.md):

- **The model** is the first *root call* (a module called from outside any other module, see
  roots.py) whose parameters include a parameter of a live optimizer. Loss modules and
  helpers without trained parameters are passed over; a DDP or ``torch.compile`` wrapper is
  the root, and the Recorder names modules without the wrapper's prefix. When the live
  optimizers train parameters that module does not hold, the model is completed from the
  live modules (roots.py): the parent whose own call was not seen, and other trained models
  (a GAN's two halves), recorded together as ``TrainedModels``.
- **Steps** come from ``optimizer.step()``. The optimizers that train the model are its
  *owners*; a step ends once every owner has stepped since the last step ended (one
  optimizer: every ``step()``; gradient accumulation: several forward/backward passes, one
  step). An owner that steps twice before another owner stepped at all drops the silent one.
  Optimizer steps before the model was found still count, so step numbers are the script's.
- **The loss** of a step comes from losses.py (the sum of the scalars backward was called on).
- Root calls are watched until the first step ends (long enough to see every module the
  script calls in a step); after that only the optimizer step hooks, the backward wrapper and
  the Recorder's own per-step hooks remain, so unrecorded steps carry no module hook at all.
- **The planned lr** (meta.json's ``lr_plan``): when the model is found, the live torch
  schedulers of its optimizers are stepped forward to ``budget`` and put back (lr_plan.py);
  a scheduler built after the model's first call is not seen.
- **The stability index** replays the model's first training call (its arguments, copied once
  on the model's device) as the probe forward, with the model's own loss (``(logits, loss)``,
  a transformers model given labels) or else the loss the script computed from the output,
  traced through the first step and replayed (probe_loss.py); meta.json notes why not when
  neither is there.
- ``max_steps``: after that many steps the Recorder is closed at the next safe point (the
  next backward call, or the end of the script) and every hook and wrapper is removed, so the
  rest of the script runs untouched; with ``stop_script`` the script is stopped at once by
  ``StopScript`` raised from ``optimizer.step()``.
- ``on_error="stop"``: when an error finding of the online rules arrives at a step boundary,
  ``StopOnFinding`` (a ``StopScript``) is raised from ``optimizer.step()`` the same way, and the
  run closes as ``stopped``. Never while the script is handling an exception of its own: the
  stop waits for the next boundary, so the script's exception is the one that ends it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ...record.config import RecorderConfig
from ...record.hook_context import eager
from ...record.lr_plan import live_schedulers
from ...record.module_table import unwrap_model
from ...record.probe_forward import LOSS_SHARE_KWARGS, FirstTrainingCall
from ...record.recorder import Recorder
from ...record.tool_faults import FAULTS, fault_note, guarded
from ...store import update_meta
from ...store.structure import unrecognised
from .compiled import COMPILE_NOTE, EAGER_NOTE, DynamoCounts, compiled_modules
from .empty_run import write_empty_run
from .loose import LOOSE_NOTE, LOOSE_STRUCTURE, LooseParameters, held_by_no_module
from .losses import LossTap
from .optimizers import OptimizerTracker, StepOwners, parameter_ids, trained_parameter_ids
from .probe_loss import ProbeLoss
from .roots import (
    RootCalls,
    TrainedModels,
    call_unwrapped,
    enclosing_model,
    live_modules,
    other_trained_models,
)
from .scaler_steps import SkippedScalerSteps

#: progress(step_done, total_or_None, last_recorded_loss)
StepProgress = Callable[[int, int | None, float | None], None]


class StopScript(BaseException):
    """Ends the script after ``max_steps`` (a BaseException: ``except Exception`` in the
    script does not swallow it, its ``finally`` blocks still run)."""


CAUGHT_STOP_NOTE = (
    "the script caught the exception that stopped it (--on-error stop) and went on: nothing "
    "after the step that asked to stop was recorded"
)


class StopOnFinding(StopScript):
    """Ends the script at the step boundary where an error finding asked the run to stop
    (``on_error="stop"``)."""


class ScriptRecording:
    """Finds the model of a running training script and records it with a ``Recorder``."""

    def __init__(
        self,
        out: Path,
        config: RecorderConfig,
        run_info: dict[str, Any],
        *,
        max_steps: int | None = None,
        stop_script: bool = False,
        compile_disabled: bool = False,
        budget: int | None = None,
        progress: StepProgress | None = None,
        on_error: str = "warn",
    ) -> None:
        self.out = Path(out)
        self.on_error = on_error
        self.config = config
        self.run_info = run_info
        self.max_steps = max_steps
        self.stop_script = stop_script
        self.compile_disabled = compile_disabled
        self.budget = budget
        self.progress = progress
        self.optimizers = OptimizerTracker()
        self.losses = LossTap(before_backward=self._safe_point)
        self.roots = RootCalls(self._on_root)
        self.recorder: Recorder | None = None
        self.model: nn.Module | None = None
        self.notes: list[str] = []
        self.steps_marked = 0  # step boundaries marked on the Recorder
        self.optimizer_steps = 0  # every optimizer.step() seen, model found or not
        self.done = False  # max_steps reached: close at the next safe point
        self._stop_raised = False  # StopOnFinding was raised (on_error="stop")
        self.closed = False
        self._owners = StepOwners([], set())
        self._steps_before: dict[int, int] = {}  # per optimizer, steps before the model
        self._other_roots: set[int] = set()  # trained root modules outside the model
        # Root modules called with trainable parameters no optimizer held, before the model
        # was found or beside it in the first step (at most 4): what the script trains where
        # its optimizer holds something else, or a model no optimizer trains.
        self._unowned: dict[int, nn.Module] = {}
        # Optimizers that stepped on parameters outside the recorded model once it was
        # found (a second phase's model, a student after its teacher), by id: [class name,
        # steps, the run's step at the first one].
        self._outside: dict[int, list[Any]] = {}
        self._step_optimizers: set[int] = set()  # owners that stepped in this step, by id
        self._hooks: list[Any] = []
        self._probe_batch: FirstTrainingCall | None = None
        self._probe_loss: ProbeLoss | None = None
        self._dynamo = DynamoCounts()
        # Tensors the optimizers step that no module holds (loose.py), to record from the
        # next safe point; looked for once, at the first optimizer step's end.
        self._loose: LooseParameters | None = None
        self._loose_checked = False

    # -- lifecycle ---------------------------------------------------------------------------
    def install(self) -> None:
        """Start watching: optimizer construction, root calls, backward, optimizer steps."""
        self._dynamo = DynamoCounts()
        FAULTS.reset()
        FAULTS.on_fault = self._on_tool_fault
        self.optimizers.install()
        self.losses.install()
        self.roots.install()
        self._hooks += [
            register_optimizer_step_pre_hook(eager(self._step_starts)),
            register_optimizer_step_post_hook(eager(self._count_step)),
            SkippedScalerSteps(lambda: self.optimizer_steps, self._skipped_step),
        ]

    def _remove(self) -> None:
        # Never from inside an optimizer hook: PyTorch iterates the hook dicts while calling.
        if FAULTS.on_fault == self._on_tool_fault:
            FAULTS.on_fault = None
        self.optimizers.remove()
        self.losses.remove()
        self.roots.remove()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._probe_batch is not None:
            self._probe_batch.remove()
        if self._probe_loss is not None:
            self._probe_loss.abandon()

    def close(
        self,
        status: str = "complete",
        error: BaseException | None = None,
        script_ended: bool = False,
    ) -> None:
        """Remove every hook and wrapper, then close the run. Safe to call twice.
        ``script_ended``: the script returned (or exited 0) while this recording was open, so
        its last step is the end of its training (meta.json's ``run.script_ended``)."""
        if self.closed:
            return
        self.closed = True
        self._remove()
        rec = self.recorder
        if rec is None:
            fault = None
            if self.tool_error is not None:
                fault = {"tool_error": self.tool_error}
                self.notes.append(fault_note(self.tool_error))
            write_empty_run(self.out, self.config, self.run_info, self.notes, status, error, fault)
            return
        notes = [*self.notes, *self._outside_notes()]
        untrained = self._untrained_models()
        if untrained:  # read by the no-update rule
            rec.meta["untrained_models"] = untrained
        if self._outside:  # read by the run-status rule: part of the training is not here
            rec.meta["unrecorded_training"] = [
                {"optimizer": name, "steps": steps, "from_step": first}
                for name, steps, first in self._outside.values()
            ]
        if self.losses.steps_without_loss and self.steps_marked:
            notes.append(
                f"no loss for {self.losses.steps_without_loss} of {self.steps_marked} steps: "
                "no backward call on a single scalar was seen in them"
            )
        if self.tool_error is not None:  # the Recorder writes it; its last steps are not
            script_ended = False  # recorded: not the run's end
        ended = {"script_ended": True} if script_ended else {}
        update_meta(rec.meta, notes, run={"dynamo": self._dynamo.since_start(), **ended})
        rec.close(status, error)

    @property
    def tool_error(self) -> dict[str, Any] | None:
        """stabscope's own error that stopped this recording (record/tool_faults.py)."""
        return FAULTS.error

    def _on_tool_fault(self) -> None:
        # Nothing more is recorded; the run closes at the next safe point (a backward).
        self.done = True

    # -- root calls: finding the model -------------------------------------------------------
    def _safe_point(self) -> None:
        # Called where no optimizer hook is running: PyTorch iterates the optimizer hook
        # dicts while calling them, so hooks can only be added or removed out here.
        if self.loose_pending and not self.done:
            self._start_loose()
        if self.done:
            if self._stop_raised and CAUGHT_STOP_NOTE not in self.notes:
                self.notes.append(CAUGHT_STOP_NOTE)
            self.close("complete")

    @guarded("finding the model")
    def _on_root(self, module: nn.Module) -> None:
        if self._probe_loss is not None:
            self._probe_loss.safe_point()
        if self.done:
            self._safe_point()
        elif self.loose_pending:
            self._start_loose()
        elif self.recorder is None:
            self._find_model(module)
        elif module is not self.model:
            self._note_other_root(module)

    def _find_model(self, module: nn.Module) -> None:
        params = parameter_ids(module)
        owners = self.optimizers.training(params) if params else []
        if not owners:
            if len(self._unowned) < 4 and any(p.requires_grad for p in module.parameters()):
                self._unowned.setdefault(id(module), module)
            return
        trained = set().union(*(trained_parameter_ids(o) for o in self.optimizers.alive()))
        if not trained <= params:
            # Part of what the optimizers train is elsewhere: the model's own call was not
            # seen (model.forward(x)), or the script trains several models (a GAN).
            live = live_modules()
            module = enclosing_model(module, trained, live)
            others = other_trained_models(module, trained - parameter_ids(module), live)
            if others:
                module = TrainedModels([module, *others], self.run_info.get("script"))
                self.notes.append(
                    f"{len(others) + 1} trained models recorded as one, under the names "
                    f"{', '.join(module)}; a step ends once every optimizer has stepped, or "
                    "where one steps again before the others did (a critic stepped 5 times per "
                    "generator step makes 5 steps, and --max-steps counts them)"
                )
            params = parameter_ids(module)
            owners = self.optimizers.training(params)
        self._start(module, params, owners)

    @property
    def loose_pending(self) -> bool:
        """Tensors no module holds were found at the first step, and no step came after."""
        return self._loose is not None and self.recorder is None

    def _start_loose(self) -> None:
        module, self._loose = self._loose, None
        assert module is not None
        params = parameter_ids(module)
        self.losses.loose_ids = params
        self.notes.append(LOOSE_NOTE.format(step=max(self._steps_before.values(), default=0)))
        self._start(module, params, self.optimizers.training(params))

    def _start(self, module: nn.Module, params: set[int], owners: list[Optimizer]) -> None:
        self.model = module
        self._owners = StepOwners(owners, params, module)
        compiled = compiled_modules(module)
        if compiled:
            self.notes.append(EAGER_NOTE if self.compile_disabled else COMPILE_NOTE)
        inner = unwrap_model(module)
        self.run_info.update(
            model=" + ".join(type(unwrap_model(m)).__name__ for m in module.values())
            if isinstance(module, TrainedModels)
            else type(inner).__name__,
            wrapper=type(module).__name__ if inner is not module else None,
            compiled_modules=compiled,
            optimizer=", ".join(self._owners.names.values()),
        )
        # Without a budget the plan is "unknown" whatever the schedulers: no scan for them.
        schedulers = live_schedulers() if self.budget is not None else []
        rec = Recorder(
            module,
            self.out,
            self.config,
            run_info=self.run_info,
            schedulers=schedulers,
            budget=self.budget,
            on_error=self.on_error,
            structure=unrecognised(LOOSE_STRUCTURE)
            if isinstance(module, LooseParameters)
            else None,
        )
        # Steps taken before the model was first called keep their numbers.
        before = (self._steps_before.get(k, 0) for k in self._owners.names)
        rec.step_index = max(before, default=0)
        self.losses.clear()
        # Held before it starts: a fault inside start() (tool_faults.py) leaves a run whose
        # lock and handlers the next safe point's close releases.
        self.recorder = rec
        rec.start()
        self.losses.on_first_graph = rec.note_loss_function  # the loss before any scaling
        self.losses.read_constants = True  # each step's loss_constant
        if rec.wants_probe_forward and not isinstance(module, (TrainedModels, LooseParameters)):
            # Registered inside the model's first call: it already sees that call's output.
            self._probe_loss = ProbeLoss(rec.set_probe_forward, self.notes.append)
            self.losses.on_loss = self._probe_loss.loss
            self._probe_batch = FirstTrainingCall(
                module,
                self._probe_loss.captured,
                call=call_unwrapped,
                drop=LOSS_SHARE_KWARGS,
                to_device=True,
                with_output=True,
            )
        # Registered after the Recorder's own step hooks, so that its update ratios of this
        # step are in before the step ends.
        self._hooks.append(register_optimizer_step_post_hook(eager(self._after_step)))

    def _note_other_root(self, module: nn.Module) -> None:
        key = id(module)
        if key in self._other_roots or next(module.parameters(), None) is None:
            return
        params = parameter_ids(module) - self._owners.model_params
        if params and self.optimizers.training(params):
            self._other_roots.add(key)
            self.notes.append(
                f"{type(module).__name__} has parameters an optimizer trains but is not part "
                f"of the recorded model ({type(unwrap_model(self.model)).__name__}, the first "
                "trained module the script called); it is not recorded"
            )
        elif params and len(self._unowned) < 4:  # no optimizer trains it (_untrained_models)
            self._unowned.setdefault(key, module)

    # -- optimizer steps: marking steps ------------------------------------------------------
    @guarded("an optimizer step's start")
    def _step_starts(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.losses.optimizer_step(running=True)
        if self._probe_loss is not None:
            self._probe_loss.safe_point()

    @guarded("an optimizer step's end")
    def _count_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.losses.optimizer_step(running=False)
        self.optimizer_steps += 1
        if self.recorder is None:
            self.optimizers.add(optimizer)  # also optimizers built before install()
            key = id(optimizer)
            self._steps_before[key] = self._steps_before.get(key, 0) + 1
            self.losses.clear()
            if not self._loose_checked:
                self._loose_checked = True
                alive = self.optimizers.alive()
                # A called module whose parameters got gradients that no optimizer holds is
                # what the script trains (an optimizer left on a stale copy): its fault,
                # named at the end (_require_steps). A vmap's meta copy gets none.
                astray = any(graded for _, _, graded in self._unowned_parameters())
                if not astray and held_by_no_module(alive):
                    self._loose = LooseParameters(alive)

    @guarded("a skipped optimizer step")
    def _skipped_step(self, optimizer: Optimizer) -> None:
        """An AMP GradScaler skipped ``optimizer``'s step (Inf/NaN gradients): the iteration
        is a step of the run all the same, with its loss (scaler_steps.py)."""
        if self.recorder is None:  # before the model is known, as a step is (_count_step)
            self.losses.clear()
            return
        self.losses.optimizer_step(running=False)  # its losses are this step's
        if not self.done and self._owners.stepped(optimizer, self.recorder.step_index):
            self._end_step(self.recorder)

    @guarded("a step boundary")
    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self.done or self.recorder is None:
            return
        ended = self._owners.stepped(optimizer, self.recorder.step_index)
        began = self._owners.new_phase()
        if began is not None:
            start, owners = began
            self.recorder.begin_phase(start, [self._owners.names[k] for k in owners])
        if self._owners.repeated:
            # An owner stepped twice while another never did (an optimizer built and never
            # stepped, one whose parameters were frozen): the step had ended at the optimizer
            # step before this one, with the losses up to it.
            self._end_step(self.recorder, upto=self.losses.before_last_step)
            if self.done:
                return
        if self._owners.owns(optimizer):
            self._step_optimizers.add(id(optimizer))
            if ended:
                self._end_step(self.recorder)
        else:
            seen = self._outside.setdefault(
                id(optimizer), [type(optimizer).__name__, 0, self.recorder.step_index]
            )
            seen[1] += 1

    def untrained_calls(self) -> str:
        """The modules the script called whose trainable parameters no optimizer held, with
        how many of those got a gradient: ``UNet (1,204 trainable parameters, 1,204 with a
        gradient no optimizer applied)``; empty where there were none."""
        said = []
        for name, trainable, graded in self._unowned_parameters():
            total, got = (sum(p.numel() for p in ps) for ps in (trainable, graded))
            with_grad = f", {got:,} with a gradient no optimizer applied" if got else ""
            said.append(f"{name} ({total:,} trainable parameters{with_grad})")
        return ", ".join(said)

    def _unowned_parameters(self) -> Iterator[tuple[str, list[nn.Parameter], list[nn.Parameter]]]:
        """For each module of ``_unowned``: its class name, its trainable parameters, and
        those of them with a gradient."""
        for module in self._unowned.values():
            trainable = [p for p in module.parameters() if p.requires_grad]
            graded = [p for p in trainable if p.grad is not None]
            yield type(unwrap_model(module)).__name__, trainable, graded

    def _untrained_models(self) -> list[dict[str, Any]]:
        """The models the script called beside the recorded one, with trainable parameters
        that got a gradient and that no optimizer holds at the end (a GAN's generator whose
        optimizer was built over the discriminator's parameters): their class, their
        trainable values, those with a nonzero gradient, and whether they were in train
        mode. Where an optimizer stepped outside the recorded model, the note on it says
        more than this can: none are listed."""
        if self._outside:
            return []
        found = []
        for module, (name, trainable, graded) in zip(
            self._unowned.values(), self._unowned_parameters()
        ):
            # Parameters of the recorded model are not another model's (a spectral norm's
            # parametrization, called alone when it is registered, holds the weight it norms).
            theirs = {id(p) for p in trainable} - self._owners.model_params
            if not theirs or self.optimizers.ever_held(theirs):
                continue  # the model's own, or an optimizer (maybe freed since) held them
            nonzero = [
                p for p in graded if id(p) in theirs and (p.grad.is_sparse or bool(p.grad.any()))
            ]
            if nonzero:
                found.append(
                    {
                        "class": name,
                        "trainable": sum(p.numel() for p in trainable),
                        "with_grad": sum(p.numel() for p in nonzero),
                        "training": module.training,
                    }
                )
        return found

    def _outside_notes(self) -> list[str]:
        """What trained outside the recorded model, one note per optimizer: a run must not
        read as the whole training when it was one of its models."""
        model = self.run_info.get("model", "the model")
        return [
            f"another optimizer ({name}) stepped {steps} times from step {first} on "
            f"parameters outside the recorded model ({model}): that training is not recorded "
            "(a second model trained after the first, a student after its teacher); to "
            "record it, train it in a script of its own or give it a stabscope.Recorder"
            for name, steps, first in self._outside.values()
        ]

    def _end_step(self, rec: Recorder, upto: int | None = None) -> None:
        """End a step at this step boundary, with the losses seen since the last one (or
        only the first ``upto`` of them: a step that had ended at an earlier optimizer step)."""
        if self._probe_loss is not None and self.steps_marked == 0:
            self._probe_loss.step_ended(self.losses.count if upto is None else upto)
            self.losses.on_loss = None
        if self.losses.backward_after_step and len(self._step_optimizers) > 1:
            # Optimizers stepped between the backward calls of one step, each on its own
            # loss: the step's loss sums several players' (read by loss-divergence).
            rec.meta["players"] = True
        self._step_optimizers = set()
        loss = self.losses.take() if upto is None else self.losses.take_first(upto)
        if self.losses.step_constant is not None:
            rec.note_constant_loss(self.losses.step_constant)
        rec.step(loss=loss)
        self.steps_marked += 1
        if self.steps_marked == 1:
            self.roots.remove()  # module hooks are not iterated here: safe to remove
        if self.progress is not None:
            self.progress(rec.step_index, self.max_steps, rec.last_loss)
        if rec.should_stop and sys.exc_info()[0] is None:
            by = rec.stopped_by or {}
            # Nothing more is recorded, whether the exception ends the script or the script
            # catches it (a bare ``except:`` around its step) and trains on: the run closes at
            # this boundary as `stopped` either way.
            self.done = self._stop_raised = True
            raise StopOnFinding(f"stopped after step {rec.step_index - 1} by {by.get('rule')}")
        if self.max_steps is not None and rec.step_index >= self.max_steps:
            self.done = True
            if self.stop_script:
                raise StopScript(f"stopped after {rec.step_index} steps (--max-steps)")
