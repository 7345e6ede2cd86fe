"""What the theory needs to know about a model: a plain description, checked.

Either written by hand (``stabscope predict --depth 96 --width 512 --norm post``) or read off
a built model (``stabscope.drivers.describe_model``), which fills in the measured init of every
projection and the measured moments of the first block's input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import DescriptionError
from .deepnorm import deepnorm_constants

NORMS = ("pre", "post", "deepnorm")
INITS = ("xavier", "torch", "normal")
ACTIVATIONS = ("gelu", "relu")
NORM_KINDS = ("layernorm", "rmsnorm")
ROLES = ("q", "k", "v", "o", "fc", "proj")
#: Projections DeepNet scales by β at init (the value, output and feed-forward weights).
BETA_ROLES = ("v", "o", "fc", "proj")


@dataclass
class Projection:
    """Init of one linear map: rms of the weight entries and of the bias."""

    std: float
    bias: float = 0.0

    def apply(self, fan_in: int, K: np.ndarray) -> np.ndarray:
        """Second moments of the output for input second moments ``K`` (T×T)."""
        return fan_in * self.std**2 * K + self.bias**2


@dataclass
class ModelDescription:
    """A stack of ``depth`` attention + feed-forward blocks of width ``width``.

    ``norm``: pre (x + f(LN(x))), post (LN(x + f(x))) or deepnorm (LN(α·x + f(x)) with the
    v/o/FFN init scaled by β). ``init``: xavier (std sqrt(2/(fan_in+fan_out)), zero bias),
    torch (nn.Linear's default: std and bias rms 1/sqrt(3·fan_in)) or normal (``init_std``,
    zero bias). ``alpha``/``beta`` default to 1 (DeepNet's table for deepnorm).
    ``projections``: measured init per block and role (q, k, v, o, fc, proj), which overrides
    ``init``; ``input_second``: measured T×T second moments of the first block's input,
    which overrides ``input_var``/``input_corr``. ``grad_corr``: the token correlation of the
    loss gradient entering the last block's output (all positions of equal variance);
    ``output_grad``: its measured T×T second moments, which override ``grad_corr``.
    """

    depth: int
    width: int
    heads: int = 4
    ffn: float = 4.0
    norm: str = "pre"
    init: str = "xavier"
    init_std: float = 0.02
    seq: int = 128
    causal: bool = True
    dropout: float = 0.0
    activation: str = "gelu"
    norm_kind: str = "layernorm"
    final_norm: bool | None = None
    alpha: float | None = None
    beta: float | None = None
    input_var: float = 1.0
    input_corr: float = 0.0
    projections: list[dict[str, Projection]] | None = None
    grad_corr: float = 0.0
    input_second: np.ndarray | None = field(default=None, repr=False)
    output_grad: np.ndarray | None = field(default=None, repr=False)
    modules: list[str] | None = None  # block names, when read off a model

    def __post_init__(self) -> None:
        _check_int("depth", self.depth, 1)
        _check_int("width", self.width, 2)
        _check_int("heads", self.heads, 1)
        _check_int("seq", self.seq, 1)
        if self.width % self.heads:
            raise DescriptionError(f"width {self.width} is not divisible by heads {self.heads}")
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("init", self.init, INITS),
            ("activation", self.activation, ACTIVATIONS),
            ("norm_kind", self.norm_kind, NORM_KINDS),
        ):
            if value not in allowed:
                raise DescriptionError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if not (self.ffn > 0 and round(self.ffn * self.width) >= 1):
            raise DescriptionError(f"ffn ratio must be positive, got {self.ffn}")
        if not 0.0 <= self.dropout < 1.0:
            raise DescriptionError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise DescriptionError(f"init std must be positive, got {self.init_std}")
        if not (self.input_var > 0 and -1.0 <= self.input_corr <= 1.0):
            raise DescriptionError("input variance must be positive and correlation in [-1, 1]")
        if self.norm == "pre" and self.alpha not in (None, 1.0):
            raise DescriptionError(
                f"alpha {self.alpha} scales the skip of post and deepnorm blocks, not pre"
            )
        if not -1.0 <= self.grad_corr <= 1.0:
            raise DescriptionError(f"gradient correlation must be in [-1, 1], got {self.grad_corr}")
        if self.projections is not None and len(self.projections) != self.depth:
            raise DescriptionError(
                f"{len(self.projections)} blocks of projections for depth {self.depth}"
            )
        for name, moments in (("input", self.input_second), ("output gradient", self.output_grad)):
            if moments is not None and moments.shape != (self.seq, self.seq):
                raise DescriptionError(f"{name} moments must be {self.seq}×{self.seq}")

    @property
    def hidden(self) -> int:
        return round(self.ffn * self.width)

    @property
    def residual_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return deepnorm_constants(0, self.depth)[""].alpha if self.norm == "deepnorm" else 1.0

    @property
    def init_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return deepnorm_constants(0, self.depth)[""].beta if self.norm == "deepnorm" else 1.0

    @property
    def has_final_norm(self) -> bool:
        return self.norm == "pre" if self.final_norm is None else self.final_norm

    def fans(self, role: str) -> tuple[int, int]:
        d, h = self.width, self.hidden
        return {"fc": (d, h), "proj": (h, d)}.get(role, (d, d))

    def projection(self, block: int, role: str) -> Projection:
        """The init of one projection: measured when known, else from ``init`` (and β)."""
        if self.projections is not None:
            return self.projections[block][role]
        fan_in, fan_out = self.fans(role)
        if self.init == "xavier":
            std, bias = math.sqrt(2.0 / (fan_in + fan_out)), 0.0
        elif self.init == "torch":
            std = bias = 1.0 / math.sqrt(3.0 * fan_in)
        else:
            std, bias = self.init_std, 0.0
        gain = self.init_beta if role in BETA_ROLES else 1.0
        return Projection(gain * std, bias)

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (the measured arrays summarised, not copied)."""
        out = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("projections", "input_second", "output_grad", "modules")
        }
        out.update(alpha=self.residual_alpha, beta=self.init_beta, final_norm=self.has_final_norm)
        out["measured_init"] = self.projections is not None
        out["measured_output_grad"] = self.output_grad is not None
        return out


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise DescriptionError(f"{name} must be an integer ≥ {low}, got {value!r}")
