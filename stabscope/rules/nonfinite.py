"""Rule nonfinite: NaN or Inf in the model is an error, located where it began.

Where it began comes from the table, so that ``--until`` and multi-rank runs see their own
rows: per direction, the first step where a module output (forward: ``act_nonfinite`` at a
recorded step, ``flight_act_nonfinite`` of a block, the stem or the head at any step) or a
gradient with respect to one (backward: ``grad_nonfinite``, ``flight_grad_nonfinite``) held a
NaN or Inf, and the first module in that direction's order at that step (meta.json's
``first_nonfinite`` when it is for that step: the exact leaf module the flight recorder
found, else the recorder's ``first_nonfinite_*`` marker row, else the flagged module first in
registration order). The earlier of the two
directions leads the finding (in one step, forward comes first). The loss is recorded at
every step, module statistics only at recorded ones, so the loss can go non-finite earlier;
its first such step is said too.

Skipped steps are not failures. Dynamic loss scaling (fp16 ``GradScaler``; Micikevicius et
al. 2018, *Mixed Precision Training*) multiplies the loss by a large scale, and when the
scaled gradients overflow it skips ``optimizer.step()`` and halves the scale: Inf gradients
on a few early steps are how it finds its scale. When every non-finite value was a gradient,
at a step whose optimizer step did not run (no ``lr`` row there, while other steps have
one), the loss and every output were finite, and the optimizer stepped again afterwards
(or, while the run trains, may still), the finding is a warning that says so. A run whose
gradients stay non-finite to its end, or whose outputs or loss go non-finite, is an error
as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..analysis.losses import first_nonfinite_loss
from ..store import RUN_MODULE
from ..store.findings import Finding
from ..wording import counted
from .base import Rule, RunView, finding
from .view import Request

#: direction -> (its flag metrics, its marker metric, what it is a value of)
DIRECTIONS = {
    "forward": (("act_nonfinite", "flight_act_nonfinite"), "first_nonfinite_forward", "output"),
    "backward": (
        ("grad_nonfinite", "flight_grad_nonfinite"),
        "first_nonfinite_backward",
        "output gradient",
    ),
}
FLAGS = tuple(flag for flags, _, _ in DIRECTIONS.values() for flag in flags)


@dataclass(frozen=True)
class FirstNonfinite:
    direction: str  # forward | backward
    step: int
    module: str
    metric: str  # the flag that showed it at that step (a recorded step's, else the flight's)


def _module_order(view: RunView, direction: str) -> dict[str, int]:
    """Registration order of the modules (forward order, roughly; backward runs reversed)."""
    names = view.meta.module_names
    if direction == "backward":
        names.reverse()
    return {name: i for i, name in enumerate(names)}


def first_nonfinite(
    view: RunView, bad: pd.DataFrame, markers: pd.DataFrame, direction: str
) -> FirstNonfinite | None:
    """The first recorded step with a non-finite value in ``direction`` and the first module
    in that direction's order at that step; None when every recorded value was finite.
    ``bad``: the flag rows above 0; ``markers``: the recorder's marker rows."""
    flags, marker, _ = DIRECTIONS[direction]
    bad = bad[bad.metric.isin(flags)]
    if bad.empty:
        return None
    step = int(bad.step.min())
    metric = next(f for f in flags if ((bad.step == step) & (bad.metric == f)).any())
    noted = view.meta.first_nonfinite.get(direction) or {}
    if noted.get("step") == step and noted.get("module") is not None:
        return FirstNonfinite(direction, step, str(noted["module"]), metric)
    candidates = markers[(markers.metric == marker) & (markers.step == step)]
    if candidates.empty:  # no marker row: any flagged module, in module order
        candidates = bad[bad.step == step]
    order = _module_order(view, direction)
    module = min(candidates.module.astype(str), key=lambda m: (order.get(m, len(order)), m))
    return FirstNonfinite(direction, step, module, metric)


