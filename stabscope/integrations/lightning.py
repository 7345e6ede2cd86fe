"""Record a Lightning ``Trainer.fit`` with stabscope::

    from stabscope.integrations.lightning import StabscopeCallback

    trainer = L.Trainer(callbacks=[StabscopeCallback("runs/lit")])
    trainer.fit(model, data)

The LightningModule is recorded from ``on_fit_start`` (after Lightning has set up the process
group and any DDP wrapper, so under DDP every rank records its own parts). One stabscope step
is one optimizer step: with ``accumulate_grad_batches=k``, the k micro-batches of a step are
calls 0..k-1 of each module and the step's loss is their mean. Lightning passes the loss to
``on_train_batch_end`` divided by k (the scale it backpropagates), so it is multiplied back.
Lightning runs the forward and backward pass inside ``optimizer.step(closure)``; the Recorder
reads the gradients after the closure, so they are this step's (see ``optim_closure``).
The planned lr (meta.json's ``lr_plan``) steps the schedulers Lightning steps every optimizer
step (``interval="step"``, ``frequency=1``) to ``trainer.estimated_stepping_batches``; a
scheduler stepped per epoch, or every k steps, or under manual optimization makes it ``unknown``.
The stability index replays ``training_step`` on the first training batch (a copy taken in
``on_train_batch_start``, where Lightning has moved it to the device), with ``self.log`` and
``self.log_dict`` switched off and ``self.training`` False (the probe's eval mode); not under
manual optimization, where ``training_step`` steps the optimizers itself.
``log_to="trainer"`` sends the live series (``stabscope/...``) and findings to the Trainer's
own loggers (integrations/loggers.py); other ``log_to`` targets are the Recorder's.
Under manual optimization ``training_step`` often returns nothing: the batch's loss is then the
sum of the scalars it passed to ``self.manual_backward`` (a GAN's discriminator and generator
losses), as the zero-code driver sums the scalars ``backward`` ran on.
The run is closed on ``on_fit_end``, and marked ``failed`` on ``on_exception`` (``interrupted`` for
Ctrl-C or SIGTERM). With ``on_error="stop"``, an error finding of the online rules sets
``trainer.should_stop`` at the optimizer step it arrives after, and the run is ``stopped``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from ..record.config import RecorderConfig
from ..record.lr_plan import Unplannable
from ..record.probe_forward import Replay, replay_of
from ..record.recorder import Recorder
from ..store import update_meta
from ..store.interrupts import ending_status
from .loggers import LightningLoggers
from .session import RecordingSession

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError(
            "stabscope.integrations.lightning needs Lightning: pip install 'stabscope[lightning]'"
        ) from err


def lightning_plan(trainer: Any, pl_module: Any) -> dict[str, Any]:
    """The Recorder's ``schedulers`` and ``budget`` from the Trainer, at ``on_fit_start``
    (after ``configure_optimizers``): recorded steps count from ``global_step``."""
    try:  # may load the train dataloader, as it may inside configure_optimizers
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # an estimate Lightning cannot make leaves the budget unknown
        total = math.inf
    left = int(total) - trainer.global_step if math.isfinite(total) else 0
    schedulers: list[Any] = []
    for config in getattr(trainer, "lr_scheduler_configs", None) or []:
        name = type(config.scheduler).__name__
        if not getattr(pl_module, "automatic_optimization", True):
            schedulers.append(Unplannable(f"manual optimization steps {name} itself"))
        elif config.interval != "step":
            schedulers.append(Unplannable(f"{name} is stepped per {config.interval}"))
        elif config.frequency != 1:
            schedulers.append(Unplannable(f"{name} is stepped every {config.frequency} steps"))
        else:
            schedulers.append(config.scheduler)
    return {"schedulers": schedulers, "budget": left if left > 0 else None}


MANUAL_NOTE = (
    "stability_index not measured: under manual optimization training_step steps the "
    "optimizers itself, so it cannot be replayed as the probe forward"
)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def logging_off(module: Any) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing in the body: a replayed
    ``training_step`` would otherwise log the probe batch's values into the running hook's
    results (instance attributes shadow the methods, and are deleted afterwards)."""
    module.log = module.log_dict = _ignore
    try:
        yield
    finally:
        del module.log, module.log_dict


