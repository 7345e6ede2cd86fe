"""What the stability index costs, in training steps of the same model, in the same process.

    python bench/sharpness_cost.py                 # sample GPT: 6 layers, d=256, seq 128, batch 8
    python bench/sharpness_cost.py --device cuda
    python bench/sharpness_cost.py --iterations 4  # fewer Lanczos steps
    python bench/sharpness_cost.py --budget 0.05   # what sharpness_budget = 0.05 admits

One measurement (``stabscope.probes.sharpness.stability_index``: the probe batch's forward,
its gradient graph, ``--iterations`` Hessian-vector products by double backward, a k x k
eigenproblem) is timed against a plain training step (forward, backward, Adam step) of the
same model on a batch of the same size. Measurements run at steps 2, 4, 8, ...: over N
training steps that is floor(log2 N) of them, so the amortised cost is printed for a few N;
with ``--budget F``, also what ``sharpness_budget = F`` admits over N steps (the recorder's
own arithmetic, ``IndexBudget``, on a clock of the measured step and measurement times).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
import gpt

from stabscope.drivers.script import ScriptConfig
from stabscope.probes.index_budget import IndexBudget
from stabscope.probes.sharpness import STEPS_PER_PRODUCT, due, stability_index


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=None, help="sharpness_budget to simulate")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ScriptConfig({**gpt.CONFIG, "depth": 6, "width": 256, "seq_len": 128, "batch_size": 8})
    model = gpt.model(cfg).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = gpt.batches(cfg)
    batch = next(iter(data)).to(args.device)  # (B, T+1) token ids

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        gpt.loss(model, batch).backward()
        opt.step()

    for _ in range(3):  # warm-up, and Adam's state exists
        train_step()
    steps = [timed(train_step, args.device) for _ in range(max(10, args.repeats))]
    probe = []
    for _ in range(args.repeats):
        probe.append(
            timed(
                lambda: stability_index(
                    model, lambda m: gpt.loss(m, batch), [opt], args.iterations
                ),
                args.device,
            )
        )
    step, one = statistics.median(steps), statistics.median(probe)
    print(f"device {args.device}, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"training step      {step * 1e3:8.1f} ms (median of {len(steps)})")
    print(f"one measurement    {one * 1e3:8.1f} ms = {one / step:.1f} steps "
          f"({args.iterations} Lanczos iterations, median of {len(probe)})")  # fmt: skip
    for n in (200, 1_000, 10_000, 100_000):
        count = sum(due(s) for s in range(n))
        share = 100 * count * one / (n * step)
        print(f"  over {n:>7,} steps: {count:2d} measurements, +{share:.2f}%")
    if args.budget is not None:
        for n in (200, 500, 1_000, 10_000, 100_000):
            taken = budgeted(args.budget, args.iterations, n, step, one)
            share = 100 * len(taken) * one / (n * step)
            print(f"  budget {args.budget:g}, {n:>7,} steps: measured at {taken}, +{share:.2f}%")


def budgeted(fraction: float, iterations: int, n: int, step: float, one: float) -> list[int]:
    """The due steps below ``n`` that ``sharpness_budget = fraction`` measures, steps taking
    ``step`` s and measurements ``one`` s (no planned length: the training time so far)."""
    now = [0.0]
    budget = IndexBudget(fraction, STEPS_PER_PRODUCT * (iterations + 1), clock=lambda: now[0])
    taken = []
    for s in range(n):
        now[0] += step
        budget.tick()
        if due(s) and budget.allows():
            now[0] += one
            budget.charge(one)
            taken.append(s)
    return taken


if __name__ == "__main__":
    main()
