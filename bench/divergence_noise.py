"""How often ``loss-divergence`` calls a healthy noisy run diverged, and catches a diverging one.

An MLP regression under SGD (momentum 0.9) on batches of 4 from targets with noise of sd 1
(per-batch losses spread with a coefficient of variation of ~0.7): healthy at lr 0.01, at
``--high-lr`` (default 5x) it diverges. Each seed is recorded once (losses only, online
checks off) and the rule is judged on the losses up to each cut, as the online checks judge
a run that has reached that step; a healthy seed counts as a false alarm if the rule holds
at any cut.

    python bench/divergence_noise.py --seeds 100 --steps 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.rules import check_run


def train(
    run: Path,
    seed: int,
    lr: float,
    steps: int,
    data_seed: int | None = None,
    schedule: Schedule | None = None,
) -> None:
    """SGD (momentum 0.9) on batches of 4 of sin(x_0) + noise of sd 1, recorded into ``run``
    (the losses; the scheduled probes at step 0 only, unless ``schedule``)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1000 + seed if data_seed is None else data_seed)
    x = torch.randn(512, 8, generator=g)
    y = x[:, :1].sin() + torch.randn(512, 1, generator=g)  # (512, 1)
    config = RecorderConfig(
        preset="cheap", schedule=schedule or Schedule(1, 10**9), online_rules=False
    )
    with Recorder(net, run, config) as rec:
        for _ in range(steps):
            i = torch.randint(0, 512, (4,), generator=g)
            loss = (net(x[i]) - y[i]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)


def fires(run: Path, until: int) -> bool:
    return any(f.rule == "loss-divergence" for f in check_run(run, until=until).findings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=5, help="judge after every this many steps")
    p.add_argument("--high-lr", type=float, default=0.05)
    args = p.parse_args()
    cuts = list(range(10, args.steps + 1, args.every))
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name, lr in (("healthy lr 0.01", 0.01), (f"lr {args.high_lr}", args.high_lr)):
            ever, first = 0, []
            for seed in range(args.seeds):
                run = Path(tmp) / f"{lr}-{seed}"
                train(run, seed, lr, args.steps)
                hit = next((c for c in cuts if fires(run, c)), None)
                if hit is not None:
                    ever += 1
                    first.append(hit)
            first.sort()
            median = first[len(first) // 2] if first else None
            print(
                f"{name}: fired at some cut in {ever} of {args.seeds} seeds "
                f"(cuts every {args.every} steps from 10 to {args.steps}); "
                f"median first cut {median}"
            )
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
