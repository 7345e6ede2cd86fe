"""What the online rules cost a training step: the sample GPT under the default schedule, with
the rules off, in their worker thread (the default), and on the training thread (each check
handed over run at once, for comparison), interleaved in rounds in one process.

    python bench/online_rules.py                  # GPT depth 6, d=256, seq 128, batch 8, CPU
    python bench/online_rules.py --device cuda

Each kind of check (the loss check, the full check: ``rules/online.py``) is handed over at a
step boundary once the previous one is done and its pause is over, so the worker's share of
the CPU is capped at 1/(1 + PAUSE) of one core per kind. Reported: median and mean step time
per mode and their ratio to ``off`` (the mean carries the steps a check on the training thread
blocks), the checks run (loss checks in brackets) and their time, and the training thread's
own cost of the verdicts: the time of the step boundary's ``_judge_step`` (deciding which
check is due, taking the snapshot of the rows in host memory, taking the findings), its mean
and largest per step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from sample_gpt import add_shape_args, gpt, sample_gpt, stepper

from stabscope import Recorder, RecorderConfig

MODES = ("off", "worker", "inline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=300, help="steps per mode")
    ap.add_argument("--round", type=int, default=10, help="steps per mode and round")
    ap.add_argument("--flush-seconds", type=float, default=2.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    base, batches = sample_gpt(args, device, 16)
    tmp = Path(tempfile.mkdtemp(prefix="stabscope-online-"))
    recs, steps, judge = {}, {}, {}
    for mode in MODES:
        model = copy.deepcopy(base)
        config = RecorderConfig(flush_seconds=args.flush_seconds, online_rules=mode != "off")
        rec = Recorder(model, tmp / mode, config, forward=lambda m: gpt.loss(m, batches[0]))
        v = rec.verdicts
        if mode == "inline" and v is not None:
            v.submit = lambda jobs, v=v: [v._check(k, m) for k, m in jobs.items()]  # type: ignore[method-assign]
        judge[mode] = timed(rec)
        recs[mode] = rec.start()
        steps[mode] = stepper(model, rec, batches, device)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.steps // args.round):
        for mode in MODES[r % 3 :] + MODES[: r % 3]:
            times[mode] += [steps[mode]() for _ in range(args.round)]
    for rec in recs.values():
        rec.close()
    print(
        f"# online rules: GPT depth={args.depth} d={args.width} seq={args.seq_len} "
        f"batch={args.batch_size} on {device}, default schedule, {args.steps} steps per mode, "
        f"flush_seconds {args.flush_seconds}"
    )
    print("| mode | median step | ratio | mean step | ratio | checks (loss) | check time | "
          "boundary: mean, max |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    med0, mean0 = statistics.median(times["off"]), statistics.mean(times["off"])
    for mode in MODES:
        med, mean = statistics.median(times[mode]), statistics.mean(times[mode])
        v = recs[mode].verdicts
        checks = "- | -"
        if v is not None:
            checks = f"{sum(v.checks.values())} ({v.checks['loss']}) | {v.seconds:.2f} s"
        spent = judge[mode]
        cost = f"{statistics.mean(spent) * 1e6:.0f} µs, {max(spent) * 1e6:.0f} µs"
        print(
            f"| {mode} | {med * 1e3:.1f} ms | {med / med0:.3f}x | {mean * 1e3:.1f} ms | "
            f"{mean / mean0:.3f}x | {checks} | {cost} |"
        )


def timed(rec: Recorder) -> list[float]:
    """Time each call of ``rec._judge_step`` (the verdicts' work at a step boundary)."""
    spent: list[float] = []
    judge = rec._judge_step

    def wrapper() -> None:
        t0 = time.perf_counter()
        judge()
        spent.append(time.perf_counter() - t0)

    rec._judge_step = wrapper  # type: ignore[method-assign]
    return spent


if __name__ == "__main__":
    main()
