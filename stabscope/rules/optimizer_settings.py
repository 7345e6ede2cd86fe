"""Rules on the optimizer's own settings, read from meta.json's ``optimizers`` (no metric).

``adam-betas``: Adam's β1 at or above √β2. A gradient g seen once adds (1-β1)·β1^t·g to the
first moment t steps later and (1-β2)·β2^t·g² to the second, so its share of the update m/√v
is (1-β1)/√(1-β2) · (β1/√β2)^t: it fades only where β1 < √β2. At or above it an old gradient's
push grows with every step after it, and the per-coordinate update has no bound. The
convergence analyses assume β1 < √β2 (Reddi et al. 2018, for AMSGrad, γ = β1/√β2 < 1; Zhang
et al. 2022, "Adam Can Converge Without Any Modification on Update Rules", prove Adam
converges where β1 < √β2 and β2 is large, and show a region of small β2 where it diverges).
Measured on a byte-level GPT with Adam at betas (0.99, 0.9), ratio 1.04: the loss went from
4.9 to 5.8, against 1.5 with (0.9, 0.95).
The stability index cannot see it: with β1 = 0.99 Adam's threshold (2+2β1)/(1-β1) is ten times
that of 0.9, so the index reads lower (Cohen et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from ..store.findings import Finding
from .base import Rule, RunView, finding

ADAM_CONVERGENCE = "Reddi et al. 2018, On the Convergence of Adam and Beyond"


def _adam_betas(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    worst: tuple[float, str, int, list[float]] | None = None
    for optimizer in view.meta.optimizers:
        if not _adam_like(str(optimizer.get("class"))):
            continue
        for i, group in enumerate(optimizer.get("groups") or []):
            betas = group.get("betas")
            if not betas or betas[1] <= 0:
                continue
            ratio = betas[0] / math.sqrt(betas[1])
            if ratio >= p["max_ratio"] and (worst is None or ratio > worst[0]):
                worst = (ratio, str(optimizer.get("class")), i, betas)
    if worst is None:
        return
    ratio, name, group, (b1, b2) = worst
    yield finding(
        ADAM_BETAS,
        "error",
        f"{name} param group {group} has betas ({b1:g}, {b2:g}): β1 / √β2 = {ratio:.3g}, "
        f"not below {p['max_ratio']:g}, so a past gradient's share of the update grows "
        "every step instead of fading: the update has no bound",
        value=ratio,
        threshold=p["max_ratio"],
        remedy=f"keep β1 below √β2: raise β2 (0.95-0.999) or lower β1 (below {math.sqrt(b2):.3g})",
    )


def _adam_like(name: str) -> bool:
    """Optimizers whose update is m/√v (Adam, AdamW, NAdam, RAdam, fused and 8-bit ones):
    not Adamax (its v is a running max: the bound is β1 < β2) nor Lion (a sign update,
    bounded whatever its betas)."""
    lowered = name.lower()
    return "adam" in lowered and "adamax" not in lowered


ADAM_BETAS = Rule(
    "adam-betas",
    "Adam's β1 at or above √β2",
    ADAM_CONVERGENCE,
    (),
    {"max_ratio": 1.0},
    _adam_betas,
)

RULES = [ADAM_BETAS]
