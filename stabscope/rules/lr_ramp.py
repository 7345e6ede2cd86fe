"""Rule ``lr-rise-past-catapult``: a planned lr rise that takes the stability index past the
largest step size a network still trains at.

The stability index S (``stability_features``) is the step size in units of the optimizer's
edge of stability: S = 1 is where the quadratic model of the next step starts to overshoot.
Past it, training can still recover by the catapult mechanism (Lewkowycz et al. 2020): the
loss rises, the curvature falls, and the run settles at a flatter point. That works up to a
largest lr of about 12/λ0 for wide ReLU networks under gradient descent, 6x the edge 2/λ0;
beyond it training diverges. This rule reads S where the run measured it last, scales it by
the planned lr's rise ahead (``stability_forecast``: a rise past the warm-up's peak and past
every lr already trained at; a warm-up, a decay or a restart to a known lr is no rise), and
is an error when the rise takes S past ``max_index`` (6) with the curvature kept.

The bound carries over to adaptive optimizers through the index, which is in units of each
optimizer's own edge (Cohen et al. 2022); the curvature does adapt as the lr rises, which is
what the margin of 6 over the edge leaves room for. On the development grid
(docs/benchmarks.md) the healthy runs whose plan rises after the warm-up (x3 to x10) read at
most 4.7 with K = 5% of their steps seen, and the ones that collapse or diverge on a larger
rise read 8 and more, but for one encoder-decoder collapse (1.9 to 4.8 with 5-10% seen).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from ..store.findings import Finding
from .base import Rule, RunView, finding
from .forecast import FAILED_READS, already_failed
from .stability_features import READS, stability_features

LEWKOWYCZ = (
    "Lewkowycz et al. 2020, The large learning rate phase of deep learning: the catapult "
    "mechanism; Cohen et al. 2022, Adaptive Gradient Methods at the Edge of Stability"
)


def _rise_past_catapult(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    if already_failed(view):  # non-finite already: ``nonfinite`` says where
        return
    ahead = stability_features(view)["stability_forecast"]
    if not math.isfinite(ahead.value) or ahead.value < math.log10(p["max_index"]):
        return
    index = 10**ahead.value
    seen = view.until if view.until is not None else view.meta.steps
    yield finding(
        LR_RISE,
        "error",
        f"the planned lr rise takes the stability index to {index:.3g}, past "
        f"{p['max_index']:g}x the edge, where training no longer recovers: {ahead.evidence}",
        module="__run__",
        step=max(seen - 1, 0),  # when it was said: the last step it saw
        value=index,
        threshold=p["max_index"],
        metric="stability_index",
        remedy=f"lower the planned rise at least {index / p['max_index']:.3g}x, or rise "
        "more slowly so the curvature can follow",
    )


LR_RISE = Rule(
    "lr-rise-past-catapult",
    "Planned lr rise past the catapult bound",
    LEWKOWYCZ,
    ("stability_index",),
    {"max_index": 6.0},
    _rise_past_catapult,
    reads=(*READS, *FAILED_READS),
    # A forecast to the planned end: ``check`` gives it; a run is stopped only for a failure
    # it has shown.
    online=False,
)

RULES = [LR_RISE]
