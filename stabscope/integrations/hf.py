"""Record a transformers ``Trainer`` with stabscope::

    from stabscope.integrations.hf import StabscopeCallback

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[StabscopeCallback("runs/hf")])
    trainer.train()

The model is recorded from ``on_train_begin`` (the Trainer has created its optimizer by then;
the Recorder finds it through PyTorch's global optimizer-step hooks, so nothing needs to be
passed). One stabscope step is one optimizer step (``on_step_end``); with
``gradient_accumulation_steps=k`` the k micro-batches are calls 0..k-1 of each module.
The gradients recorded are those the optimizer sees, after the Trainer's gradient clipping.

**Loss.** The Trainer hands callbacks no per-step loss, so it is read from the model's own
output (``outputs.loss``, what the Trainer backpropagates when the batch has labels) in a
forward hook on training passes. When the Trainer passes ``num_items_in_batch`` (models that
accept loss kwargs) each micro-batch's loss is already its share of the step's token mean
and the shares are summed; otherwise the micro-batch means are averaged. Either way the
recorded loss is the one the Trainer logs for that step. A ``compute_loss`` override or a
``compute_loss_func`` computes a loss the model never returns: none is recorded then.

**Stability index.** Its probe batch is the model inputs of the first training pass whose
output has a loss (the Trainer passes the labels in them), copied once on their device and
replayed as ``model(**inputs)``, without ``num_items_in_batch``: the replayed loss is that
micro-batch's own mean, the scale of the loss the optimizer steps on. ``forward=`` overrides it.

**Planned lr.** The Trainer's scheduler (``lr_scheduler``) is planned to ``state.max_steps``
(meta.json's ``lr_plan``; from the step training starts at when resuming).

With ``on_error="stop"``, an error finding of the online rules sets
``control.should_training_stop`` at the optimizer step it arrives after, and the run is
``stopped``.

``log_to="trainer"`` sends the live series and findings where the Trainer's ``report_to``
logs: ``tensorboard`` (an event file of stabscope's own in the TensorBoardCallback's directory,
tags under ``stabscope/``) and ``wandb`` (the run the WandbCallback started, under
``stabscope/``). The structure is learned from the first step's forward: that step's rows wait
for it, so the dashboards have the blocks' series from step 0, as the run table does.

The run is closed on ``on_train_end``. The Trainer has no exception hook: when training
raises, the run is closed as ``failed`` at interpreter exit, or when the next ``train()``
starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..record.config import RecorderConfig
from ..record.copy_safe import NotCopied
from ..record.probe_forward import LOSS_SHARE_KWARGS, FirstTrainingCall
from ..record.recorder import Recorder
from .loggers import hf_targets
from .session import RecordingSession

try:
    from transformers import TrainerCallback
except ImportError as err:
    raise ImportError(
        "stabscope.integrations.hf needs transformers: pip install 'stabscope[hf]'"
    ) from err


def output_loss(output: Any) -> torch.Tensor | None:
    """``loss`` of a ModelOutput or dict, else None."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def hf_plan(state: Any, scheduler: Any) -> dict[str, Any]:
    """The Recorder's ``schedulers`` and ``budget`` from the Trainer's state: recorded steps
    count from the step training starts at (``global_step`` when resuming)."""
    max_steps = getattr(state, "max_steps", 0) or 0
    left = max_steps - (getattr(state, "global_step", 0) or 0)
    budget = left if left > 0 else None
    return {"schedulers": [] if scheduler is None else scheduler, "budget": budget}


class StabscopeCallback(TrainerCallback, NotCopied):
    """Records the Trainer's model; keyword options are ``stabscope.Recorder``'s
    (``preset``, ``include``, ``exclude``, ``schedule``, ``force``, ``forward``, ...)."""

    def __init__(
        self, out: str | os.PathLike[str], config: RecorderConfig | None = None, **options: Any
    ) -> None:
        self.session = RecordingSession(out, config, options)
        self._loss_hook: Any = None
        self._probe_batch: FirstTrainingCall | None = None
        self._reduce = "mean"

    @property
    def recorder(self) -> Recorder | None:
        """The open Recorder; None outside train()."""
        return self.session.recorder

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        self._remove_hooks()  # left by a train() that raised
        plan = hf_plan(state, kw.get("lr_scheduler"))
        rec = self.session.start(model, "transformers", trainer_log=hf_targets(args), **plan)
        self._loss_hook = model.register_forward_hook(self._on_model_output, with_kwargs=True)
        if rec.wants_probe_forward:
            self._probe_batch = FirstTrainingCall(
                model,
                rec.set_probe_forward,
                drop=LOSS_SHARE_KWARGS,
                accept=lambda output: output_loss(output) is not None,
            )

    def _on_model_output(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation passes
        loss = output_loss(output)
        if loss is not None:
            self._reduce = "sum" if kwargs.get("num_items_in_batch") is not None else "mean"
            self.session.add_loss(loss)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
        # Averaging tokens across processes, the Trainer divides by the tokens of all ranks
        # and multiplies by their number after the forward pass: do the same.
        across = self._reduce == "sum" and getattr(args, "average_tokens_across_devices", False)
        self.session.step(self._reduce, args.world_size if across else 1)
        if self.session.should_stop:  # on_error="stop": an error finding arrived
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self._remove_hooks()
        self.session.close("complete")

    def _remove_hooks(self) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self._probe_batch is not None:
            self._probe_batch.remove()
            self._probe_batch = None


__all__ = ["StabscopeCallback", "output_loss"]
