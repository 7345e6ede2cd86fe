"""Fit the failure forecast on the grid, and score the gate with it leave-one-group-out.

    python -m bench.grid.fit --out /tmp/stabscope-grid [--ks 5,10,25] [--write]
                             [--signals a,b] [--l2 X]

The forecast (stabscope/rules/forecast_model.py) is a monotone logistic model of the signals
in SIGNALS. Its training rows are every stable grid run seen through each K% window (one row
per run and K); ``--write`` stores the fit on all families in
stabscope/rules/forecast_weights.json, the numbers the rule ships with. ``gate_scores`` is the
honest version: for each held-out family the model is fitted on the other families' rows only,
and the gate on a held-out run is "any other rule's error, or p >= the rule's error threshold
(0.8) from that fold's model". ``group="kind"`` holds out a failure kind instead (fitted on the
other kinds' failing runs and healthy twins): the closest the grid has to a failure kind the
forecast was never fitted on.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench.grid.score import Score, current_runs, load, stable
from bench.grid.signals import signals_and_errors
from stabscope.rules.forecast import FORECAST

#: The forecast's signals (stabscope.rules.forecast.signals names), each larger = worse.
SIGNALS = (
    "stability_now",
    "stability_peak",
    "stability_forecast",
    "init_logit_scale",
    "init_loss_ratio",
    "attn_logit_growth",
    "entropy_drop",
    "grad_norm_trend",
    "residual_growth",
    "update_ratio_level",
    "init_token_corr",
)
#: Signals that only add to what the others say (ForecastModel.risks).
RISKS = ("init_token_corr",)
L2 = 1.0  # the fit's penalty (forecast_model.fit)
ERROR = FORECAST.defaults["error"]  # the rule's own error threshold


def until_of(run, k: int) -> int:
    return max(1, run.steps * k // 100)


def rows(
    runs: list, sig: dict, ks: list[int], signals: tuple[str, ...] = SIGNALS
) -> tuple[list[dict], list[bool]]:
    xs, ys = [], []
    for r in runs:
        for k in ks:
            entry = sig[r.key][str(until_of(r, k))]
            xs.append({s: _num(entry["signals"].get(s)) for s in signals})
            ys.append(r.failed)
    return xs, ys


def _num(v) -> float:
    return math.nan if v is None else float(v)


def fit_on(
    runs: list, sig: dict, ks: list[int], signals: tuple[str, ...] = SIGNALS, l2: float = L2
):
    from stabscope.rules.forecast_model import fit

    xs, ys = rows(runs, sig, ks, signals)
    return fit(xs, ys, signals, l2=l2, risks=tuple(r for r in RISKS if r in signals))


#: The shares of a run whose forecast a check at its planned end also reads (the rule's
#: window, ``forecast.window_score``: ONLINE_FROM and ONLINE_UNTIL, 10% and 25%).
WINDOW_KS = (10, 25)


def detect(run, sig: dict, until: int, model) -> int | None:
    """The gate's first error step on the run's first ``until`` steps under ``model``. At
    the run's end the forecast is an error where its score there or at the window's cuts
    reaches the rule's error threshold, as the rule reads a finished run (where the cache
    holds those cuts)."""
    entry = sig[run.key][str(until)]
    other = entry["error"] if not isinstance(entry["error"], str) else None
    cuts = [entry]
    if until >= run.steps:
        cuts += [sig[run.key][c] for k in WINDOW_KS if (c := str(until_of(run, k))) in sig[run.key]]
    prob = max(
        model.probability({s: _num(e["signals"].get(s)) for s in model.features}) for e in cuts
    )
    known = entry.get("outcome_known", False)  # at its planned end, below ln V: a warning
    flagged = until - 1 if prob >= ERROR and not known else None
    found = [s for s in (other, flagged) if s is not None]
    return min(found) if found else None


def gate_scores(
    runs: list,
    sig: dict,
    k: int,
    ks: list[int],
    group: str = "family",
    signals: tuple[str, ...] = SIGNALS,
    l2: float = L2,
) -> dict[str, Score]:
    """Per held-out group (``group``: "family" or "kind", a Run attribute) and pooled: the
    gate with the forecast fitted without that group's runs."""
    scores: dict[str, Score] = {"pooled": Score()}
    for name in sorted({getattr(r, group) for r in runs}):
        held = [r for r in runs if getattr(r, group) == name]
        rest = [r for r in runs if getattr(r, group) != name]
        model = fit_on(rest, sig, ks, signals, l2)
        s = scores.setdefault(name, Score(thresholds=[ERROR]))
        for r in held:
            step = detect(r, sig, until_of(r, k), model)
            s.add(r, step)
            scores["pooled"].add(r, step)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/stabscope-grid"))
    ap.add_argument("--ks", default="5,10,25")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="store the fit in the package")
    ap.add_argument("--signals", default="", help="comma-separated: fit these, not SIGNALS")
    ap.add_argument("--l2", type=float, default=L2)
    args = ap.parse_args()
    signals = tuple(args.signals.split(",")) if args.signals else SIGNALS
    from stabscope.rules.forecast_model import WEIGHTS_FILE

    paths = current_runs(args.out)
    truths = {p: json.loads((p / "truth.json").read_text())["truth"] for p in paths}
    runs, _ = stable([load(p) for p in paths], truths)
    ks = [int(k) for k in args.ks.split(",")]
    untils = sorted({until_of(r, k) for r in runs for k in ks})
    sig = signals_and_errors(runs, untils, args.out, args.workers)
    model = fit_on(runs, sig, ks, signals, args.l2)
    for name, w, fill, scale in zip(model.features, model.weights, model.fill, model.scale):
        print(f"{name:22s} w={w:7.3f} fill={fill:8.3f} scale={scale:7.3f}")
    print(f"bias {model.bias:.3f}")
    for k in ks:
        for group, label in (("family", "LOFO"), ("kind", "LOKO")):
            scores = gate_scores(runs, sig, k, ks, group, signals, args.l2)
            p, r, lead = scores["pooled"].row()
            print(f"K={k}%: {label} gate P={p:.2f} R={r:.2f} lead={lead:.2f}", end="  ")
        print()
    if args.write:
        WEIGHTS_FILE.write_text(model.to_json() + "\n")
        print(f"wrote {WEIGHTS_FILE}")


if __name__ == "__main__":
    main()
