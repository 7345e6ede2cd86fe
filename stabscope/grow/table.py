"""How the headline statistics scale with size: one row per run of a grow (or sweep), read
from the run directories alone (no torch), so it can be rebuilt from CI artifacts.

Columns (``SCALING_FILE``, CSV):

- ``run``, ``size``: the run's name and its size relative to the base along the swept axis
  (1 for the base); ``depth``, ``hidden``, ``mlp``, ``heads``, ``params``;
- ``max_abs_diff``: max |Δ output| against the base on the probe batches;
- ``loss_first``, ``loss_last``: loss at step 0 and the mean of the last tenth of the steps;
- ``grad_growth_init``: last layer's parameter-gradient norm over the first layer's at the
  first recorded step (Xiong et al. 2020; ``stabscope.analysis.summary.layer_param_grad_trends``);
  ``grad_growth_max`` and ``grad_growth_step``: its largest value over the recorded steps;
- ``grad_rms_per_layer``: the factor per layer of the module gradient rms (depth trend);
- ``act_rms_last``: forward rms of the last layer at the first recorded step, and
  ``act_rms_growth``: last layer over first layer;
- ``findings``: the rules' findings at warning or worse, ``rule:severity``.

``exponents`` fits each statistic against size on log-log axes (the slope a in stat ∝ size^a),
the way a coordinate check reads whether a quantity stays O(1) as the model grows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis.summary import depth_trend, layer_modules, layer_param_grad_trends, summarize
from ..rules import check_run
from ..store import load_meta, load_run

SCALING_FILE = "scaling.csv"
STATS = (
    "loss_first",
    "loss_last",
    "grad_growth_init",
    "grad_growth_max",
    "grad_rms_per_layer",
    "act_rms_last",
    "act_rms_growth",
)


def run_row(name: str, run_dir: Path, size: float) -> dict[str, object]:
    """The row of one run directory."""
    meta = load_meta(run_dir)
    grow = meta.config.get("grow") or {}
    shape = grow.get("shape") or {}
    summary = summarize(run_dir)
    grads = load_run(run_dir, metrics=["param_grad_norm"], phase="train")
    trends = layer_param_grad_trends(grads, meta)
    worst = max(trends, key=lambda t: _finite(t.first_to_last), default=None)
    acts = load_run(run_dir, metrics=["act_rms"], phase="train")
    act = depth_trend(acts, layer_modules(meta), "act_rms")
    findings = check_run(run_dir).findings
    return {
        "run": name,
        "size": size,
        **{k: shape.get(k) for k in ("depth", "hidden", "mlp", "heads")},
        "params": grow.get("params"),
        "max_abs_diff": (grow.get("preservation") or {}).get("max_abs_diff", 0.0),
        "loss_first": summary.loss_first,
        "loss_last": summary.loss_last,
        "grad_growth_init": trends[0].first_to_last if trends else None,
        "grad_growth_max": worst.first_to_last if worst else None,
        "grad_growth_step": worst.step if worst else None,
        "grad_rms_per_layer": summary.trend.factor_per_layer if summary.trend else None,
        "act_rms_last": act.values[-1] if act else None,
        "act_rms_growth": act.first_to_last if act else None,
        "findings": "; ".join(
            f"{f.rule}:{f.severity}" for f in findings if f.severity in ("error", "warning")
        ),
    }


def scaling_table(runs: list[tuple[str, Path, float]]) -> pd.DataFrame:
    """One row per ``(name, run_dir, size)``, in the order given."""
    return pd.DataFrame([run_row(name, path, size) for name, path, size in runs])


def exponents(table: pd.DataFrame) -> dict[str, float]:
    """Slope of log|stat| against log(size) for each statistic with two or more usable
    points (NaN otherwise)."""
    out = {}
    size = table["size"].to_numpy(float)
    for stat in STATS:
        y = pd.to_numeric(table[stat], errors="coerce").abs().to_numpy(float)
        ok = np.isfinite(y) & (y > 0) & (size > 0)
        unique = len(set(size[ok]))
        out[stat] = (
            float(np.polyfit(np.log(size[ok]), np.log(y[ok]), 1)[0]) if unique >= 2 else np.nan
        )
    return out


def write_table(table: pd.DataFrame, out: Path) -> Path:
    path = Path(out) / SCALING_FILE
    table.to_csv(path, index=False)
    return path


def _finite(x: float) -> float:
    return x if np.isfinite(x) else np.inf
