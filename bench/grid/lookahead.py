"""A trial step at the planned peak lr: does the loss tell, at K% of a run, that the peak breaks it?

    python -m bench.grid.lookahead --kinds warmup-peak,collapse,lr-too-high --at 20

For each grid config (seed 0): train ``--at`` steps as the grid script does, then on copies of
the model and optimizer take ``k`` steps (1 and 5) on four held-back batches, once at the lr of
step ``--at`` and once at the largest planned lr ahead, and print log10 of the mean loss on
those batches after the steps over before. A design aid for the forecast: it measures whether
the nonlinear answer to "what happens at the peak lr" separates failing from healthy twins
where the stability index (a quadratic model) does not. docs/benchmarks.md has the result.
"""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import torch

from bench.grid.explore import Training
from bench.grid.failures import GRID, Config
from bench.grid.script import planned_lrs


def trial_steps(config: Config, at: int, seed: int = 0) -> dict[str, float]:
    """log10(loss after / loss before) on held-back batches for k = 1, 5 steps at the lr now
    and at the planned peak ahead, plus the two lrs."""
    run = Training.start({**config.sets, "family": config.family}, seed)
    run.advance(at)
    script, model, opt = run.script, run.model, run.opt
    cfg = script.config
    plan = planned_lrs(cfg)
    held = [next(run.data) for _ in range(4)]

    def mean_loss(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(np.mean([float(script.loss(m, b)) for b in held]))

    before = mean_loss(model)
    out = {"lr_now": plan[at], "lr_peak": max(plan[at:])}
    for name in ("now", "peak"):
        for k in (1, 5):
            trial = copy.deepcopy(model)
            trial_opt = script.optimizer(trial, cfg)
            trial_opt.load_state_dict(opt.state_dict())
            for group in trial_opt.param_groups:
                group["lr"] = out[f"lr_{name}"]
            for i in range(k):
                trial_opt.zero_grad(set_to_none=True)
                script.loss(trial, held[i % len(held)]).backward()
                trial_opt.step()
            after = mean_loss(trial)
            out[f"{name}{k}"] = math.log10(after / before) if math.isfinite(after) else math.inf
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kinds", default="warmup-peak,collapse,lr-too-high")
    ap.add_argument("--at", type=int, default=20, help="the step the trial starts from")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kinds = args.kinds.split(",")
    print("| config | truth by design | lr now -> peak | now, 1 | now, 5 | peak, 1 | peak, 5 |")
    print("|---|---|---|---|---|---|---|")
    for config in GRID:
        if config.kind not in kinds:
            continue
        r = trial_steps(config, args.at)
        cells = " | ".join(f"{r[k]:+.2f}" for k in ("now1", "now5", "peak1", "peak5"))
        lrs = f"{r['lr_now']:.2g} -> {r['lr_peak']:.2g}"
        print(f"| {config.name} | {config.expect} | {lrs} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
