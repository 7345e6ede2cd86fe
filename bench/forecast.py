"""Does the gate see a failing run coming? A grid of sample-GPT runs, the gate's verdict from
the first K% of steps, against what happened by the end of the step budget.

    python bench/forecast.py                    # the grid below, 2 worker processes
    python bench/forecast.py --steps 150 --seeds 2 --workers 2 --out /tmp/forecast
    python bench/forecast.py --grid high-lr --out /tmp/forecast-high-lr   # held-out grid

Ground truth: a run FAILED when its loss or any recorded statistic went non-finite, or when
the mean loss over the last 10% of steps is at least half the loss at step 0 (the sample's
loss falls from ~4 to ~0.76 when it learns; a stuck deep Post-LN stays near 3.2).
Failure step: the first non-finite step, else the step budget.

Detectors, each given only the steps before K% of the budget:
  gate      any error finding of `stabscope check` (standard preset, default thresholds)
  megatron  a loss above 10x the running max of the earlier losses, or a non-finite loss
  olmo      a 6-sigma spike of the loss, or of the total gradient norm (recorded steps), over
            the previous up to 128 values (at least 8)
Reported: precision, recall and median lead time (failure step minus the first detection).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {
    # depth 6-48, every norm placement, lr 3e-4 to 3e-3, warm-up on or off.
    "main": {
        "depth": [6, 24, 48],
        "norm": ["pre", "post", "deepnorm"],
        "lr": [3e-4, 1e-3, 3e-3],
        "warmup": [0, 50],
    },
    # Held out from the thresholds' calibration: shallow models at learning rates 3-10x
    # above the main grid, where failure comes from the learning rate rather than depth.
    "high-lr": {
        "depth": [6, 12],
        "norm": ["pre", "post", "deepnorm"],
        "lr": [1e-2, 3e-2],
        "warmup": [0],
    },
}


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from stabscope.drivers.profile import profile_script
    from stabscope.drivers.script import load_script
    from stabscope.record.config import RecorderConfig

    sets = {k: str(job[k]) for k in ("depth", "norm", "lr", "warmup")}
    script = load_script(ROOT / "sample_models" / "gpt.py", sets)
    out = Path(job["out"])
    profile_script(
        script, out, job["steps"], RecorderConfig(), seed=job["seed"], device="cpu", force=True
    )
    return job


def truth(run_dir: Path, steps: int) -> tuple[bool, int]:
    from stabscope import load_run, read_meta

    loss = load_run(run_dir, metrics="loss").sort_values("step")
    values = loss.value.to_numpy(float)
    meta = read_meta(run_dir)
    bad_steps = [w["step"] for w in (meta.get("first_nonfinite") or {}).values()]
    bad_steps += loss.step[~np.isfinite(values)].tolist()
    if bad_steps:
        return True, int(min(bad_steps))
    tail = values[-max(1, len(values) // 10) :]
    return bool(tail.mean() >= 0.5 * values[0]), steps


def gate(run_dir: Path, until: int) -> int | None:
    from stabscope.rules import check_run

    errors = [f for f in check_run(run_dir, until=until).findings if f.severity == "error"]
    return min((f.step or 0) for f in errors) if errors else None


def megatron(loss: np.ndarray, steps: np.ndarray, until: int, factor: float = 10) -> int | None:
    running = -math.inf
    for value, step in zip(loss, steps):
        if step >= until:
            break
        if not math.isfinite(value) or (running > 0 and value > factor * running):
            return int(step)
        running = max(running, value)
    return None


def six_sigma(values: np.ndarray, steps: np.ndarray, until: int, sigma: float = 6) -> int | None:
    for i, (value, step) in enumerate(zip(values, steps)):
        if step >= until:
            break
        if not math.isfinite(value):
            return int(step)
        past = values[max(0, i - 128) : i]
        if len(past) >= 8 and value > past.mean() + sigma * past.std():
            return int(step)
    return None


def olmo(run_dir: Path, until: int) -> int | None:
    from stabscope import load_run

    loss = load_run(run_dir, metrics="loss").sort_values("step")
    grads = load_run(run_dir, metrics="param_grad_norm")
    total = grads.groupby("step").value.apply(lambda v: float(np.sqrt(np.sum(v**2))))
    hits = [
        six_sigma(loss.value.to_numpy(float), loss.step.to_numpy(), until),
        six_sigma(total.to_numpy(float), total.index.to_numpy(), until),
    ]
    hits = [h for h in hits if h is not None]
    return min(hits) if hits else None


def score(rows: list[dict], detector: str, k: int) -> dict:
    key = f"{detector}@{k}"
    tp = [r for r in rows if r["failed"] and r[key] is not None]
    fp = [r for r in rows if not r["failed"] and r[key] is not None]
    fn = [r for r in rows if r["failed"] and r[key] is None]
    leads = [r["failure_step"] - r[key] for r in tp]
    return {
        "precision": len(tp) / (len(tp) + len(fp)) if tp or fp else float("nan"),
        "recall": len(tp) / (len(tp) + len(fn)) if tp or fn else float("nan"),
        "lead": statistics.median(leads) if leads else float("nan"),
        "flagged": len(tp) + len(fp),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/stabscope-forecast"))
    ap.add_argument("--grid", choices=sorted(GRIDS), default="main")
    args = ap.parse_args()
    grid = GRIDS[args.grid]
    jobs = []
    for depth, norm, lr, warmup, seed in itertools.product(*grid.values(), range(args.seeds)):
        name = f"d{depth}-{norm}-lr{lr:g}-w{warmup}-s{seed}"
        jobs.append(
            {
                "depth": depth,
                "norm": norm,
                "lr": lr,
                "warmup": warmup,
                "seed": seed,
                "steps": args.steps,
                "out": str(args.out / name),
                "name": name,
            }
        )
    todo = [
        j
        for j in jobs
        if not (Path(j["out"]) / "meta.json").exists()
        or json.loads((Path(j["out"]) / "meta.json").read_text())["status"] != "complete"
    ]
    print(f"{len(jobs)} runs, {len(todo)} to train", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        for i, job in enumerate(pool.map(run_one, todo), 1):
            print(f"[{i}/{len(todo)}] {job['name']}", file=sys.stderr, flush=True)
    from stabscope import load_run

    rows = []
    for job in jobs:
        run = Path(job["out"])
        failed, failure_step = truth(run, args.steps)
        loss = load_run(run, metrics="loss").sort_values("step")
        row = {"name": job["name"], "failed": failed, "failure_step": failure_step}
        for k in (5, 10):
            until = max(1, args.steps * k // 100)
            row[f"gate@{k}"] = gate(run, until)
            row[f"megatron@{k}"] = megatron(loss.value.to_numpy(float), loss.step.to_numpy(), until)
            row[f"olmo@{k}"] = olmo(run, until)
        rows.append(row)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    n_failed = sum(r["failed"] for r in rows)
    print(f"# forecast ({args.grid}): {len(rows)} runs of {args.steps} steps, {n_failed} failed")
    print("| detector | K | precision | recall | median lead (steps) | runs flagged |")
    print("|---|---|---|---|---|---|")
    for k in (5, 10):
        for detector in ("gate", "megatron", "olmo"):
            s = score(rows, detector, k)
            print(
                f"| {detector} | {k}% | {s['precision']:.2f} | {s['recall']:.2f} | "
                f"{s['lead']:.0f} | {s['flagged']} |"
            )


if __name__ == "__main__":
    main()
