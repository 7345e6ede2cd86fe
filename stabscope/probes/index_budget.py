"""The stability index's time budget: a scheduled measurement is skipped when it would take
the index's time past a fraction of the training time.

The training time is the wall time between the recorder's step boundaries less the index's
own; when the run knows its planned length (meta.json ``lr_plan``: ``--budget``/``--steps``,
the Trainer's ``max_steps``, Lightning's stepping batches) the allowance is taken on the
planned run (the mean step so far times the planned steps) when that is larger: a profile of
the first 300 steps of a 20,000-step plan may spend its share of the 20,000 steps. The cost
of the next measurement is taken to be the last one's; before the first, ``first_cost`` step
times (the probe's estimate of its Hessian-vector products). Pure arithmetic on a clock the
probe reads: no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class IndexBudget:
    fraction: float | None  # None: no limit
    first_cost: float = 9.0  # steps, the first measurement's estimated cost
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)
    training: float = 0.0  # seconds of training seen (step boundary to step boundary)
    steps: int = 0  # step intervals seen
    spent: float = 0.0  # seconds inside measurements
    last_cost: float | None = None  # seconds of the last measurement
    measured: int = 0
    skipped: int = 0
    _mark: float | None = None

    def tick(self) -> None:
        """At a step boundary (before any measurement there): the step just ended counts as
        training time (the first boundary only starts the clock)."""
        now = self.clock()
        if self._mark is not None:
            self.training += now - self._mark
            self.steps += 1
        self._mark = now

    def allows(self, planned: int | None = None) -> bool:
        """Whether a measurement now keeps the index within its share; counts a skip."""
        if self.fraction is None:
            return True
        mean = self.training / self.steps if self.steps else 0.0
        cost = self.last_cost if self.last_cost is not None else self.first_cost * mean
        base = max(self.training, mean * planned) if planned else self.training
        if self.spent + cost <= self.fraction * base:
            return True
        self.skipped += 1
        return False

    def charge(self, seconds: float, measured: bool = True) -> None:
        """A measurement (or a try that found nothing) took ``seconds``: the index's time,
        not training's."""
        self.spent += seconds
        self.last_cost = seconds
        self.measured += measured
        self._mark = self.clock()

    def summary(self) -> dict[str, float | int | None]:
        """meta.json's ``stability_index`` entry."""
        return {
            "budget": self.fraction,
            "measured": self.measured,
            "skipped": self.skipped,
            "seconds": round(self.spent, 3),
            "training_seconds": round(self.training, 3),
        }


__all__ = ["IndexBudget"]