def _loss_only(step: int, value: float, watched: bool) -> Finding:
    """The loss went NaN/Inf and no flag did. ``watched``: the flight recorder's flags cover
    that very step (all finite), so the loss itself overflowed, not a module between two
    recorded steps."""
    if watched:
        why = (
            "every watched module's output and gradient was finite at that step (the flight "
            "recorder watched it): the loss itself overflowed"
        )
        remedy = (
            "compute the loss so it stays finite for large errors (float32 or wider, a mean "
            "not a sum, a Huber loss instead of a squared one); lower the learning rate, add "
            "warm-up or gradient clipping"
        )
    else:
        why = (
            "no module output or gradient was non-finite at the recorded steps (the loss "
            "itself overflowed, or it began between them)"
        )
        remedy = (
            "record every step around it (a denser schedule, or the flight recorder) to find "
            "the module; lower the learning rate, add warm-up or gradient clipping"
        )
    return finding(
        NONFINITE,
        "error",
        f"the loss went non-finite at step {step} ({value}); {why}",
        module=RUN_MODULE,
        step=step,
        value=0.0,  # no flag held one: the count of non-finite module outputs, as below
        threshold=0.0,
        metric="loss",
        remedy=remedy,
    )


def skipped_overflow_steps(view: RunView, bad: pd.DataFrame | None = None) -> list[int]:
    """The steps of a run whose only non-finite values were gradients at steps the optimizer
    skipped, when it then stepped again (module docstring); [] otherwise. ``bad``: the flag
    rows above 0, when the caller has them."""
    if bad is None:
        rows = view.metrics(*FLAGS)
        bad = rows[rows.value > 0]
    backward = set(DIRECTIONS["backward"][0])
    if bad.empty or not bad.metric.isin(backward).all():
        return []
    if first_nonfinite_loss(view.metrics("loss")) is not None:
        return []
    stepped = set(view.metrics("lr").step.astype(int))
    steps = sorted(set(bad.step.astype(int)))
    if stepped & set(steps):
        return []
    # While the run trains (the online checks) the next step may still come: a scaler that
    # overflows at step 0 has stepped nowhere yet. An ended run must have stepped after.
    if view.meta.status != "running" and (not stepped or max(stepped) < steps[-1]):
        return []
    return steps


