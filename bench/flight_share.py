"""The every-step tier's own time per step, measured inside it on one model: timers around
everything the recorder does on a step that is not on the schedule, against the step's time.
On a shared, loaded machine a difference of two model copies (bench/overhead.py) is noisier
than the cost; these timers are not.

Timed, in three parts (none nested in another):
  flight      the flight recorder's hooks on the watched modules' outputs and gradients
  optimizer   around ``optimizer.step()``: the pre-clip gradient norm, the block update norms
              (every ``step_updates_every``-th step), the flight ring's non-finite check
  boundary    ``Recorder.step``: the loss and lr kept on the device, the ring's slot closed,
              a ring handed over every ``flight_every`` steps
The stability index is off here (it is not part of the tier: bench/sharpness_cost.py).
``--detail`` also times the pieces inside those parts ("of which"): the ring's reductions
(``FlightRing.put``, the rest of the hooks is Python), the pre-clip gradient norm's pass
(``l2_norm``), the block update norms' copy and difference, the ring's non-finite check.

    python bench/flight_share.py [--steps 40] [--device cpu] [--detail]
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
from stabscope.probes.flight_ring import FlightRing
from stabscope.record import step_norms

#: (part, owner, method): the recorder's entry points on an unrecorded step.
TIMED = (
    ("flight", FlightRecorder, "_forward_hook"),
    ("flight", FlightRecorder, "_grad_hook"),
    ("optimizer", Recorder, "_before_optimizer_step"),
    ("optimizer", Recorder, "_after_optimizer_step"),
    ("boundary", Recorder, "step"),
)

#: (piece, owner, attribute): timed inside the parts above with ``--detail``.
DETAIL = (
    ("ring reductions", FlightRing, "put"),
    ("gradient norm", step_norms, "l2_norm"),
    ("update norms", step_norms._BlockUpdates, "before"),
    ("update norms", step_norms._BlockUpdates, "after"),
    ("non-finite check", Recorder, "_every_check"),
)


def time_calls(entries, spent: dict[str, float]) -> None:  # type: ignore[no-untyped-def]
    """Wrap each (part, owner, attribute) so that its calls add their time to spent[part]."""
    for part, owner, name in entries:
        inner = getattr(owner, name)

        def timed(*a, _inner=inner, _part=part, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent[_part] += time.perf_counter() - t0

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--detail", action="store_true", help="also time the pieces inside")
    args = ap.parse_args()
    device = torch.device(args.device)
    model, batches = sample_gpt(args, device, 4)
    spent = {part: 0.0 for part, _, _ in TIMED}
    time_calls(TIMED, spent)
    pieces = {piece: 0.0 for piece, _, _ in DETAIL} if args.detail else {}
    time_calls(DETAIL if args.detail else (), pieces)
    config = RecorderConfig(schedule=Schedule(dense=1, every=0), sharpness=False)
    inside: dict[str, list[float]] = {part: [] for part in spent}
    within: dict[str, list[float]] = {piece: [] for piece in pieces}
    steps = []
    with Recorder(model, Path(tempfile.mkdtemp()) / "r", config) as rec:
        step = stepper(model, rec, batches, device)
        for i in range(args.steps + 2):
            for timers in (spent, pieces):
                timers.update(dict.fromkeys(timers, 0.0))
            seconds = step()
            if i >= 2:  # step 0 is recorded, step 1 builds nothing new but warms up
                steps.append(seconds)
                for part, value in spent.items():
                    inside[part].append(value)
                for piece, value in pieces.items():
                    within[piece].append(value)
    # Means: the update norms and the ring's hand-over come on some steps only.
    mean = {part: statistics.mean(values) for part, values in inside.items()}
    total, step_time = sum(mean.values()), statistics.mean(steps)
    parts = ", ".join(f"{part} {value * 1e3:.2f} ms" for part, value in mean.items())
    print(
        f"every-step tier inside a step (mean of {args.steps}): {total * 1e3:.2f} ms of "
        f"{step_time * 1e3:.1f} ms, {total / (step_time - total):.2%} of the step without it "
        f"({parts}); {rec.meta['host_syncs']} transfers over {rec.meta['steps']} steps, "
        f"{torch.get_num_threads()} threads"
    )
    if within:
        print("of which: " + ", ".join(
            f"{piece} {statistics.mean(v) * 1e3:.2f} ms" for piece, v in within.items()
        ))  # fmt: skip


if __name__ == "__main__":
    main()
