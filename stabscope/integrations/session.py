"""What every framework adapter does: open a Recorder when training starts, mark one step
per optimizer step with the loss of its micro-batches, close when training ends or fails."""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..record.config import RecorderConfig
from ..record.recorder import Recorder
from ..store import interrupts
from .loggers import with_trainer

#: The stability index's default share of the training time under a framework callback: it
#: rides along real training, where `stabscope profile` is a diagnostic run of its own (every
#: measurement). Measured on the sample GPT (CPU): a measurement costs ~20 training steps, so
#: 300 steps without a budget cost +53% (docs/benchmarks.md). With 5% it measures from step
#: 512 on (log2 schedule), or from the start when the Trainer knows its max_steps (the share
#: is of the planned run). ``sharpness_budget=`` of the user's wins.
CALLBACK_INDEX_BUDGET = 0.05


class RecordingSession:
    """One Recorder over one ``fit``/``train`` call; options are the Recorder's."""

    def __init__(
        self, out: str | os.PathLike[str], config: RecorderConfig | None, options: dict[str, Any]
    ) -> None:
        self.out = out
        self.config = config
        self.options = options
        self.recorder: Recorder | None = None
        self._losses: list[torch.Tensor] = []  # micro-batch losses of the current step

    def start(
        self, model: nn.Module, framework: str, trainer_log: Sequence[Any] = (), **plan: Any
    ) -> Recorder:
        """Open the Recorder; ``plan`` is what the framework knows of the lr plan
        (``schedulers``, ``budget``), unless the user's options say otherwise;
        ``trainer_log``: what ``log_to="trainer"`` stands for (integrations/loggers.py)."""
        if self.recorder is not None:  # a previous fit ended without its end hook
            self.close("failed")
        options = {**plan, **self.options}
        if "log_to" in options:
            options["log_to"] = with_trainer(options["log_to"], trainer_log)
        run_info = {"framework": framework, **options.pop("run_info", {})}
        config = self.config or RecorderConfig()
        if config.sharpness_budget is None and "sharpness_budget" not in options:
            config = config.replace(sharpness_budget=CALLBACK_INDEX_BUDGET)
        self.recorder = Recorder(model, self.out, config, run_info=run_info, **options)
        self.recorder.start()
        # A framework that has no exception hook (transformers' Trainer) leaves the run open
        # when training raises: mark it failed, with its rows written, at interpreter exit.
        atexit.register(self._close_at_exit)
        return self.recorder

    def add_loss(self, loss: torch.Tensor | float | None) -> None:
        """One micro-batch's loss (kept on its device until the step is recorded)."""
        if loss is not None:
            value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
            self._losses.append(value.reshape(()).float())

    def step(self, reduce: str = "mean", scale: float = 1.0) -> None:
        """Mark one optimizer step; its loss is ``scale`` times the ``mean`` or ``sum`` of the
        micro-batch losses added since the last one."""
        if self.recorder is None:
            return
        loss = None
        if self._losses:
            stacked = torch.stack([v.to(self._losses[0].device) for v in self._losses])
            loss = (stacked.sum() if reduce == "sum" else stacked.mean()) * scale
        self._losses = []
        self.recorder.step(loss=loss)

    @property
    def should_stop(self) -> bool:
        """Whether an error finding asked training to stop (the Recorder's ``on_error``)."""
        return self.recorder is not None and self.recorder.should_stop

    def close(self, status: str = "complete", error: BaseException | None = None) -> None:
        if self.recorder is not None:
            self.recorder.close(status, error)
            self.recorder = None
            atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        if interrupts.received() is not None:  # SIGINT/SIGTERM ended the process
            self.close("interrupted")
            return
        self.close("failed", RuntimeError("the process ended before training finished"))
