"""Rule ``no-update``: training that does not train, the weights standing still.

Two cases, each over every trainable weight matrix (two or more dimensions) with a recorded
value, and at least ``min_steps`` recorded steps:

- no gradient: ``param_grad_norm`` exactly 0 at every recorded step. Nothing upstream of the
  loss carries a gradient: dead activations (every ReLU input negative), a detached graph,
  or a loss that does not depend on the weights.
- no update: ``update_norm`` (the change of the weights over a step) exactly 0 at every
  recorded step. The optimizer never moved them: ``optimizer.step()`` not called, or called
  after ``zero_grad()``, or a learning rate of 0 throughout.

A third case needs no zero: weight matrices with ``requires_grad`` that no optimizer of the
run holds (meta.json's ``stepped``) and that received a gradient. They never move: the
optimizer was built from part of the model (``Adam(model.head.parameters())``, or only the
no-decay group), or a module was added after the optimizer was made. An error when they hold
``unstepped_share`` (half) or more of the values of the weight matrices that get a
gradient: most of the model does not train. (A body replaced after the optimizer was built
is still held by it, out of the graph: it gets no gradient and does not count.) A warning
below that. A part meant to stay frozen is frozen with ``requires_grad_(False)``, which also
spares its backward; such a part is not counted here. Judged once the run has ended, not
while it trains: a part may still join the optimizer (``add_param_group``, when a frozen body
is released).

A fourth reads what zero-code mode saw outside the recorded model (meta.json's
``untrained_models``): a model the script called beside it, whose trainable parameters got
gradients that no optimizer holds at the end (a GAN's generator whose optimizer was built over
the discriminator's parameters). It never trains: an error where it was in train mode, a
warning where it was in eval mode (a fixed teacher or a perceptual-loss network called with
gradients on: wasted backward, nothing worse).

Exactly zero, not small: a run with a small learning rate or vanishing gradients still moves
its weights by some amount, and that is the depth and update rules' business; an exact zero
over every matrix and every recorded step is a bug, not a regime. A warm-up from lr 0 or a
frozen backbone leaves other steps or other matrices moving, so neither counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ..analysis.summary import owner_module
from ..store.findings import Finding
from ..store.rundir import run_state
from .base import Rule, RunView, finding
from .view import Request

CASES = {
    "param_grad_norm": (
        "no weight matrix received a gradient",
        "look for dead activations (a ReLU whose inputs are all negative: a large negative "
        "bias or a norm's shift), a tensor detached from the graph (.detach(), .data, "
        "torch.no_grad around the forward), or a loss that does not depend on the weights",
    ),
    "update_norm": (
        "no weight matrix changed",
        "call optimizer.step() after loss.backward() and before the next zero_grad(), and "
        "check that the learning rate is not 0",
    ),
}


def _still(view: RunView, metric: str, min_steps: int) -> tuple[int, list[int]] | None:
    """(matrices, recorded steps) when every trainable matrix's ``metric`` is exactly 0 at
    every recorded step, at least ``min_steps`` of them; else None."""
    rows = view.metrics(metric)
    rows = rows[rows.module.isin(view.matrices & view.meta.trainable)]
    values = rows.value.to_numpy(float)
    if rows.empty or not np.isfinite(values).all() or (values != 0).any():
        return None
    steps = sorted({int(s) for s in rows.step})
    return (rows.module.nunique(), steps) if len(steps) >= min_steps else None


def _unstepped(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    """Weight matrices that get gradients and that no optimizer holds (module docstring)."""
    meta = view.meta
    unstepped = view.matrices & meta.unstepped
    if not unstepped or run_state(view.run_dir, meta).status == "running":
        # While it trains, a part may still join the optimizer (``add_param_group`` when a
        # frozen body is released): judged once the run has ended.
        return
    grads = view.metrics("param_grad_norm")
    # The matrices that got a gradient (NaN counts too: it reached the weight; only an exact
    # 0 does not). A body replaced after the optimizer was built is still held by it, but no
    # longer in the graph, and counts for nothing.
    alive = set(grads.module[grads.value.to_numpy(float) != 0]) & view.matrices
    reached = sorted(alive & unstepped)
    if not reached:
        return
    whole = {n for n in alive if n in meta.trainable | meta.unstepped}
    idle = never_stepped(view)
    held = (
        f"no optimizer that stepped holds them ({', '.join(idle)} was built and never stepped)"
        if idle
        else "no optimizer holds them"
    )
    yield _part(
        view,
        reached,
        whole,
        p,
        lambda share, named: (
            f"{len(reached)} weight matrices receive gradients but {held}, so they never "
            f"change: {share:.1%} of the values of the weight matrices that get a gradient "
            f"({named})"
        ),
        step=int(grads[grads.module.isin(unstepped)].step.max()),
        remedy=(IDLE_REMEDY if idle else "")
        + "build the optimizer from every parameter that should train "
        "(model.parameters(), after every module is added, and from the model object the "
        "loop trains: one built before `model = copy.deepcopy(model)` or a reload holds the "
        "old parameters), and freeze the rest with requires_grad_(False), which also spares "
        "their backward",
    )


#: The remedy's first clause where an optimizer was built and never stepped.
IDLE_REMEDY = (
    "call step() on every optimizer the loop builds (with two, both: a sparse one for the "
    "embeddings and a dense one, say); else "
)


def never_stepped(view: RunView) -> list[str]:
    """Optimizer classes zero-code mode saw built (``run.optimizer``) more often than an
    optimizer of that class stepped (meta.json's ``optimizers``, one entry per optimizer
    that stepped): those built and never stepped, whose parameters were then held by none
    that stepped. [] where the run does not say (a Recorder of your own)."""
    run = view.meta.doc.get("run")
    built = run.get("optimizer") if isinstance(run, dict) else None
    if not isinstance(built, str) or not built:
        return []
    left = [name.strip() for name in built.split(",") if name.strip()]
    for entry in view.meta.optimizers:
        if entry.get("class") in left:
            left.remove(entry["class"])
    return left


def _cut_off(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    """Weight matrices an optimizer holds whose module ran inside the autograd graph (its
    output required grad on a recorded training step: not under ``no_grad``), yet which
    never received a gradient at any recorded step, while other matrices did: the graph is
    cut between them and the loss (module docstring)."""
    meta = view.meta
    if run_state(view.run_dir, meta).status == "running":
        return  # a part may join the graph later (a frozen body released): judged at the end
    grads = view.metrics("param_grad_norm")
    trained = view.matrices & meta.trainable
    recorded = {int(s) for s in grads.step}
    if grads.empty or len(recorded) < p["min_steps"]:
        return
    # NaN counts as reached (the gradient got there); only an exact 0, or no gradient at all
    # (no row: ``.grad`` stayed None), does not.
    reached = set(grads.module[grads.value.to_numpy(float) != 0]) & trained
    if not reached:
        return  # nothing trains at all: the zero-gradient case below says so
    in_graph = {m["name"] for m in meta.modules if int(m.get("grad_hooks") or 0) > 0}
    cut = sorted(
        name for name in trained - reached if owner_module(name) in in_graph
    )  # their module's output was in the graph, yet no gradient came back to them
    if not cut:
        return
    yield _part(
        view,
        cut,
        reached | set(cut),
        p,
        lambda share, named: (
            f"{len(cut)} weight matrices never received a gradient at any "
            f"of the {len(recorded)} recorded steps although their modules ran with gradients on, "
            f"so they never change: {share:.1%} of the values of the trained weight matrices "
            f"({named})"
        ),
        step=max(recorded),
        remedy="find where the graph is cut between these modules and the loss: a "
        ".detach() or .data, a tensor rebuilt from .item(), .numpy() or .tolist(), an "
        "integer cast or an argmax; or an output that never reaches the loss. A part meant "
        "to stay frozen is frozen with requires_grad_(False) (or run under torch.no_grad())",
    )


def _part(
    view: RunView,
    part: list[str],
    whole: set[str],
    p: dict[str, float],
    says: Callable[[float, str], str],
    step: int,
    remedy: str,
) -> Finding:
    """The finding on weight matrices ``part`` that never change, among ``whole``: an error
    where they hold ``unstepped_share`` of its values or more, else a warning. ``says``
    words it from that share and the first names of ``part``."""
    numel = {q["name"]: int(q.get("numel", 0)) for q in view.meta.parameters}
    total = sum(numel.get(n, 0) for n in whole)
    share = sum(numel.get(n, 0) for n in part) / total if total else 1.0
    named = ", ".join(part[:3]) + (f" and {len(part) - 3} more" if len(part) > 3 else "")
    return finding(
        NO_UPDATE,
        "error" if share >= p["unstepped_share"] else "warning",
        says(share, named),
        step=step,
        value=share,
        threshold=p["unstepped_share"],
        metric="param_grad_norm",
        module=part[0],
        remedy=remedy,
    )


def _untrained_models(view: RunView) -> Iterator[Finding]:
    """Models beside the recorded one that got gradients no optimizer applied (module
    docstring)."""
    models = view.meta.doc.get("untrained_models")
    for m in models if isinstance(models, list) else []:
        if not isinstance(m, dict) or not m.get("with_grad"):
            continue
        training = bool(m.get("training"))
        yield finding(
            NO_UPDATE,
            "error" if training else "warning",
            f"{m.get('class')}, which the script called "
            f"{'in train mode ' if training else 'in eval mode '}beside the recorded "
            f"model, has {int(m['with_grad']):,} trainable values that got gradients, and no "
            "optimizer holds them: it never trains",
            step=max(view.meta.steps - 1, 0),
            value=float(m["with_grad"]),
            threshold=0.0,
            metric="param_grad_norm",
            remedy=(
                "build each model's optimizer from that model's own parameters (a copy-paste "
                "of `Adam(D.parameters())` for the generator leaves it untrained); a model "
                "meant to stay fixed (a teacher, a perceptual-loss network) is frozen with "
                "requires_grad_(False) or called under torch.no_grad()"
            ),
        )


def _no_update(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    yield from _untrained_models(view)
    yield from _unstepped(view, p)
    yield from _cut_off(view, p)
    still = {m: _still(view, m, int(p["min_steps"])) for m in CASES}
    # The weights not moving is the fact; zero gradients, where they are seen too, are why
    # (a dead network, or gradients zeroed before the optimizer's step reads them).
    metric = "update_norm" if still["update_norm"] else "param_grad_norm"
    found = still[metric]
    if found is None:
        return
    matrices, steps = found
    what, remedy = CASES[metric]
    if metric == "update_norm" and still["param_grad_norm"]:
        what += ", and their gradients were 0 when the optimizer stepped"
        remedy = f"{CASES['param_grad_norm'][1]}; or {remedy}"
    yield finding(
        NO_UPDATE,
        "error",
        f"{what}: {metric} is exactly 0 for all {matrices} trainable weight matrices at "
        f"all {len(steps)} recorded steps ({steps[0]} to {steps[-1]}): the model is not "
        "training",
        step=steps[-1],
        value=0.0,
        threshold=0.0,
        metric=metric,
        remedy=remedy,
    )


NO_UPDATE = Rule(
    "no-update",
    "The weights never change (no gradient, or no optimizer step)",
    "",
    ("param_grad_norm", "update_norm"),
    {"min_steps": 2, "unstepped_share": 0.5},
    _no_update,
    "error",
    (Request(("param_grad_norm", "update_norm")),),
)

RULES = [NO_UPDATE]
