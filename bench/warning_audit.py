"""How often each rule warns (or errs) on healthy runs against failing ones, over stored runs.

A warning does not fail the gate, but one that fires as often on healthy runs as on failing
ones teaches readers to skip warnings. This reads runs whose outcome is known and counts,
per rule and severity, the healthy and failing runs it speaks on:

- ``--grid DIR``: a grid's runs (``python -m bench.grid.score --out DIR``), each with its
  ``truth.json`` (``truth.failed``);
- ``--trial TOOL_DIR``: a blind trial's profiled runs (``TOOL_DIR/runs/NAME.full``), its
  truth in ``TOOL_DIR/../truth.json`` (``NAME: {"truth": "FAILING" | "HEALTHY"}``).

    python bench/warning_audit.py --grid /tmp/grid/v5 --trial /tmp/trial33/tool_snap46

Runs are judged whole, with the shipped rules (``check_run``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from stabscope.rules import check_run


def grid_runs(root: Path) -> Iterator[tuple[Path, bool]]:
    for truth in sorted(root.glob("*/truth.json")):
        yield truth.parent, bool(json.loads(truth.read_text())["truth"]["failed"])


def trial_runs(tool_dir: Path) -> Iterator[tuple[Path, bool]]:
    truth = json.loads((tool_dir.parent / "truth.json").read_text())
    for name, row in sorted(truth.items()):
        run = tool_dir / "runs" / f"{name}.full"
        if run.is_dir():
            yield run, row["truth"] == "FAILING"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=Path, action="append", default=[])
    ap.add_argument("--trial", type=Path, action="append", default=[])
    args = ap.parse_args()
    runs = [r for g in args.grid for r in grid_runs(g)]
    runs += [r for t in args.trial for r in trial_runs(t)]
    totals: Counter[bool] = Counter()
    spoke: Counter[tuple[str, str, bool]] = Counter()
    for i, (run, failed) in enumerate(runs, 1):
        totals[failed] += 1
        found = {(f.rule, f.severity) for f in check_run(run).findings}
        for rule, severity in found:
            spoke[rule, severity, failed] += 1
        print(f"\r{i}/{len(runs)}", end="", flush=True)
    print(f"\n{totals[False]} healthy and {totals[True]} failing runs\n")
    print("| rule | severity | healthy runs | failing runs |")
    print("|---|---|---|---|")
    for rule, severity in sorted({(r, s) for r, s, _ in spoke}):
        h, f = spoke[rule, severity, False], spoke[rule, severity, True]
        print(f"| `{rule}` | {severity} | {h} | {f} |")


if __name__ == "__main__":
    main()
