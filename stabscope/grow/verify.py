"""Does the grown model compute what the base computes? Outputs compared on probe batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..record.side_forward import side_forward

#: Absolute tolerance per unit of output scale: float32 keeps ~7 digits, and a grown model
#: sums in other orders and over longer (zero-padded) dot products; see docs/grow.md.
RELATIVE_TOLERANCE = 1e-5
#: For outputs in a coarser float type (bfloat16, float16): this many units of its rounding
#: error. Measured on the 24-layer sample GPT grown 2x in depth, MLP, heads and head size:
#: up to 4.6 eps in bfloat16 and 6.6 eps in float16 (docs/grow.md).
EPS_TOLERANCE = 16


@dataclass
class Preservation:
    """``max_abs_diff``: max |grown output − base output| over all probe batches; an output
    that is NaN or ±Inf in both models alike counts as kept (a NaN is data, and the grown
    model reproduces it), one that is non-finite in only one of them as an infinite change.
    ``nonfinite``: how many base outputs were NaN or ±Inf."""

    max_abs_diff: float
    max_abs_output: float
    tolerance: float
    batches: int
    nonfinite: int = 0

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def default_tolerance(max_abs_output: float, dtype: torch.dtype = torch.float32) -> float:
    """1e-5 of the output's scale (and at least 1e-5); for a coarser float type of the
    output, 16 of its rounding errors (eps) of the output's scale."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(RELATIVE_TOLERANCE, EPS_TOLERANCE * eps) * max(1.0, max_abs_output)


def compare(
    base: nn.Module,
    grown: nn.Module,
    probes: Iterable[Any],
    output: Callable[[nn.Module, Any], torch.Tensor],
    tolerance: float | None = None,
) -> Preservation:
    """Run both models in eval mode without gradients on each probe; ``output(model, probe)``
    returns the output tensor to compare (logits)."""
    worst, scale, n, nonfinite = 0.0, 0.0, 0, 0
    dtype = torch.float32
    # Every submodule's mode (a frozen BatchNorm stays frozen), RNG and buffers given back.
    with side_forward(base, grown), torch.no_grad():
        for probe in probes:
            a, b = output(base, probe), output(grown, probe)
            dtype = a.dtype
            a, b = a.double(), b.double()
            worst = max(worst, _max_change(a, b))
            finite = a[torch.isfinite(a)]
            scale = max(scale, float(finite.abs().max()) if finite.numel() else 0.0)
            nonfinite += a.numel() - finite.numel()
            n += 1
    tol = default_tolerance(scale, dtype) if tolerance is None else tolerance
    return Preservation(worst, scale, tol, n, nonfinite)


def _max_change(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))  # equal infinities, or NaN in both
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return float(torch.nan_to_num(diff, nan=math.inf).max()) if diff.numel() else 0.0
