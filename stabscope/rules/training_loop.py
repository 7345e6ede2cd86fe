"""Rules on the training loop itself, not on what the model does in it.

``gradients-not-zeroed``: an optimizer step received gradients that were never zeroed since
the step before (``grad_not_zeroed``, written by the recorder: record/stale_grads.py).
``backward()`` adds into ``.grad``; a loop without ``zero_grad`` (or ``grad = None``) hands
step t the sum of every gradient so far, so each update repeats all the earlier ones and the
steps grow with t: measured on an MLP, GPT-2 and a GRU, the total gradient norm x7 to x41
within 30 steps and the loss 2-14x the trivial predictor's by step 300, where the same loops
with ``zero_grad`` learned. It is read exactly, at the first step it happens, so it is an
error at once: no other signal shows it that early, and nothing but the bug makes it.

``loss-broadcast``: a regression loss compared every output with every target (meta.json
``loss_broadcast``, record/loss_broadcast.py): an output of shape ``(B, 1)`` against targets
of shape ``(B,)`` is broadcast to ``(B, B)``, so the loss is minimised by predicting the
batch's mean for every input whatever the model learns. Read from the first loss's graph, an
error from the first step: the loss falls at first (the outputs move to the targets' mean)
and then stays at their variance, which a rule on the loss sees only at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from ..store import RUN_MODULE
from ..store.findings import Finding
from ..theory.loss_floors import binary_floors
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


def _broadcast(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    read = view.meta.doc.get("loss_broadcast")
    if not isinstance(read, dict):
        return
    shape = "x".join(str(n) for n in read.get("shape", []))
    out, tgt = read.get("output_dims", []), read.get("target_dims", [])
    yield finding(
        BROADCAST,
        "error",
        f"{read.get('function', 'the loss')} compared every output with every target: its "
        f"inputs were broadcast to {shape}, the outputs repeated along dim "
        f"{', '.join(map(str, out))} and the targets along dim {', '.join(map(str, tgt))}; "
        "the model can do no better than predict the batch's mean target for every input",
        module=None,
        step=0,
        value=1.0,
        metric="loss",
        remedy="give the output and the target the same shape: `output.squeeze(-1)` against "
        "targets of shape (B,), or `target.unsqueeze(-1)` against outputs of shape (B, 1) "
        "(PyTorch warns: 'Using a target size that is different to the input size')",
    )


BROADCAST = Rule(
    "loss-broadcast",
    "A regression loss that compares every output with every target",
    "",  # no paper: torch's broadcasting semantics
    (),  # a meta.json entry written only when it happens
    {},
    _broadcast,
)

#: What each loss function applies to its input, for the finding's words.
_APPLIES = {
    "cross_entropy": "its own softmax",
    "binary_cross_entropy_with_logits": "its own sigmoid",
    "nll_loss": "nothing: it takes log-probabilities",
}
#: What to hand each loss function instead.
_INSTEAD = {
    "cross_entropy": "pass the raw scores (drop the {act} before the loss), or take "
    "nll_loss of their log (log_softmax) if the probabilities are needed elsewhere",
    "binary_cross_entropy_with_logits": "pass the raw scores (drop the {act} before the "
    "loss), or use binary_cross_entropy on the probabilities",
    "nll_loss": "hand it log-probabilities: log_softmax instead of the {act}, or "
    "cross_entropy on the raw scores",
}


def squashed_floors(read: dict) -> tuple[float, float] | None:
    """(the least loss the squashed inputs allow, a uniform guess's loss) for meta.json's
    ``squashed_logits``, per example: a cross-entropy over its ``classes`` (ln V); a binary
    one for the label it serves worse (ln 2): a target of 0 at best ln(1 + e^low), a
    target of 1 at best ln(1 + e^-high). None where neither is known (``nll_loss``, a
    cross-entropy whose classes were not read)."""
    if read.get("function") == "binary_cross_entropy_with_logits":
        low, high = float(read.get("low", 0.0)), float(read.get("high", 1.0))
        return max(binary_floors(low, high)), math.log(2)
    floor, classes = read.get("floor"), read.get("classes")
    if isinstance(floor, (int, float)) and isinstance(classes, int) and classes > 1:
        return float(floor), math.log(classes)
    return None


def _squashed(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    read = view.meta.doc.get("squashed_logits")
    if not isinstance(read, dict):
        return
    function, act = str(read.get("function")), str(read.get("activation"))
    low, high = float(read.get("low", 0.0)), float(read.get("high", 1.0))
    classes = read.get("classes")
    message = (
        f"{function}, which applies {_APPLIES.get(function, 'its own squashing')}, was handed "
        f"the outputs of a {act} (each in [{low:g}, {high:g}]): they are squashed twice, so no "
        "prediction can be confident whatever the model learns"
    )
    floors = squashed_floors(read)
    if function == "nll_loss":
        message += "; on probabilities it returns -p, no log-likelihood (it ranges over [-1, 0])"
    elif function == "binary_cross_entropy_with_logits":
        zero, one = binary_floors(low, high)
        message += (
            f": a target of 0 scores at least ln(1 + e^{low:g}) = {zero:.3g} and a target of "
            f"1 at least ln(1 + e^-{high:g}) = {one:.3g}, against ln 2 = 0.693 for a coin flip"
        )
    elif floors is not None:
        message += (
            f", and the loss cannot fall below {floors[0]:.3g} over {classes} classes (a "
            f"uniform guess scores ln {classes} = {floors[1]:.3g})"
        )
    # An error where the model can never remove `error_share` of a uniform guess's loss:
    # then no run of it gets half-way to what the same model learns on raw scores.
    severe = floors is not None and floors[0] >= p["error_share"] * floors[1]
    yield finding(
        SQUASHED,
        "error" if severe else "warning",
        message,
        module=None,
        step=0,
        value=floors[0] / floors[1] if floors is not None else None,
        threshold=p["error_share"],
        metric="loss",
        remedy=_INSTEAD.get(function, "pass the raw scores to the loss").format(act=act),
    )


SQUASHED = Rule(
    "squashed-logits",
    "A loss that takes logits handed probabilities",
    "",  # no paper: what torch.nn.functional's cross_entropy and *_with_logits compute
    (),  # a meta.json entry written only when it happens
    {"error_share": 0.5},
    _squashed,
)


def _log_softmax_dim(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    read = view.meta.doc.get("log_softmax_dim")
    if not isinstance(read, dict):
        return
    function, shape = str(read.get("function")), tuple(read.get("shape") or ())
    dim, classes, normalised = read.get("class_dim"), read.get("classes"), read.get("normalised")
    yield finding(
        LOG_SOFTMAX_DIM,
        "error",
        f"{function} takes log-probabilities over its {classes} classes (dim {dim} of its "
        f"{shape} input), but the log_softmax before it normalised a dim of {normalised}: "
        "the values sum to 1 over another axis (time, the batch), not over the classes, so "
        "the loss trains on no distribution over what it scores",
        module=None,
        step=0,
        value=float(normalised) if isinstance(normalised, int) else None,
        threshold=float(classes) if isinstance(classes, int) else None,
        metric="loss",
        remedy=_LOG_SOFTMAX_REMEDY.get(function, "log_softmax over the class dim"),
    )


#: Where each loss function wants its classes.
_LOG_SOFTMAX_REMEDY = {
    "ctc_loss": "log_softmax over the classes: dim=-1 of the (T, N, C) log_probs (or of the "
    "batch-first (N, T, C) output before its transpose)",
    "nll_loss": "log_softmax over the classes: dim=1 of an (N, C, ...) input; or "
    "cross_entropy on the raw scores",
}

LOG_SOFTMAX_DIM = Rule(
    "log-softmax-dim",
    "Log-probabilities normalised over the wrong dim",
    "",  # no paper: the input nll_loss and ctc_loss document
    (),  # a meta.json entry written only when it happens
    {},
    _log_softmax_dim,
)

RULES = [NOT_ZEROED, BROADCAST, SQUASHED, LOG_SOFTMAX_DIM]
