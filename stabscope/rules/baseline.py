"""``--baseline RUN_DIR``: did this change make a layer explode? Per-module activation and
gradient rms of the run against a stored run, at the steps both recorded."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..store import RUN_MODULE, RunMeta
from ..store.findings import Finding
from .view import Request, RunView

METRICS = ("act_rms", "grad_rms")
BASELINE = "baseline-regression"  # the rule id its findings carry


#: The share of the run's weight matrices (name and shape) the baseline must have: a change
#: that adds layers or widens one keeps most of them; another architecture keeps few.
SAME_MODEL_SHARE = 0.5


def another_model(run: RunMeta, base: RunMeta) -> str | None:
    """Why ``base`` is not a run of the model ``run`` recorded (before some change), or None:
    fewer than half of the run's weight matrices are in it by name and shape. Modules are
    compared by name, so another model's rows would be matched by accident (``0.weight``
    of an MLP against ``0.weight`` of a ViT) and read as a regression."""
    shapes = {p["name"]: p.get("shape") for p in base.parameters}
    matrices = [p for p in run.parameters if len(p.get("shape") or ()) >= 2]
    if not matrices:
        return None
    same = sum(shapes.get(p["name"]) == p.get("shape") for p in matrices)
    if same >= SAME_MODEL_SHARE * len(matrices):
        return None
    return (
        f"{same} of this run's {len(matrices)} weight matrices are in it with the same name "
        "and shape"
    )


#: The share of the steps both runs recorded at which a module must have moved by more than
#: the factor: a change to the model moves a layer at every step, a seed's transient at one.
PERSIST_SHARE = 0.5


def compare_to_baseline(
    run: RunView, base: RunView, factor: float = 10.0, floor: float = 1e-3
) -> Iterator[Finding]:
    """One error finding per metric whose worst module moved by more than ``factor``, at
    ``PERSIST_SHARE`` or more of the steps both runs recorded for it (a healthy Qwen2 run and
    its twin of another seed differ 550x in one module's grad_rms at one step of a rank
    collapse that both went through; a change that scales a layer moves it at every step).

    Module-steps where both runs sit below ``floor`` times the baseline's median of that
    metric are left out: a gradient of 1e-15 against 1e-12 is noise, not a regression.
    """
    for view in (run, base):
        view.plan([Request(METRICS)])
    for metric in METRICS:
        a, b = run.metrics(metric), base.metrics(metric)
        if a.empty or b.empty:
            continue
        key = ["step", "module", "call"]
        merged = a.merge(b, on=key, suffixes=("", "_base"))
        base_values = b.value.to_numpy(float)
        finite_base = base_values[np.isfinite(base_values)]
        scale = floor * float(np.median(finite_base)) if len(finite_base) else np.inf
        # Finite values on both sides: a NaN or Inf is the nonfinite rule's error, and its
        # ratio is no measure of how far a layer moved.
        finite = np.isfinite(merged.value.to_numpy(float)) & np.isfinite(
            merged.value_base.to_numpy(float)
        )
        merged = merged[
            finite
            & (merged.module != RUN_MODULE)
            & (merged.value_base > 0)
            & ((merged.value_base > scale) | (merged.value > scale))
        ]
        if merged.empty:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = merged.value.to_numpy(float) / merged.value_base.to_numpy(float)
        change = np.where(
            np.isfinite(ratio), np.maximum(ratio, 1 / np.maximum(ratio, 1e-300)), np.inf
        )
        over = pd.Series(change > factor, index=merged.index)
        lasting = over.groupby([merged.module, merged.call]).transform("mean") >= PERSIST_SHARE
        change = np.where(lasting.to_numpy() & over.to_numpy(), change, 0.0)
        worst = int(np.argmax(change))
        if change[worst] <= factor:
            continue
        row = merged.iloc[worst]
        moved = int((change > factor).sum())
        yield Finding(
            rule=BASELINE,
            severity="error",
            message=f"{metric} of {row.module} at step {int(row.step)} is {ratio[worst]:.3g}x "
            f"the baseline's ({row.value:.3g} vs {row.value_base:.3g}); {moved} "
            f"module-steps moved by more than {factor:g}x",
            module=str(row.module),
            step=int(row.step),
            value=float(change[worst]),
            threshold=factor,
            metric=metric,
            remedy="compare the two runs with `stabscope report RUN BASELINE`; the change "
            "between them altered this layer's scale",
        )
