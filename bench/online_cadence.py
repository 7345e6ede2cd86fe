"""How soon the online rules stop a diverging run: tests/scripts/diverging_finite.py (a linear
regression stepped past stability from step ``jump``: the loss rises x1.2 a step and stays
finite) under ``on_error="stop"``, for several step times (``load_ms``: a data loader that
sleeps that long per batch, the GIL free), in one process.

    python bench/online_cadence.py                    # load 0, 10, 30 ms; 90 steps, jump 40
    python bench/online_cadence.py --load-ms 30 --repeat 40 --busy 2 --sizes ''
                                                      # 40 runs beside 2 busy processes

Reported per step time: the first step at which ``loss-divergence`` holds on the losses so
far (the rule run on each prefix of the finished run's losses), the step whose boundary the
verdict arrived after (``seen_at``), the delay in steps and seconds, the checks of each kind
and the time in them. Run it under another ``PYTHONPATH`` to compare versions (a version
without the loss check reports its checks as ``-``). Then, with ``--sizes``, what one loss
check costs over that many losses (median of 5, wall and CPU time, on this thread).
``--repeat N`` runs each step time N times and reports how the delays spread; ``--busy K``
keeps K processes spinning on the CPU meanwhile, as a loaded CI machine does.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))
import diverging_finite as script

import stabscope
from stabscope import Recorder
from stabscope.drivers.script import ScriptConfig
from stabscope.rules.base import run_rules
from stabscope.rules.loss_divergence import LOSS_DIVERGENCE


def first_divergence(run: Path) -> int | None:
    """The first step at which loss-divergence holds on the losses up to it."""
    steps = sorted(set(stabscope.load_run(run, metrics="loss").step))
    for step in steps:
        if run_rules(run, [LOSS_DIVERGENCE], until=step + 1).findings:
            return int(step)
    return None


def one_run(out: Path, steps: int, **config: float) -> dict:
    cfg = ScriptConfig({**script.CONFIG, **config})
    torch.manual_seed(0)
    net = script.model(cfg)
    opt, data = script.optimizer(net, cfg), script.batches(cfg)
    sched = script.scheduler(opt, cfg)
    times, t_end = [], {}
    with Recorder(net, out, on_error="stop") as rec:
        for step in range(steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = script.loss(net, next(data))
            loss.backward()
            opt.step()
            sched.step()
            rec.step(loss)
            times.append(time.perf_counter() - t0)
            t_end[step] = time.perf_counter()
            if rec.should_stop:
                break
    online = rec.meta["online"]
    seen = rec.stopped_by["seen_at"] if rec.stopped_by else None
    return {"step": statistics.median(times), "seen": seen, "t_end": t_end, "online": online}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--load-ms", default="0,10,30", help="step times to try (data loading, ms)")
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--jump", type=int, default=40)
    ap.add_argument("--sizes", default="100,10000,100000", help="losses per timed loss check")
    ap.add_argument("--repeat", type=int, default=1, help="runs per step time")
    ap.add_argument("--busy", type=int, default=0, help="processes spinning beside the runs")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # the verdicts' warnings: they are what is measured
    tmp = Path(tempfile.mkdtemp(prefix="stabscope-cadence-"))
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        run = runs(tmp, args)
    finally:
        for p in spin:
            p.kill()
    if args.sizes:
        print("\n| losses | one loss check: wall | CPU |\n|---|---|---|")
        for n in (int(s) for s in args.sizes.split(",")):
            wall, cpu = loss_check_time(run, n)
            print(f"| {n:,} | {wall * 1e3:.1f} ms | {cpu * 1e3:.1f} ms |")


def runs(tmp: Path, args: argparse.Namespace) -> Path:
    """The table: one row per run, then per step time the delays' spread when repeated;
    the last run's directory."""
    print(f"# {stabscope.__file__}: diverging_finite, jump {args.jump}, {args.steps} steps")
    print("| load | median step | first fires | seen after | delay | checks (loss) | in checks |")
    print("|---|---|---|---|---|---|---|")
    spread = {}
    for ms in (float(m) for m in args.load_ms.split(",")):
        delays = spread.setdefault(ms, [])
        for i in range(args.repeat):
            run = tmp / f"load{ms:g}-{i}"
            r = one_run(run, args.steps, load_ms=ms, jump=args.jump)
            first, seen, online = first_divergence(run), r["seen"], r["online"]
            if seen is not None and first is not None:
                late = f"{seen - first} steps, {r['t_end'][seen] - r['t_end'][first]:.2f} s"
                delays.append(seen - first)
            else:
                late = "never stopped"
            loss_checks = online.get("loss_checks", "-")
            print(
                f"| {ms:g} ms | {r['step'] * 1e3:.1f} ms | {first} | {seen} | {late} | "
                f"{online['checks']} ({loss_checks}) | {online['seconds']:.2f} s |",
                flush=True,
            )
    if args.repeat > 1:
        print("\n| load | runs stopped | delay: median | max |\n|---|---|---|---|")
        for ms, delays in spread.items():
            mid = statistics.median(delays) if delays else "-"
            most = max(delays, default="-")
            print(f"| {ms:g} ms | {len(delays)} of {args.repeat} | {mid} | {most} |")
    return run


def loss_check_time(run: Path, n: int) -> tuple[float, float]:
    """Median wall and CPU time of the loss check over ``n`` losses (a falling curve) in
    memory, with ``run``'s meta.json."""
    from stabscope.record.losses import PendingLosses
    from stabscope.rules.online import OnlineVerdicts
    from stabscope.store.memory import Unwritten
    from stabscope.store.writer import Interner

    names = (Interner(), Interner(), Interner())
    losses = PendingLosses(names[1]("__run__"))
    steps = np.arange(n, dtype=np.int32)
    losses.history.extend(steps, np.exp(-steps / max(n / 3, 1)).astype(np.float32))
    chunks = losses.chunks(names[0]("train"), names[2]("loss"))
    memory = Unwritten(chunks, 0, names, with_parts=False)
    rules = OnlineVerdicts(run).loss_rules
    walls, cpus = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.thread_time()
        run_rules(run, rules, memory=memory)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.thread_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


if __name__ == "__main__":
    main()
