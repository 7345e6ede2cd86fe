"""Rule ``loss-above-uniform``: a run that reached its planned end with a loss above that of
predicting every class with equal probability.

Predicting the uniform distribution over V classes has cross-entropy exactly ln V, whatever
the labels (Cover and Thomas 2006, ch. 2: the cross-entropy of q = uniform is the mean of
-ln(1/V)). A model trained by that cross-entropy whose loss ends above ln V does worse than
knowing nothing. Label noise, label smoothing and mixup raise the best reachable loss, but
never above ln V (an entropy over V outcomes is at most ln V). What ends there is a model
that is confidently wrong: dropout so heavy that training outputs are noise, labels that do
not match their inputs, an init or a learning rate it never recovered from, a body frozen at
a bad init.

Judged where the loss's own autograd graph shows a softmax cross-entropy over as many
classes as the head has outputs (meta.json ``loss_function``, ``loss_classes``: not a
regression, nor a contrastive loss over the batch), and it reads as a mean cross-entropy of
the output head whose logits were recorded (``log_classes`` with its checks: a head that is
no classifier, a VAE's decoder, is not read against ln V), at the planned end
(``lr_plan.budget``) of a run of at least ``min_steps`` steps: early in training a healthy
run can sit above ln V (a T5 at init starts near 28 nats over 18 classes). The loss is the
end level of ``loss-divergence`` (a median over the last steps), and it must pass ln V by
``min_ratio`` (5%): a near-chance task (two classes, the loss hovering at ln 2 under
dropout) is not decided by noise.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..store.findings import Finding
from .base import Rule, RunView, loss_finding
from .constant_prediction import ENTROPIES, at_planned_end, end_entropies
from .loss_divergence import MIN_WINDOW, finite_losses, loss_levels
from .output_features import LOGITS, log_classes
from .view import Request

COVER_THOMAS = "Cover and Thomas 2006, Elements of Information Theory, ch. 2"


def checked_ln_v(view: RunView) -> tuple[float, str] | None:
    """(ln V, where it comes from) where the loss reads as a mean cross-entropy of the output
    head: its graph shows a cross-entropy (record/loss_function.py; a loss that came without
    one, "unknown", is not enough, and a run recorded before the key existed is judged on
    the checks of ``log_classes`` alone), and the first logits pass ``log_classes``' checks;
    None otherwise."""
    if view.meta.doc.get("loss_function", "cross_entropy") != "cross_entropy":
        return None
    classes = log_classes(view, checked=True)
    return classes if isinstance(classes, tuple) else None


def _loss_above_uniform(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    end = at_planned_end(view, p["min_steps"])
    if end is None:
        return  # not at the planned end: a healthy run can still be above ln V early on
    budget, seen = end
    classes = checked_ln_v(view)
    if classes is None:
        return
    ln_v, source = classes
    loss = finite_losses(view)
    if loss is None:
        return
    level = loss_levels(loss, MIN_WINDOW)[3]
    ratio = level / ln_v
    if not ratio >= p["min_ratio"]:
        return
    said = (
        f"the run reached its planned end (step {budget}) with its loss at {level:.4g}, "
        f"{ratio:.2f}x {source}, the loss of predicting every class with equal probability: "
        "it does worse than knowing nothing"
    )
    ends = end_entropies(view, seen)  # the predictions' mean entropy at the end
    each = ends[0] if ends is not None else None
    if each is not None and each < level:
        said += f"; its predictions are confident (mean entropy {each:.3g} nats) and wrong"
    yield loss_finding(
        LOSS_ABOVE_UNIFORM,
        said,
        int(loss.index[-1]),
        ratio,
        p["min_ratio"],
        "look for what keeps the outputs from fitting the targets: dropout or noise "
        "so strong that training outputs are noise, targets that do not match the inputs, "
        "an init or learning rate the model never recovered from, a body left frozen",
    )


LOSS_ABOVE_UNIFORM = Rule(
    "loss-above-uniform",
    "A loss above ln V, the uniform prediction's, at the planned end",
    COVER_THOMAS,
    ("loss",),
    {"min_ratio": 1.05, "min_steps": 100},
    _loss_above_uniform,
    reads=(Request(("loss", *ENTROPIES)), Request(LOGITS)),
    online=False,  # how the run ended: needs its planned end
)

RULES = [LOSS_ABOVE_UNIFORM]
