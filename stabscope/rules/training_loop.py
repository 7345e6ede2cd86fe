"""Rules on the training loop itself, not on what the model does in it.

``gradients-not-zeroed``: an optimizer step received gradients that were never zeroed since
the step before (``grad_not_zeroed``, written by the recorder: record/stale_grads.py).
``backward()`` adds into ``.grad``; a loop without ``zero_grad`` (or ``grad = None``) hands
step t the sum of every gradient so far, so each update repeats all the earlier ones and the
steps grow with t: measured on an MLP, GPT-2 and a GRU, the total gradient norm x7 to x41
within 30 steps and the loss 2-14x the trivial predictor's by step 300, where the same loops
with ``zero_grad`` learned. It is read exactly, at the first step it happens, so it is an
error at once: no other signal shows it that early, and nothing but the bug makes it.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..store import RUN_MODULE
from ..store.findings import Finding
from .base import Rule, RunView, finding
from .view import Request


def _not_zeroed(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    flags = view.metrics("grad_not_zeroed")
    flags = flags[(flags.module == RUN_MODULE) & (flags.value > 0)]
    if flags.empty:
        return
    steps = sorted(int(s) for s in flags.step.unique())
    more = f"; {len(steps) - 1} more such steps" if len(steps) > 1 else ""
    yield finding(
        NOT_ZEROED,
        "error",
        f"the optimizer step at step {steps[0]} received the gradients of the steps before it "
        f"added to its own: they were never zeroed in between{more}, so every update repeats "
        "all the earlier ones",
        module=RUN_MODULE,
        step=steps[0],
        value=float(len(steps)),
        metric="grad_not_zeroed",
        remedy="call optimizer.zero_grad() (or model.zero_grad()) once per optimizer step, "
        "after optimizer.step() or before the step's first backward",
    )


NOT_ZEROED = Rule(
    "gradients-not-zeroed",
    "Gradients never zeroed between optimizer steps",
    "",  # no paper: what torch.optim's Optimizer.zero_grad is for
    (),  # a flag written only when it happens: its absence is the healthy case, not a gap
    {},
    _not_zeroed,
    reads=(Request(("grad_not_zeroed",)),),
)

RULES = [NOT_ZEROED]
