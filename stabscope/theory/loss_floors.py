"""The least loss that squashed inputs allow a loss that applies its own squashing (the
``squashed-logits`` rule; its reading: record/squashed_logits.py). Plain math: the read side
needs it without torch."""

from __future__ import annotations

import math


def cross_entropy_floor(classes: int, low: float, high: float) -> float:
    """The least cross-entropy over ``classes`` classes of inputs in [low, high]: the right
    class at ``high``, every other at ``low``: ln(1 + (V - 1) e^(low - high))."""
    return math.log1p((classes - 1) * math.exp(low - high))


def binary_floors(low: float, high: float) -> tuple[float, float]:
    """The least binary cross-entropy of inputs in [low, high]: (a target of 0, at best
    ``low``: ln(1 + e^low); a target of 1, at best ``high``: ln(1 + e^-high))."""
    return math.log1p(math.exp(low)), math.log1p(math.exp(-high))
