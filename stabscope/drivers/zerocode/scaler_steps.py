"""Steps an AMP ``GradScaler`` skipped: a step of the script all the same.

``scaler.step(optimizer)`` does not call ``optimizer.step()`` when the scaled gradients hold an
Inf or NaN (fp16 overflow), and ``scaler.update()`` lowers the scale. Zero-code mode marks a
step where the optimizer steps, so without this a run whose scaler skips (the normal first few
steps of fp16 training, or every step of one that overflows for good) would have fewer steps
than the script has iterations: ``--max-steps 20 --stop-script`` would let it run on, and the
skipped iterations would be missing from the run. The wrapper sees a ``scaler.step`` during
which no optimizer step happened and reports it; the run marks a step there, with the
iteration's loss and the non-finite gradients that made the scaler skip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer


class SkippedScalerSteps:
    """Wraps ``torch.amp.GradScaler.step`` (``torch.cuda.amp.GradScaler`` inherits it) until
    ``remove()``. ``steps()`` counts the optimizer steps seen so far; ``on_skipped`` gets the
    optimizer whose step the scaler skipped."""

    def __init__(self, steps: Callable[[], int], on_skipped: Callable[[Optimizer], None]) -> None:
        self._original = torch.amp.GradScaler.step
        original, self._steps, self._on_skipped = self._original, steps, on_skipped

        def step(scaler: Any, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any:
            before = self._steps()
            result = original(scaler, optimizer, *args, **kwargs)
            if scaler.is_enabled() and self._steps() == before:
                self._on_skipped(optimizer)
            return result

        torch.amp.GradScaler.step = step  # type: ignore[method-assign]

    def remove(self) -> None:
        torch.amp.GradScaler.step = self._original  # type: ignore[method-assign]
