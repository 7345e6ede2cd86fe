"""Step-time overhead of the Recorder against the uninstrumented step, in the same process.

    python bench/overhead.py                 # sample GPT: 6 layers, d=256, seq 128, batch 8
    python bench/overhead.py --device cuda   # on a GPU

Four identical model copies train side by side, interleaved in rounds so that drift in machine
speed hits every mode alike:
  plain      no recorder
  every      recorder, every step recorded (standard preset: forward + gradient moments,
             parameter and gradient norms, update ratios)
  unrecorded recorder attached, but the step is not on the schedule
  schedule   recorder with the default schedule, over the first --schedule-steps steps
Reported: median step time per mode and its ratio to plain; for the default schedule, the
mean step time over the whole stretch (recorded and unrecorded steps together).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
import gpt

from stabscope import Recorder, Schedule
from stabscope.script import ScriptConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps-per-round", type=int, default=5)
    ap.add_argument("--schedule-steps", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ScriptConfig(
        gpt.CONFIG
        | dict(
            depth=args.depth,
            width=args.width,
            heads=4,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            vocab=256,
            successors=4,
            norm="pre",
        )
    )
    torch.manual_seed(0)
    base = gpt.model(cfg).to(device)
    data = gpt.batches(cfg)
    batches = [next(data).to(device) for _ in range(16)]

    def make_step(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        state = {"i": 0}

        def step(rec=None) -> float:
            batch = batches[state["i"] % len(batches)]
            state["i"] += 1
            sync(device)
            t0 = time.perf_counter()
            loss = gpt.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rec is not None:
                rec.step(loss=loss)
            sync(device)
            return time.perf_counter() - t0

        return step

    tmp = Path(tempfile.mkdtemp(prefix="stabscope-bench-"))
    modes = ("plain", "every", "unrecorded")
    models = {m: copy.deepcopy(base) for m in modes}
    steps = {m: make_step(models[m]) for m in modes}
    recs = {
        "plain": None,
        "every": Recorder(models["every"], tmp / "every", schedule=Schedule(dense=10**9)).start(),
        # Step 0 is recorded (and excluded below); every later step is off the schedule.
        "unrecorded": Recorder(
            models["unrecorded"], tmp / "unrec", schedule=Schedule(dense=1, every=0)
        ).start(),
    }
    for m in modes:  # warm-up, including the unrecorded mode's one recorded step
        for _ in range(3):
            steps[m](recs[m])
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            times[m] += [steps[m](recs[m]) for _ in range(args.steps_per_round)]
    for rec in recs.values():
        if rec is not None:
            rec.close()

    # Default schedule over a stretch of steps, against plain steps interleaved with it.
    sched_model, plain_model = copy.deepcopy(base), copy.deepcopy(base)
    sched_step, plain_step = make_step(sched_model), make_step(plain_model)
    sched_rec = Recorder(sched_model, tmp / "schedule").start()
    sched_times, plain_times = [], []
    for _ in range(args.schedule_steps):
        sched_times.append(sched_step(sched_rec))
        plain_times.append(plain_step())
    sched_rec.close()
    recorded = sched_rec.meta["recorded_steps"]

    plain = statistics.median(times["plain"])
    print(
        f"# overhead: GPT depth={args.depth} d={args.width} seq={args.seq_len} "
        f"batch={args.batch_size} on {device} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}"
    )
    print("| mode | step time (median) | ratio to plain |")
    print("|---|---|---|")
    for m in modes:
        med = statistics.median(times[m])
        print(f"| {m} | {med * 1e3:.1f} ms | {med / plain:.3f}x |")
    mean_ratio = statistics.mean(sched_times) / statistics.mean(plain_times)
    print(
        f"| default schedule, mean over {args.schedule_steps} steps ({recorded} recorded) | "
        f"{statistics.mean(sched_times) * 1e3:.1f} ms | {mean_ratio:.3f}x |"
    )


if __name__ == "__main__":
    main()