def replay_training_step(module: Any, batch: Any, *batch_idx: int) -> Any:
    with logging_off(module):
        return module.training_step(batch, *batch_idx)


def training_step_replay(pl_module: Any, batch: Any, batch_idx: int) -> Replay | None:
    """``forward(model)`` for the stability index: ``training_step`` on a copy of ``batch``,
    with ``batch_idx`` when it takes one (as Lightning decides); None when it cannot be
    replayed (manual optimization, or a ``training_step`` fed a ``dataloader_iter``)."""
    if not getattr(pl_module, "automatic_optimization", True):
        return None
    params = inspect.signature(pl_module.training_step).parameters
    if "dataloader_iter" in params:
        return None
    positional = any(p.kind is p.VAR_POSITIONAL for p in params.values())
    index = (batch_idx,) if "batch_idx" in params or len(params) >= 2 or positional else ()
    return replay_of(replay_training_step, (batch, *index), {})


class StabscopeCallback(Callback):
    """Records the LightningModule's training; keyword options are ``stabscope.Recorder``'s
    (``preset``, ``include``, ``exclude``, ``schedule``, ``force``, ``forward``, ...)."""

    def __init__(
        self, out: str | os.PathLike[str], config: RecorderConfig | None = None, **options: Any
    ) -> None:
        super().__init__()
        self.session = RecordingSession(out, config, options)
        self._global_step = 0
        self._probe_tried = False
        self._manual_losses: list[torch.Tensor] = []  # this batch's manual_backward scalars
        self._tapped: Any = None  # the LightningModule whose manual_backward is tapped

    @property
    def recorder(self) -> Recorder | None:
        """The open Recorder; None outside fit."""
        return self.session.recorder

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        rec = self.session.start(
            pl_module,
            "lightning",
            trainer_log=[LightningLoggers(trainer)],
            **lightning_plan(trainer, pl_module),
        )
        self._global_step = trainer.global_step
        self._probe_tried = False
        manual = not getattr(pl_module, "automatic_optimization", True)
        if rec.wants_probe_forward and manual:
            update_meta(rec.meta, [MANUAL_NOTE])
        if manual:
            self._tap_manual_backward(pl_module)

    def _tap_manual_backward(self, pl_module: Any) -> None:
        """Keep the scalar losses ``manual_backward`` receives (an instance attribute over the
        class's method, removed at the end of fit)."""
        original = pl_module.manual_backward

        def manual_backward(loss: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
                self._manual_losses.append(loss.detach().reshape(()))
            return original(loss, *args, **kwargs)

        pl_module.manual_backward = manual_backward
        self._tapped = pl_module

    def _untap(self) -> None:
        if self._tapped is not None:
            self._tapped.__dict__.pop("manual_backward", None)
            self._tapped = None

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        rec = self.session.recorder
        if rec is not None and rec.wants_probe_forward and not self._probe_tried:
            self._probe_tried = True  # the first batch of this fit only
            replay = training_step_replay(pl_module, batch, batch_idx)
            if replay is not None:
                rec.set_probe_forward(replay)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        manual, self._manual_losses = self._manual_losses, []
        if loss is not None:
            self.session.add_loss(loss * trainer.accumulate_grad_batches)
        elif manual:  # manual optimization, training_step returned no loss
            self.session.add_loss(torch.stack([v.to(manual[0].device) for v in manual]).sum())
        if trainer.global_step != self._global_step:  # an optimizer step ended this batch
            self._global_step = trainer.global_step
            self.session.step("mean")
            if self.session.should_stop:  # on_error="stop": an error finding arrived
                trainer.should_stop = True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._untap()
        self.session.close("complete")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._untap()
        self.session.close(ending_status(exception), exception)  # Ctrl-C: interrupted


__all__ = ["StabscopeCallback"]
