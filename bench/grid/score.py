"""Leave-one-out scores of early-warning detectors on the grid (bench/grid/run.py).

    python -m bench.grid.score --out /tmp/stabscope-grid [--ks 5,10,25] [--workers 2]
    python -m bench.grid.score --out DIR --ks 5,10,25,100   # + the finished runs

Each detector sees only the steps before K% of the budget and says "failing" at a step, or
nothing. A detector with thresholds is calibrated on the other families (the threshold with
the best F1 there; ties go to its default) and scored on the held-out family; every run is
scored once, by the fold that holds it out, and "pooled" sums those outcomes. The same is
then done holding out one failure kind at a time (its failing runs and their healthy twins):
the closest the grid has to a kind of failure nothing was calibrated on.

    gate      any error finding of stabscope's rules on the first K% (bench/grid/fit.py): the
              failure forecast fitted on the other families, or another rule's error
    rules     the other rules' errors alone (no forecast); a crash counts as no verdict
    megatron  a loss above F x the running max of the earlier losses, or a non-finite loss
    olmo      a S-sigma spike of the loss, or of the total gradient norm (recorded steps)

precision = TP / flagged, recall = TP / failed, lead = (failure step - detection step) /
failure step, the median over true positives. Configs whose truth is unstable (the seeds
disagree, or a run sits within the truth's BAND of its margin) are left out and listed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.forecast import megatron, six_sigma
from bench.grid import report


@dataclass
class Run:
    name: str  # config name
    seed: int
    family: str
    kind: str
    failed: bool
    failure_step: int
    steps: int
    path: Path
    loss: np.ndarray = field(repr=False)  # (steps,)
    grad: tuple[np.ndarray, np.ndarray] = field(repr=False)  # recorded steps, total norm
    key: str = ""  # directory name and run id: a retrained run is a new key


def load(path: Path) -> Run:
    from stabscope import load_run, read_meta

    rec = json.loads((path / "truth.json").read_text())
    loss = load_run(path, metrics="loss").sort_values("step").value.to_numpy(float)
    grads = load_run(path, metrics="param_grad_norm")
    total = grads.groupby("step").value.apply(lambda v: float(np.sqrt(np.sum(v**2))))
    t = rec["truth"]
    return Run(rec["name"], rec["seed"], rec["family"], rec["kind"], t["failed"],
               t["failure_step"], rec["steps"], path, loss,
               (total.index.to_numpy(), total.to_numpy(float)),
               f"{path.name}#{read_meta(path)['run_id']}")  # fmt: skip


def stable(runs: list[Run], truths: dict[Path, dict]) -> tuple[list[Run], list[str]]:
    """The runs of configs whose seeds agree and sit clear of the margin; the others' names."""
    by_config: dict[str, list[Run]] = {}
    for r in runs:
        by_config.setdefault(r.name, []).append(r)
    dropped = [
        name
        for name, rs in by_config.items()
        if len({r.failed for r in rs}) > 1 or any(truths[r.path]["ambiguous"] for r in rs)
    ]
    return [r for r in runs if r.name not in dropped], sorted(dropped)


def current_runs(out: Path) -> list[Path]:
    """The run directories of today's grid (runs of configs since changed or removed are not
    scored: ``run`` retrains the changed ones)."""
    from bench.grid.failures import GRID
    from bench.grid.run import TRUTH, settings

    found = []
    for config in GRID:
        for path in sorted(out.glob(f"{config.name}-s*/{TRUTH}")):
            rec = json.loads(path.read_text())
            if rec["name"] == config.name and rec["sets"] == settings(config, rec["steps"]):
                found.append(path.parent)
    return found


# --- detectors: (run, until, threshold) -> first detection step or None ---------------------


def megatron_at(run: Run, until: int, factor: float) -> int | None:
    return megatron(run.loss, np.arange(len(run.loss)), until, factor)


def olmo_at(run: Run, until: int, sigma: float) -> int | None:
    hits = [
        six_sigma(run.loss, np.arange(len(run.loss)), until, sigma),
        six_sigma(run.grad[1], run.grad[0], until, sigma),
    ]
    return min((h for h in hits if h is not None), default=None)


