"""Train one grid config without recording, to design configs: loss curve and truth.

    python -m bench.grid.explore family=llama task=text lr=3e-2 [--seeds 0,1]

Prints the loss at a few steps, the truth (bench/grid/truth.py) and the CPU seconds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.grid.truth import judge

SCRIPT = Path(__file__).with_name("script.py")


@dataclass
class Training:
    """One grid config's script loop, as profile_script runs it, stepped on demand."""

    script: Any
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    data: Iterator[Any]

    @classmethod
    def start(cls, sets: dict[str, str], seed: int) -> Training:
        from stabscope.drivers.profile import seed_everything
        from stabscope.drivers.script import load_script

        script = load_script(SCRIPT, sets)
        cfg = script.config
        seed_everything(seed)
        model = script.model(cfg)
        opt = script.optimizer(model, cfg)
        return cls(script, model, opt, script.scheduler(opt, cfg), iter(script.batches(cfg)))

    def advance(self, steps: int) -> list[float]:
        """Train ``steps`` steps; the loss of each."""
        losses = []
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            loss = self.script.loss(self.model, next(self.data))
            loss.backward()
            self.opt.step()
            self.sched.step()
            losses.append(float(loss.detach()))
        return losses


def train(sets: dict[str, str], seed: int) -> tuple[np.ndarray, float]:
    """The loss of every step of the script's own loop (as profile_script runs it)."""
    run = Training.start(sets, seed)
    losses = run.advance(run.script.config.steps)
    return np.array(losses), baseline_of(run.script)


def baseline_of(script) -> float:
    from bench.grid import families, tasks

    task = tasks.make_task(script.config)
    return tasks.unigram_baseline(task, families.FORMS[script.config.family])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sets", nargs="*", help="key=value overrides of bench/grid/script.py")
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sets = dict(s.split("=", 1) for s in args.sets)
    for seed in map(int, args.seeds.split(",")):
        start = time.process_time()
        loss, base = train(sets, seed)
        secs = time.process_time() - start  # CPU seconds: the wall time on an idle core
        n = len(loss)
        marks = [0, n // 10, n // 4, n // 2, 3 * n // 4, n - 1]
        t = judge(loss, base, n, None)
        curve = " ".join(f"{m}:{loss[m]:.3g}" for m in marks)
        print(f"seed {seed} cpu {secs:.1f}s base {base:.3f} | {curve} | {t.kind} "
              f"step {t.failure_step} final {t.final_loss:.3f} gap {t.gap:.2f}"
              f"{' AMBIGUOUS' if t.ambiguous else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
