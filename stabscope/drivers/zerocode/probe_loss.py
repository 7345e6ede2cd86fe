"""The probe forward of a zero-code run: the model's first training call, and the loss.

A model that returns its own loss (nanoGPT's ``(logits, loss)``, a transformers model given
labels) gives the stability index its loss directly. Otherwise the loss the script computes
from the output is traced through the first training step (``record/loss_tail.py``) and
replayed after the captured call: ``LossTail``'s checks decide, and when it is refused
meta.json says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...probes.sharpness import scalar_loss
from ...record.hook_context import compiling
from ...record.loss_tail import LossTail, TailedReplay, TailTrace
from ...record.probe_forward import Replay

#: What meta.json says when the script's loss outside the model is not replayed.
TAIL_NOTE = "the loss computed outside the model is not replayed for the stability index: "


class ProbeLoss:
    """Hands ``set_forward`` a probe forward that returns the step's loss; ``note`` receives
    the reason when the loss outside the model cannot be replayed."""

    def __init__(self, set_forward: Callable[[Any], None], note: Callable[[str], None]) -> None:
        self.set_forward, self.note = set_forward, note
        self._replay: Replay | None = None
        self._trace: TailTrace | None = None  # recording, until the first loss
        self._on_stack: TailTrace | None = None  # its mode, until taken off torch's stack
        self._tail: LossTail | None = None  # until the first step's loss count is known

    def captured(self, replay: Replay, output: Any, model: nn.Module | None = None) -> None:
        """The model's first training call (from its forward hook, ``output`` its result)."""
        if scalar_loss(output) is not None or compiling():
            self.set_forward(replay)  # the model returns its loss (or no trace can run)
            return
        try:
            trace = TailTrace(output, model)
        except Exception as err:  # inside the user's forward hook: never break the step
            self.note(f"{TAIL_NOTE}{type(err).__name__} reading the model's output")
            self.set_forward(replay)
            return
        self._replay = replay
        self._trace = self._on_stack = trace
        trace.open()

    def loss(self, tensor: torch.Tensor) -> None:
        """A backward on the scalar ``tensor`` (before any AMP scaling) that counts as a loss."""
        trace, replay = self._trace, self._replay
        self._trace = self._replay = None
        if trace is None or replay is None:
            return
        try:
            found: LossTail | str = trace.finish(tensor)
        except Exception as err:  # inside the user's backward call: never break it
            found = f"{type(err).__name__} while checking the replay"
        if isinstance(found, str):
            self.note(TAIL_NOTE + found)
            self.set_forward(replay)
        else:
            self._tail = found
            self.set_forward(TailedReplay(replay, found))

    def step_ended(self, losses: int) -> None:
        """The first step ended with ``losses`` micro-batch losses: the replay's factor. A
        trace still waiting for its loss (a step taken without ``backward`` on a scalar,
        ``autograd.grad``) ends here, so the mode never outlives the first step."""
        if self._trace is not None and self._replay is not None:
            self._trace.stop()
            self.note(TAIL_NOTE + "no backward on a scalar loss in the first step")
            self.set_forward(self._replay)
            self._trace = self._replay = None
        if self._tail is not None and losses > 1:
            self._tail.factor = losses
        self._tail = None
        self.safe_point()

    def safe_point(self) -> None:
        """Outside any torch call: take the trace's mode off torch's stack once it is done."""
        if self._on_stack is not None and self._trace is None and self._on_stack.close():
            self._on_stack = None

    def abandon(self) -> None:
        """The recording ends: stop tracing, leave the stack as found where possible."""
        if self._trace is not None:
            self._trace.stop()
            self._trace = self._replay = None
        self.safe_point()
