"""The predicted per-layer profile, its verdict, and its file format (``prediction.json``).

Format (``format`` = "stabscope-prediction", ``version`` 1)::

    {"format": "stabscope-prediction", "version": 1,
     "theory": "<citation>",
     "description": {depth, width, heads, ffn, norm, init, seq, ..., alpha, beta},
     "input": {"second_moment": float, "token_corr": float, "source": str},
     "layers": [{"index": 0, "module": "blocks.0" | null, "act_mean": float,
                 "act_var": float, "act_rms": float, "grad_rms_rel": float,
                 "token_corr": float}, ...],
     "headline": {"grad_ratio_first_last": float, "act_rms_growth": float,
                  "final_token_corr": float},
     "verdict": {"severity": "ok" | "warning" | "error", "reasons": [str, ...]}}

``act_*`` are the moments of each block's output (``act_rms`` is what the recorder's
``act_rms`` estimates); ``grad_rms_rel`` is the rms of dL/d(block output) over that of the last
block's output; ``token_corr`` is the recorder's ``token_corr`` (mean off-diagonal over mean
diagonal of the token Gram matrix, on the same ≤ 64 evenly spaced positions).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .blocks import input_signal, propagate
from .components import token_correlation
from .description import ModelDescription

FORMAT = "stabscope-prediction"
VERSION = 1
PREDICTION_FILE = "prediction.json"
KEDIA = (
    "Kedia et al. 2024, Transformers Get Stable: An End-to-End Signal Propagation Theory for "
    "Language Models (ICML 2024), Table 1"
)
#: Verdict thresholds: the gradient ratio either way, and the final token correlation. The
#: same warning/error levels as the gradient-growth and rank-collapse rules.
GRADIENT_RATIO = {"warning": 10.0, "error": 100.0}
TOKEN_CORR = {"warning": 0.95, "error": 0.99}
PROBE_TOKENS = 64  # positions the token_corr probe samples


@dataclass
class LayerPrediction:
    index: int
    module: str | None
    act_mean: float
    act_var: float
    act_rms: float
    grad_rms_rel: float
    token_corr: float


@dataclass
class Prediction:
    description: dict[str, Any]
    input: dict[str, Any]
    layers: list[LayerPrediction]
    verdict: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> dict[str, float]:
        first, last = self.layers[0], self.layers[-1]
        return {
            "grad_ratio_first_last": first.grad_rms_rel / last.grad_rms_rel,
            "act_rms_growth": last.act_rms / first.act_rms,
            "final_token_corr": last.token_corr,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "theory": KEDIA,
            "description": self.description,
            "input": self.input,
            "layers": [vars(layer) for layer in self.layers],
            "headline": self.headline,
            "verdict": self.verdict,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        # A NaN was written as null (``_finite``): read it back as NaN, the number it was.
        layers = [LayerPrediction(**_nan_for_null(layer)) for layer in data["layers"]]
        return cls(data["description"], data["input"], layers, data.get("verdict", {}))

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=1) + "\n"

    def module_names(self, blocks: list[str]) -> list[str | None]:
        """Each layer's module: the one stored with it, else the run's block at its index
        (``blocks``: the block names of the run's structure), else None."""
        return [
            layer.module or (blocks[i] if i < len(blocks) else None)
            for i, layer in enumerate(self.layers)
        ]


def probe_positions(tokens: int) -> np.ndarray:
    """The positions the token_corr probe samples (evenly spaced, at most 64)."""
    return np.unique(np.round(np.linspace(0, tokens - 1, min(PROBE_TOKENS, tokens))).astype(int))


def predict(desc: ModelDescription) -> Prediction:
    """The per-block profile at init for ``desc``, with its verdict. An init far out of
    range (weights of std 1 at width 64) overflows float64 in the attention's e^c: the
    profile then holds inf or NaN, which is the prediction (stored as null, read back as NaN,
    judged by no rule), so numpy is not let print its warnings into the user's run."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _predict(desc)


def _predict(desc: ModelDescription) -> Prediction:
    prop = propagate(desc)
    positions = probe_positions(desc.seq)
    last_grad = float(np.mean(np.diag(prop.gradient[-1])))
    layers = []
    for i, (x, g) in enumerate(zip(prop.forward, prop.gradient)):
        second = x.second_moment
        mean = float(np.mean(x.mean))
        layers.append(
            LayerPrediction(
                index=i,
                module=desc.modules[i] if desc.modules else None,
                act_mean=mean,
                act_var=second - mean * mean,
                act_rms=math.sqrt(second),
                grad_rms_rel=math.sqrt(float(np.mean(np.diag(g))) / last_grad),
                token_corr=token_correlation(x.K, positions),
            )
        )
    x0 = input_signal(desc)
    source = "measured on the first batch" if desc.input_second is not None else "description"
    inputs = {
        "second_moment": x0.second_moment,
        "token_corr": token_correlation(x0.K, positions),
        "source": source,
    }
    prediction = Prediction(desc.summary(), inputs, layers)
    prediction.verdict = verdict(prediction)
    return prediction


def verdict(prediction: Prediction) -> dict[str, Any]:
    """What the theory says about this init: ok, warning or error, with the reasons."""
    head = prediction.headline
    reasons: list[tuple[str, str]] = []
    ratio = head["grad_ratio_first_last"]
    grow = max(ratio, 1.0 / ratio) if ratio > 0 else math.inf
    for level in ("error", "warning"):
        if grow > GRADIENT_RATIO[level]:
            way = "grow" if ratio > 1 else "vanish"
            reasons.append(
                (level, f"gradients {way} toward the input: first/last layer ×{ratio:.3g}")
            )
            break
    corr = head["final_token_corr"]
    for level in ("error", "warning"):
        if corr > TOKEN_CORR[level]:
            reasons.append((level, f"rank collapse: token correlation {corr:.3f} at the output"))
            break
    severity = "ok"
    if reasons:
        severity = "error" if any(lv == "error" for lv, _ in reasons) else "warning"
    return {"severity": severity, "reasons": [text for _, text in reasons]}


def load_prediction(path: str | Path) -> Prediction:
    """Read a prediction file (or ``RUN_DIR/prediction.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / PREDICTION_FILE
    return Prediction.from_dict(json.loads(path.read_text(encoding="utf-8")))


def stored_prediction(run_dir: str | Path) -> Prediction | None:
    """A run's ``prediction.json``; None when it has none or this version cannot read it."""
    try:
        return load_prediction(Path(run_dir) / PREDICTION_FILE)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _nan_for_null(layer: dict[str, Any]) -> dict[str, Any]:
    """A stored layer with its nulls (NaN on write) as NaN; ``module`` may be null."""
    return {k: math.nan if v is None and k != "module" else v for k, v in layer.items()}


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