def source_fingerprint() -> str:
    """A hash of stabscope's sources and of this grid's scoring code: cached gate verdicts
    are reused only for the same code."""
    repo = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for root in (repo / "stabscope", Path(__file__).resolve().parent):
        for path in sorted(root.rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Detector:
    name: str
    detect: Callable[[Run, int, float], int | None]
    default: float
    thresholds: tuple[float, ...]


def outcome(run: Run, step: int | None) -> str:
    flagged = step is not None
    return {(True, True): "tp", (False, True): "fp", (True, False): "fn"}.get(
        (run.failed, flagged), "tn"
    )


def f1(outcomes: list[str]) -> float:
    tp, fp, fn = (outcomes.count(o) for o in ("tp", "fp", "fn"))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def calibrate(det: Detector, runs: list[Run], until: int) -> float:
    """The threshold with the best F1 on ``runs``; ties go to the default."""
    best = max(
        det.thresholds,
        key=lambda t: (f1([outcome(r, det.detect(r, until, t)) for r in runs]), t == det.default),
    )
    return best


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    leads: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)

    def add(self, run: Run, step: int | None) -> None:
        o = outcome(run, step)
        if o in ("tp", "fp", "fn"):
            setattr(self, o, getattr(self, o) + 1)
        if o == "tp" and run.failure_step > 0:
            self.leads.append((run.failure_step - step) / run.failure_step)

    def row(self) -> tuple[float, float, float]:
        nan = float("nan")
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else nan
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else nan
        return precision, recall, statistics.median(self.leads) if self.leads else nan


def lofo(det: Detector, runs: list[Run], k: int, group: str = "family") -> dict[str, Score]:
    """Per held-out group (``group``: "family" or "kind") and "pooled": the scores with
    thresholds from the other groups."""
    scores: dict[str, Score] = {"pooled": Score()}
    for name in sorted({getattr(r, group) for r in runs}):
        held = [r for r in runs if getattr(r, group) == name]
        rest = [r for r in runs if getattr(r, group) != name]
        until = max(1, held[0].steps * k // 100)
        thr = calibrate(det, rest, until) if len(det.thresholds) > 1 else det.default
        s = scores.setdefault(name, Score(thresholds=[thr]))
        for r in held:
            step = det.detect(r, max(1, r.steps * k // 100), thr)
            s.add(r, step)
            scores["pooled"].add(r, step)
        scores["pooled"].thresholds.append(thr)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/stabscope-grid"))
    ap.add_argument("--ks", default="5,10,25", help="the cut-offs scored, in %% of the run")
    ap.add_argument(
        "--fit-ks",
        default="5,10,25",
        help="the cut-offs each fold's forecast is fitted on (as the shipped fit: 5,10,25)",
    )
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    paths = current_runs(args.out)
    truths = {p: json.loads((p / "truth.json").read_text())["truth"] for p in paths}
    all_runs = [load(p) for p in paths]
    runs, dropped = stable(all_runs, truths)
    from bench.grid.fit import gate_scores
    from bench.grid.signals import signals_and_errors

    ks = [int(k) for k in args.ks.split(",")]
    fit_ks = [int(k) for k in args.fit_ks.split(",")]
    untils = sorted({max(1, r.steps * k // 100) for r in runs for k in {*ks, *fit_ks}})
    sig = signals_and_errors(runs, untils, args.out, args.workers)

    def rules_at(run: Run, until: int, _: float) -> int | None:
        found = sig[run.key][str(until)]["error"]
        return None if isinstance(found, str) else found

    detectors = [
        Detector("rules", rules_at, 0.0, (0.0,)),
        Detector("megatron", megatron_at, 10.0, (2.0, 3.0, 5.0, 10.0, 30.0, 100.0)),
        Detector("olmo", olmo_at, 6.0, (3.0, 4.0, 6.0, 8.0)),
    ]
    notes = {}
    for k in ks:
        until = {r.path: max(1, r.steps * k // 100) for r in runs}
        crashes = sum(isinstance(sig[r.key][str(until[r.path])]["error"], str) for r in runs)
        early = sum(r.failed and r.failure_step < until[r.path] for r in runs)
        notes[k] = f"rule crashes: {crashes}; runs failed before K%: {early}"
    tables = {
        group: {
            k: {
                "gate": gate_scores(runs, sig, k, fit_ks, group),
                **{d.name: lofo(d, runs, k, group) for d in detectors},
            }
            for k in ks
        }
        for group in report.GROUPS
    }
    print(report.markdown(all_runs, runs, dropped, truths, tables, notes))


if __name__ == "__main__":
    main()
