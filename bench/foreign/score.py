"""Score the gate on the foreign runs (bench/foreign/run.py): nothing here was ever fitted or
tuned on them.

    python -m bench.foreign.score --out /tmp/stabscope-foreign [--ks 10,25,100]

For each run and K: `stabscope.rules.check_run(run, until=K% of its recorded steps)` (the
whole run at 100%); the gate says "failing" when any finding is an error, at the earliest
error's step. Against the truth of the script's own loss log (truth.json), pooled precision,
recall and median lead ((failure step - detection step) / failure step, over true
positives), and the same for two loss-spike baselines that see the same steps: Megatron-style
(a loss above 10x the running max, or non-finite) and OLMo-style (a 6-sigma spike of the loss
or of the total gradient norm), from bench/forecast.py. Runs that did not run to their end
(stopped, crashed, 0 steps) are marked and scored once with, once without them.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.forecast import megatron, olmo
from bench.grid.score import Score

DETECTORS = ("gate", "megatron", "olmo")


@dataclass
class Row:
    name: str
    failed: bool  # the truth of the loss log
    reason: str
    failure_step: int
    status: str  # meta.json's status, or "missing"
    steps: int  # steps stabscope recorded
    budget: int
    cells: dict[int, dict] = field(default_factory=dict)  # K -> detector -> step, p, errors

    @property
    def complete(self) -> bool:
        return self.status == "complete" and self.steps > 0

    @property
    def nominal_failing(self) -> bool:
        """What the variant was written to do: -ok variants train, the others fail."""
        return not self.name.split("-", 1)[1].startswith("ok")


def gate_at(run: Path, until: int | None) -> dict:
    """The gate's verdict on the steps before ``until`` (None: all): the earliest error's
    step (or None), the failure forecast's p and the error rules."""
    from stabscope.rules import check_run

    try:
        findings = check_run(run, until=until).findings
    except Exception as error:  # a crash of the gate is reported, not scored as a verdict
        return {"gate": None, "p": None, "errors": [f"crash: {type(error).__name__}"]}
    errors = [f for f in findings if f.severity == "error"]
    forecast = [f.value for f in findings if f.rule == "failure-forecast"]
    return {
        "gate": min((f.step or 0) for f in errors) if errors else None,
        "p": forecast[0] if forecast else None,
        "errors": sorted({f.rule for f in errors}),
    }


def spikes_at(run: Path, until: int) -> dict:
    from stabscope import load_run

    try:
        loss = load_run(run, metrics="loss").sort_values("step")
        values, steps = loss.value.to_numpy(float), loss.step.to_numpy()
        return {"megatron": megatron(values, steps, until), "olmo": olmo(run, until)}
    except Exception:  # a run with nothing recorded: no spike to see
        return {"megatron": None, "olmo": None}


def score_run(out: Path, name: str, ks: list[int]) -> Row:
    from stabscope import read_meta

    run = out / name
    record = json.loads((run / "truth.json").read_text())
    t = record["truth"]
    try:
        meta = read_meta(run)
        status, steps = str(meta.get("status")), int(meta.get("steps") or 0)
    except Exception:
        status, steps = "missing", 0
    row = Row(name, t["failed"], t["reason"], t["failure_step"], status, steps, record["steps"])
    for k in ks:
        until = max(1, steps * k // 100) if k < 100 else None
        row.cells[k] = {**gate_at(run, until), **spikes_at(run, until or steps)}
    return row


def pooled(rows: list[Row], k: int, detector: str) -> Score:
    s = Score()
    for r in rows:
        s.add(r, r.cells[k][detector])  # type: ignore[arg-type]  # duck-typed Run
    return s


def cell(c: dict) -> str:
    p = "-" if c["p"] is None else f"{c['p']:.2f}"
    return f"p {p}: {', '.join(c['errors']) or 'pass'}"


def markdown(rows: list[Row], ks: list[int]) -> str:
    n_failed = sum(r.failed for r in rows)
    lines = [
        f"{len(rows)} runs, {n_failed} failed by their own loss logs",
        "",
        "| run | truth (loss log) | steps | " + " | ".join(f"K = {k}%" for k in ks) + " |",
        "|---|---|---|" + "---|" * len(ks),
    ]
    for r in rows:
        truth = f"FAIL: {r.reason}" if r.failed else "healthy"
        steps = f"{r.steps}" if r.complete else f"{r.steps} of {r.budget} ({r.status})"
        lines.append(f"| {r.name} | {truth} | {steps} | "
                     + " | ".join(cell(r.cells[k]) for k in ks) + " |")  # fmt: skip
    odd = [r for r in rows if r.failed != r.nominal_failing]
    if odd:
        lines += ["", "Truth against the variant's intent: " + "; ".join(
            f"{r.name} was written to {'fail' if r.nominal_failing else 'train'}, its log says "
            + (f"FAIL ({r.reason})" if r.failed else "healthy") for r in odd) + "."]  # fmt: skip
    for title, subset in (("all runs", rows), ("runs that ran to their end", [
            r for r in rows if r.complete])):  # fmt: skip
        lines += ["", f"Pooled, {title} ({len(subset)}, {sum(r.failed for r in subset)} failed):",
                  "", "| detector | K | precision | recall | median lead | flagged |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for k in ks:
            for d in DETECTORS:
                s = pooled(subset, k, d)
                cols = " | ".join("-" if math.isnan(x) else f"{x:.2f}" for x in s.row())
                lines.append(f"| {d} | {k}% | {cols} | {s.tp + s.fp} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/stabscope-foreign"))
    ap.add_argument("--ks", default="10,25,100", help="the cut-offs, in %% of the recorded steps")
    args = ap.parse_args()
    from bench.foreign.run import VARIANTS

    ks = [int(k) for k in args.ks.split(",")]
    names = [v.name for v in VARIANTS if (args.out / v.name / "truth.json").exists()]
    if not names:
        ap.error(f"no runs in {args.out} (hint: python -m bench.foreign.run --out {args.out})")
    rows = [score_run(args.out, name, ks) for name in names]
    dump = [{**r.__dict__, "cells": {str(k): v for k, v in r.cells.items()}} for r in rows]
    (args.out / "score.json").write_text(json.dumps(dump, indent=1, default=_plain))
    print(markdown(rows, ks))


def _plain(x: object) -> object:
    return x.item() if isinstance(x, np.generic) else str(x)


if __name__ == "__main__":
    main()
