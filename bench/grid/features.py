"""The forecast's trend features on every grid run, from its first K% of steps, and how well
each one separates the runs that failed from the healthy ones.

    python -m bench.grid.features --out /tmp/stabscope-grid --k 10

Prints a markdown table with one row per run of today's grid (``score.current_runs``) and
one column per feature of ``stabscope.rules.forecast_features`` (computed with ``until =
steps * K // 100``), then per feature the AUC of its value for failed against healthy runs:
pooled, per failure kind (each kind's failing configs against their healthy twins) and per
family. AUC = P(feature of a failed run > that of a healthy run), ties counting one half: 0.5
is chance, 1 a perfect separation with larger values on failed runs, 0 a perfect one the
other way. Runs where a feature is undefined (NaN) are left out of its AUC (``n`` says how
many pairs of failed/healthy runs remain); the AUCs use the stable runs only, as ``score``
does. Nothing is trained: the runs come from ``python -m bench.grid.run``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.grid.score import Run, current_runs, load, stable


def features_of(run: Run, k: int) -> dict[str, float]:
    from stabscope.rules.forecast_features import READS, trend_features
    from stabscope.rules.view import RunView

    view = RunView.open(run.path, until=max(1, run.steps * k // 100))
    view.plan(READS)
    return {name: f.value for name, f in trend_features(view).items()}


def auc(failed: list[float], healthy: list[float]) -> tuple[float, int, int]:
    """(AUC, failed runs, healthy runs) over the runs where the value is defined (inf is a
    value: larger than every finite one)."""
    f = np.array([x for x in failed if not math.isnan(x)])
    h = np.array([x for x in healthy if not math.isnan(x)])
    if not len(f) or not len(h):
        return math.nan, len(f), len(h)
    wins = (f[:, None] > h[None, :]).sum() + 0.5 * (f[:, None] == h[None, :]).sum()
    return float(wins / (len(f) * len(h))), len(f), len(h)


def _cell(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.2f}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def run_table(runs: list[Run], values: dict[Path, dict[str, float]], scored: set[Path]) -> str:
    names = list(next(iter(values.values())))
    head = ["run", "family", "kind", "failed", "failure step", "scored", *names]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in sorted(runs, key=lambda r: (r.kind, r.family, r.path.name)):
        cells = [r.path.name, r.family, r.kind, "yes" if r.failed else "no",
                 str(r.failure_step), "yes" if r.path in scored else "no"]  # fmt: skip
        cells += [_cell(values[r.path][n]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def auc_table(runs: list[Run], values: dict[Path, dict[str, float]], by: Callable) -> str:
    """Per feature (rows): the pooled AUC, then one per group of ``by(run)``."""
    names = list(next(iter(values.values())))
    groups = sorted({by(r) for r in runs})
    head = ["feature", "pooled", *groups]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in names:
        cells = [name]
        for group in [None, *groups]:
            sel = [r for r in runs if group is None or by(r) == group]
            a, nf, nh = auc(
                [values[r.path][name] for r in sel if r.failed],
                [values[r.path][name] for r in sel if not r.failed],
            )
            cells.append(f"{_cell(a)} ({nf}/{nh})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/stabscope-grid"))
    ap.add_argument("--k", type=int, default=10, help="percent of the planned steps seen")
    args = ap.parse_args()
    paths = current_runs(args.out)
    truths = {p: json.loads((p / "truth.json").read_text())["truth"] for p in paths}
    runs = [load(p) for p in paths]
    kept, dropped = stable(runs, truths)
    values = {r.path: features_of(r, args.k) for r in runs}
    seen = sum(r.failed and r.failure_step < max(1, r.steps * args.k // 100) for r in kept)
    n_fail = sum(r.failed for r in kept)
    print(f"# Trend features at K = {args.k}%: {len(runs)} runs, {len(kept)} scored "
          f"({n_fail} failed, {seen} of them before K%)\n")  # fmt: skip
    print(run_table(runs, values, {r.path for r in kept}))
    if dropped:
        print("\nNot scored (seeds disagree or too close to the margin): " + ", ".join(dropped))
    print("\nAUC of failed against healthy runs (cells: AUC (failed/healthy runs with a value))")
    print("\nPer failure kind (each kind's failing configs against their healthy twins):\n")
    print(auc_table(kept, values, lambda r: r.kind))
    print("\nPer family:\n")
    print(auc_table(kept, values, lambda r: r.family))


if __name__ == "__main__":
    main()
