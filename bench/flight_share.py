"""The flight recorder's own time per step, measured inside it on one model: timers around its
hooks, its step boundary and its pre-optimizer check, against the step's time. On a shared,
loaded machine a difference of two model copies (bench/overhead.py) is noisier than the cost.

    python bench/flight_share.py [--steps 12] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from sample_gpt import add_shape_args, sample_gpt, stepper

from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.probes.flight import FlightRecorder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    model, batches = sample_gpt(args, device, 4)
    spent = [0.0]
    for name in ("_forward_hook", "_grad_hook", "boundary", "check"):
        inner = getattr(FlightRecorder, name)

        def timed(*a, _inner=inner, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(FlightRecorder, name, timed)
    config = RecorderConfig(schedule=Schedule(dense=1, every=0))
    shares, steps = [], []
    with Recorder(model, Path(tempfile.mkdtemp()) / "r", config) as rec:
        step = stepper(model, rec, batches, device)
        for i in range(args.steps + 2):
            spent[0] = 0.0
            seconds = step()
            if i >= 2:  # step 0 is recorded, step 1 builds nothing new but warms up
                steps.append(seconds)
                shares.append(spent[0])
    inside, step = statistics.median(shares), statistics.median(steps)
    print(
        f"flight recorder inside a step: {inside * 1e3:.2f} ms of {step * 1e3:.1f} ms "
        f"({inside / (step - inside):.2%} of the step without it), "
        f"{rec.meta['host_syncs']} transfers over {rec.meta['steps']} steps, "
        f"{torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