def _nonfinite(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    rows = view.metrics(*NONFINITE.needs)  # the rows the engine read to see they exist
    bad = rows[rows.metric.isin(FLAGS) & (rows.value > 0)]
    skipped = skipped_overflow_steps(view, bad)
    if skipped:
        yield _skipped(view, bad, skipped)
        return
    loss = first_nonfinite_loss(rows)
    if bad.empty:
        if loss is not None:
            # The flight recorder's forward flags are at every step it watched, 0 or 1.
            flight = (rows.metric == "flight_act_nonfinite") & (rows.step == loss[0])
            yield _loss_only(*loss, watched=bool(flight.any()))
        return
    markers = view.metrics(*(marker for _, marker, _ in DIRECTIONS.values()))
    firsts = [f for d in DIRECTIONS if (f := first_nonfinite(view, bad, markers, d)) is not None]
    count, steps = len(bad), int(pd.unique(bad.step).size)
    firsts.sort(key=lambda f: (f.step, list(DIRECTIONS).index(f.direction)))
    lead = firsts[0]
    what = DIRECTIONS[lead.direction][2]
    written = weights_written_nonfinite(view, lead.step)
    # The loss, where it made the first non-finite value itself (from finite outputs).
    made = loss if written is None and loss is not None else None
    made = made if made is not None and made_by_the_loss(view, rows, lead, made[0]) else None
    if made is not None:
        parts = [
            f"NaN/Inf from step {made[0]}, first in the loss ({made[1]}), from finite outputs "
            "(every watched module's output was finite in that step's forward): the loss "
            f"function made it, and its gradient carried it back (first the {what} of "
            f"{lead.module})"
        ]
        remedy = LOSS_MADE_REMEDY.get(str(view.meta.doc.get("loss_function")), LOSS_MADE)
    else:
        parts = [
            f"NaN/Inf from step {lead.step}, first in the {lead.direction} pass: the {what} "
            f"of {lead.module}",
            *([written] if written is not None else []),
        ]
        remedy = (
            UPDATE_REMEDY
            if written is not None
            else (
                f"look at {lead.module}: its {what} was the first non-finite one in "
                f"{lead.direction} order; "
                + (
                    BEFORE_ANY_UPDATE[lead.direction]
                    if not updated_before(view, lead.step)
                    else "lower the learning rate, add warm-up or gradient clipping"
                )
                + _precision_remedy(view, lead.module)
            )
        )
    parts += [
        f"{f.direction} pass: first the {DIRECTIONS[f.direction][2]} of {f.module} at step {f.step}"
        for f in firsts[1:]
    ]
    if loss is not None and made is None:
        parts.append(f"the loss went non-finite at step {loss[0]} ({loss[1]})")
    parts.append(f"{count} module outputs or gradients non-finite over {steps} steps")
    yield finding(
        NONFINITE,
        "error",
        "; ".join(parts),
        module=lead.module,
        step=lead.step,
        value=float(count),
        threshold=0.0,
        metric=lead.metric,
        remedy=remedy,
        # Loss scaling's paper explains a half-precision overflow; not one in float32 or
        # one the loss function made.
        citation=""
        if made is not None or _output_dtype(view, lead.module) in WIDE_DTYPES
        else NONFINITE.citation,
    )


#: The loss function made the first non-finite value from finite outputs: what to look at.
LOSS_MADE = (
    "look at the loss function's inputs: a log of 0 (a probability that underflowed: compute "
    "it from the raw scores with log_softmax or binary_cross_entropy_with_logits), a "
    "division by 0, a target it cannot reach; clamp or mask those items"
)
LOSS_MADE_REMEDY = {
    "ctc_loss": "a CTC loss is infinite where no alignment exists: a target longer than its "
    "input after the model's downsampling (or with repeats that need a blank between them); "
    "check input_lengths against target_lengths, drop those items, or pass "
    "CTCLoss(zero_infinity=True)",
}


def made_by_the_loss(view: RunView, rows: pd.DataFrame, lead: FirstNonfinite, at: int) -> bool:
    """Whether the first non-finite value is the loss's own: the loss went non-finite at
    ``at``, the first flag is a gradient of that very step (the backward carried it), and
    every forward flag of that step was recorded and 0 (a recorded step's, or the flight
    recorder's watched modules)."""
    if lead.direction != "backward" or lead.step != at:
        return False
    forward = rows[rows.metric.isin(DIRECTIONS["forward"][0]) & (rows.step == at)]
    return not forward.empty and not (forward.value.to_numpy(float) > 0).any()


#: Output dtypes whose range is float32's or wider: computing in float32 changes nothing.
WIDE_DTYPES = ("float32", "float64")


def _output_dtype(view: RunView, module: str) -> str | None:
    """``module``'s output dtype from meta.json's module table; None where not kept."""
    return next((m.get("output_dtype") for m in view.meta.modules if m.get("name") == module), None)


def updated_before(view: RunView, step: int) -> bool:
    """Whether an optimizer step ran before ``step`` in this run (an ``lr`` row is written
    where one stepped)."""
    stepped = view.metrics("lr").step
    return bool((stepped < step).any())


#: A non-finite value before any update: the weights are the init's (or the checkpoint's),
#: so the learning rate did not make it; the pass's own arithmetic did.
BEFORE_ANY_UPDATE = {
    "forward": "no optimizer step had run yet, so the learning rate did not make it: the "
    "forward computation does at these weights and inputs (an exp or a power of large "
    "values, a log or a division at 0, a sqrt of a negative, a NaN in the input)",
    "backward": "no optimizer step had run yet, so the learning rate did not make it: the "
    "backward computation does at these weights and inputs (the gradient of a sqrt, a norm "
    "or a pow with exponent below 1 at 0 is infinite; of a log at 0 too)",
}


def _precision_remedy(view: RunView, module: str) -> str:
    """The remedy's last clause for ``module``'s output dtype (meta.json's module table):
    a half-precision output overflows at 65504 (float16) where float32 would not; a float32
    one is already wide, so the clause names what overflows float32 instead. Runs written
    before the dtype was kept get the half-precision advice as well."""
    dtype = _output_dtype(view, module)
    if dtype in WIDE_DTYPES:
        return (
            f"; it computes in {dtype} already, so find what leaves that range there (an exp "
            "of large values, a division by values near 0, a log of 0)"
        )
    return ", or compute that module in float32"


#: The weights a step began with were already non-finite: an optimizer step wrote them.
UPDATE_REMEDY = (
    "the optimizer's update wrote non-finite weights: check its arithmetic in the weights' "
    "dtype (in float16 Adam's eps = 1e-8 rounds to 0, so a zero second moment divides 0 by "
    "0: keep the weights in float32 under autocast with a GradScaler, or raise eps), lower "
    "the learning rate, or clip the gradients"
)


def weights_written_nonfinite(view: RunView, step: int) -> str | None:
    """Where the weights that ``step``'s forward used (``param_norm``, read before the
    optimizer step) were already non-finite: the first non-finite output was their
    consequence, and the module that met them first in forward order only where they
    were. Says how many, and which update wrote them where the step before was recorded
    with finite weights; None where they were finite or not read at ``step``."""
    norms = view.metrics("param_norm")
    at = norms[norms.step == step]
    if at.empty:
        return None
    # The norm as measured: a norm taken in float16 also overflows to Inf above 65504 with
    # every weight finite, which only an update that grew them by that much does as well.
    bad = ~np.isfinite(at.value.to_numpy(float))
    if not bad.any():
        return None
    said = (
        f"the weights' norms were non-finite before step {step}'s forward ({int(bad.sum())} "
        f"of {len(at)} parameters, e.g. {at.module.astype(str).to_numpy()[bad][0]})"
    )
    before = norms[norms.step == step - 1]
    if not before.empty and np.isfinite(before.value.to_numpy(float)).all():
        said += f": the optimizer step of step {step - 1}, from finite weights, wrote them"
    return said


def _skipped(view: RunView, bad: pd.DataFrame, steps: list[int]) -> Finding:
    markers = view.metrics(DIRECTIONS["backward"][1])
    first = first_nonfinite(view, bad, markers, "backward")
    assert first is not None  # bad holds backward flags at these steps
    # The scaler skips until its scale fits: every step from the first flagged one to the
    # next that stepped (an lr row), also those whose overflow was in a parameter's own
    # gradient alone, which no watched output gradient shows.
    stepped = sorted(set(view.metrics("lr").step.astype(int)))
    resumed = next((s for s in stepped if s > steps[0]), None)
    burst = range(steps[0], resumed) if resumed is not None else range(steps[0], steps[0] + 1)
    skipped = sorted(set(burst) | set(steps))
    listed = ", ".join(map(str, skipped[:16])) + (", ..." if len(skipped) > 16 else "")
    shown = (
        "at each of them"
        if len(skipped) == len(steps)
        else f"at {len(steps)} of them (the others overflowed in parameters' own gradients)"
    )
    return finding(
        NONFINITE,
        "warning",
        f"the optimizer skipped {counted(len(skipped), 'step')} ({listed}), as dynamic loss "
        f"scaling does when its scale overflows: gradients were non-finite {shown}, first "
        f"the output gradient of {first.module}; the loss and every output stayed finite and "
        "training went on",
        module=first.module,
        step=first.step,
        value=float(len(skipped)),
        threshold=0.0,
        metric=first.metric,
        remedy="nothing if it stops early (the scaler found its scale); if it recurs, start "
        "the scaler lower (init_scale) or train in bfloat16",
    )


NONFINITE = Rule(
    "nonfinite",
    "Non-finite values",
    "Micikevicius et al. 2018, Mixed Precision Training (the skipped steps of loss scaling)",
    ("act_nonfinite", "grad_nonfinite", "loss", "flight_act_nonfinite", "flight_grad_nonfinite"),
    {},
    _nonfinite,
    # the flags and the loss, the markers, and lr: a step without one skipped its update
    # and the weights' norms, to tell weights an update wrote non-finite (before the forward)
    reads=(
        Request((*FLAGS, "loss", "first_nonfinite_forward", "first_nonfinite_backward", "lr")),
        Request(("param_norm",)),
    ),
)
