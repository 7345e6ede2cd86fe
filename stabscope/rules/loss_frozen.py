"""Rule ``loss-frozen``: the loss takes one value at every step while the weights move.

Each step's loss is computed on other batches by other weights, so its float value changes
from step to step even when training has stalled. One value to the last bits over many
steps, with the optimizer still moving the weights, means the loss does not depend on what
it updates: its gradient and its value come apart. The cases met:

- a DPO loss whose reference model is the policy itself: the log-ratio differences
  log π(y)/π_ref(y) are exactly 0, so the loss is −log σ(0) = ln 2 at every step, while the
  gradient (of π against a detached copy of itself) still moves the weights (blind trial 34);
- a target built from the prediction itself, a straight-through term that cancels in the
  forward pass, a loss read from a tensor computed before the step and kept.

An error when at least ``min_steps`` finite losses (of the run, or of its last phase) all
equal their first to ``rel_tol`` (a float32 value carries 24 bits: 1.2e-7) and a recorded
update norm is above zero. A loss of exactly 0 is left out: a hinge or margin loss at its
floor is 0 at every step while weight decay moves the weights, and that run has trained. A
loss computed in bfloat16 or float16 (every value on that grid) moves in steps of 0.4% or
0.05%, which a slow fine-tune may not take for a while: it needs ``low_precision_factor``
times as many steps. Judged on the run as recorded, not while it trains (``online``
False): a stop is not made on a streak that the next step may end.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store import RUN_MODULE
from ..store.findings import Finding
from .base import Rule, RunView, finding
from .loss_divergence import finite_losses
from .view import Request


def _low_precision(value: float) -> bool:
    """Whether ``value`` lies on the bfloat16 or the float16 grid (a loss computed in it)."""
    x = np.float32(value)
    bf16 = np.frombuffer(x.tobytes(), np.uint32)[0] & 0xFFFF == 0  # low mantissa bits unused
    return bool(bf16 or np.float32(np.float16(x)) == x)


def _moved(view: RunView) -> float:
    """The largest update norm recorded (0 where none is, or none moved)."""
    updates = view.metrics("update_norm")
    values = updates.value.to_numpy(float)
    values = values[np.isfinite(values)]
    return float(values.max()) if len(values) else 0.0


def _loss_frozen(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    series = finite_losses(view, max(int(p["min_steps"]), 2))
    if series is None:
        return
    values = series.to_numpy(float)  # (n,)
    first = values[0]
    if first == 0 or np.max(np.abs(values - first)) > p["rel_tol"] * abs(first):
        return
    if _low_precision(first) and len(values) < p["low_precision_factor"] * p["min_steps"]:
        return
    moved = _moved(view)
    if not moved > 0:
        return  # nothing moves either: no-update's case
    yield finding(
        LOSS_FROZEN,
        "error",
        f"the loss is {first:.7g} at every one of its {len(values)} steps (steps "
        f"{int(series.index[0])}-{int(series.index[-1])}) while the optimizer moves the "
        f"weights (update norms up to {moved:.3g}): the loss does not depend on what is "
        "trained",
        module=RUN_MODULE,
        step=int(series.index[-1]),
        value=float(len(values)),
        threshold=p["min_steps"],
        metric="loss",
        remedy="check what the loss compares: a reference model that is the policy itself "
        "(DPO: build it as a frozen copy, copy.deepcopy(policy).requires_grad_(False)), a "
        "target computed from the prediction, a term that cancels in the forward pass",
    )


LOSS_FROZEN = Rule(
    "loss-frozen",
    "The loss takes one value at every step while the weights move",
    "",
    ("loss",),
    {"min_steps": 20, "rel_tol": 1e-6, "low_precision_factor": 10},
    _loss_frozen,
    "error",
    (Request(("loss",)), Request(("update_norm",))),
    online=False,
)

RULES = [LOSS_FROZEN]
