"""Step-time overhead of the Recorder against the uninstrumented step, in the same process.

    python bench/overhead.py                 # sample GPT: 6 layers, d=256, seq 128, batch 8
    python bench/overhead.py --device cuda   # on a GPU
    STABSCOPE_MOMENTS=torch python bench/overhead.py   # CPU moments by torch, not numba

Identical model copies train side by side, interleaved in rounds so that drift in machine
speed hits every mode alike; the order within a round rotates from round to round. Modes:
  plain            no recorder
  plain-b          a second uninstrumented copy: how far two identical copies differ, the
                   noise floor of every ratio here (copies differ in memory placement)
  cheap            every step recorded, cheap preset (forward moments, parameter norms)
  core             every step: forward and gradient moments, parameter and gradient norms,
                   update ratios (standard without the structure-aware probes)
  standard-noattn  every step, standard preset with the attention probe off (attn_queries=0)
  standard         every step, standard preset (gradient moments, update ratios and the
                   structure-aware probes: residual, attention, correlation, norms, logits)
  full             every step, full preset (+ parameter moments, model update)
  unrecorded       recorder attached, but the step is not on the schedule, flight recorder off
  flight           the flight recorder alone: every step's block, stem and head statistics
                   (the recorder attached, the step not on the schedule)
  flight-offline   the flight mode without the rules judging the run while it trains
                   (``online_rules=False``): what the online checks' worker thread costs
  unrecorded-noupdates  unrecorded with step_updates off: loss, lr and the gradient norm only
  live             the flight mode, its series sent live to TensorBoard (log_to
                   tensorboard:TMPDIR, docs/dashboards.md); a timer around the bridge's
                   hand-over (``Rows.tap``) gives its own time, the mean step time its
                   spikes (a ring every flight_every steps), which a median hides
  schedule         standard preset, default schedule, mean over the first --schedule-steps
                   (the stability index included; --sharpness-budget bounds its share)
Reported: median step time per mode and its ratio to plain; for the default schedule (with
the flight recorder, as by default), the mean step time over the whole stretch (recorded and
unrecorded steps together), and the device->host transfers per step.

    python bench/overhead.py --modes plain,plain-b,unrecorded,flight --compile
compiles every copy with torch.compile (--backend, default inductor) before timing. The attention
probe's share is measured on the standard mode's own model (steps alternating in pairs with
the probe on and off): two model copies differ by up to ~2% on their own, more than the
probe costs; a timer around the probe's sampling in those steps gives its own time.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from sample_gpt import add_shape_args, gpt, sample_gpt

from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.probes.attention import AttentionProbe
from stabscope.probes.kernels import host_kernels

EVERY = Schedule(dense=10**9)
MODES = {
    "plain": None,
    "plain-b": None,
    "cheap": RecorderConfig(preset="cheap", schedule=EVERY),
    "core": RecorderConfig(schedule=EVERY, structure_probes=False),
    "standard-noattn": RecorderConfig(schedule=EVERY, attn_queries=0),
    "standard": RecorderConfig(schedule=EVERY),
    "full": RecorderConfig(preset="full", schedule=EVERY),
    # Step 0 is recorded (and excluded below); every later step is off the schedule.
    "unrecorded": RecorderConfig(schedule=Schedule(dense=1, every=0), flight=False),
    "flight": RecorderConfig(schedule=Schedule(dense=1, every=0)),
    "flight-offline": RecorderConfig(schedule=Schedule(dense=1, every=0), online_rules=False),
    "live": RecorderConfig(schedule=Schedule(dense=1, every=0)),  # + log_to, in main()
    "unrecorded-noupdates": RecorderConfig(
        schedule=Schedule(dense=1, every=0), flight=False, step_updates=False
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_paired(rec: Recorder, step, args: argparse.Namespace) -> tuple[float, float, float]:
    """The attention probe's cost on one model and recorder: steps alternate in pairs between
    the probe on and off (``AttentionProbe.enabled``), so both sides share the model's memory
    placement, which two model copies do not. Returns (median on - median off, its share,
    the median time inside the probe's sampling per step with it on: a timer around
    ``AttentionProbe._sample``, less noisy than the difference on a shared machine)."""
    probe = next(p for p in rec.structure_probes.probes if isinstance(p, AttentionProbe))
    sample, spent = probe._sample, [0.0]

    def timed(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return sample(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0

    probe.routes.sample = timed
    on: list[float] = []
    off: list[float] = []
    inside: list[float] = []
    for i in range(2 * args.rounds * args.steps_per_round):
        probe.enabled = (i // 2) % 2 == 0
        spent[0] = 0.0
        (on if probe.enabled else off).append(step(rec))
        if probe.enabled:
            inside.append(spent[0])
    probe.enabled = True
    probe.routes.sample = sample
    extra = statistics.median(on) - statistics.median(off)
    return extra, extra / statistics.median(off), statistics.median(inside)


def time_live_bridge(rec: Recorder) -> list[float]:
    """Seconds spent in the live bridge's hand-over (``Rows.tap``: the series chosen, sent to
    the destinations' writers), summed in the returned one-element list."""
    tap, spent = rec.rows.tap, [0.0]

    def timed(chunks):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            tap(chunks)
        finally:
            spent[0] += time.perf_counter() - t0

    rec.rows.tap = timed
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps-per-round", type=int, default=4)
    ap.add_argument("--schedule-steps", type=int, default=500)
    ap.add_argument(
        "--modes",
        default=",".join(m for m in MODES if m != "plain-b"),
        help="comma-separated subset of modes (default: all but plain-b)",
    )
    ap.add_argument(
        "--sharpness-budget",
        type=float,
        default=None,
        help="the schedule mode's sharpness_budget (default: none, every index measurement)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model copy")
    ap.add_argument("--backend", default="inductor", help="the torch.compile backend")
    ap.add_argument("--clip", type=float, default=0.0, help="clip_grad_norm_ max_norm (0: none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base, batches = sample_gpt(args, device, 16)

    def forward(model):
        return gpt.loss(model, batches[0])

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
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            if rec is not None:
                rec.step(loss=loss)
            sync(device)
            return time.perf_counter() - t0

        return step

    tmp = Path(tempfile.mkdtemp(prefix="stabscope-bench-"))
    modes = [m for m in args.modes.split(",") if m in MODES]
    models = {m: copy.deepcopy(base) for m in modes}
    run = {
        m: torch.compile(models[m], backend=args.backend) if args.compile else models[m]
        for m in modes
    }
    steps = {m: make_step(run[m]) for m in modes}
    recs = {
        m: None
        if MODES[m] is None
        else Recorder(
            run[m],
            tmp / m,
            MODES[m],
            forward=forward,
            log_to=f"tensorboard:{tmp / 'tb'}" if m == "live" else None,
        ).start()
        for m in modes
    }
    live_spent = time_live_bridge(recs["live"]) if "live" in recs else None
    for m in modes:  # warm-up, including the unrecorded mode's one recorded step (compiled:
        for _ in range(3 if not args.compile else 6):  # and the recompilation after it)
            steps[m](recs[m])
    if live_spent is not None:
        live_spent[0] = 0.0  # not the warm-up's
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        # Each round starts one mode later: a mode's position in the round (what ran just
        # before it, whose memory the caches hold) measurably shifts its time, so every mode
        # takes every position equally often.
        for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
            times[m] += [steps[m](recs[m]) for _ in range(args.steps_per_round)]
    paired = (
        attention_paired(recs["standard"], steps["standard"], args) if "standard" in recs else None
    )
    live_inside = live_spent[0] if live_spent is not None else None  # not close()'s flush
    for rec in recs.values():
        if rec is not None:
            rec.close()

    print(
        f"# overhead: GPT depth={args.depth} d={args.width} seq={args.seq_len} "
        f"batch={args.batch_size} on {device} ({torch.get_num_threads()} threads)"
        f"{f', compiled ({args.backend})' if args.compile else ''}, "
        f"clip={args.clip or 'none'}, "
        f"torch {torch.__version__}, CPU moments: {host_kernels.status()}"
    )
    print("| mode | step time (median) | ratio to plain |")
    print("|---|---|---|")
    plain = statistics.median(times["plain"]) if "plain" in times else None
    for m in modes:
        med = statistics.median(times[m])
        ratio = f"{med / plain:.3f}x" if plain else "-"
        syncs = ""
        if recs[m] is not None:
            meta = recs[m].meta
            syncs = f" ({meta['host_syncs'] / max(meta['steps'], 1):.2f} transfers/step)"
        print(f"| {m}{syncs} | {med * 1e3:.1f} ms | {ratio} |")
    if live_inside is not None:
        inside = live_inside / (args.rounds * args.steps_per_round)
        print(
            f"| live: inside the bridge (timer, per step) | {inside * 1e3:.3f} ms | "
            + (f"{inside / plain:.2%} of plain |" if plain else "- |")
        )
        if "flight" in times:
            live, flight = statistics.mean(times["live"]), statistics.mean(times["flight"])
            print(
                f"| live minus flight, mean step time (two model copies) | "
                f"{(live - flight) * 1e3:.2f} ms | {live / flight - 1:+.1%} |"
            )
    if "standard" in times and "standard-noattn" in times:
        extra = statistics.median(times["standard"]) - statistics.median(times["standard-noattn"])
        share = extra / statistics.median(times["standard-noattn"])
        print(
            f"| standard minus standard-noattn (two model copies) | {extra * 1e3:.2f} ms | "
            f"{share:+.1%} |"
        )
    if paired is not None:
        extra, share, inside = paired
        print(
            f"| attention probe, share of a recorded standard step (paired, one model) | "
            f"{extra * 1e3:.2f} ms | {share:+.1%} |"
        )
        print(
            f"| of which inside the probe's sampling (timer) | {inside * 1e3:.2f} ms | "
            f"{inside / statistics.median(times['plain']):.2%} of plain |"
            if "plain" in times
            else f"| of which inside the probe's sampling (timer) | {inside * 1e3:.2f} ms | - |"
        )
    if args.schedule_steps:
        # Default schedule over a stretch of steps, against plain steps interleaved with it.
        sched_model, plain_model = copy.deepcopy(base), copy.deepcopy(base)
        sched_step, plain_step = make_step(sched_model), make_step(plain_model)
        if args.compile:
            sched_model = torch.compile(sched_model, backend=args.backend)
            plain_model = torch.compile(plain_model, backend=args.backend)
            sched_step, plain_step = make_step(sched_model), make_step(plain_model)
        sched_cfg = RecorderConfig(sharpness_budget=args.sharpness_budget)
        sched_rec = Recorder(sched_model, tmp / "schedule", sched_cfg, forward=forward).start()
        sched_times, plain_times = [], []
        for _ in range(args.schedule_steps):
            sched_times.append(sched_step(sched_rec))
            plain_times.append(plain_step())
        sched_rec.close()
        recorded = sched_rec.meta["recorded_steps"]
        index = sched_rec.meta.get("stability_index", {})
        plain_mean = statistics.mean(plain_times)
        ratio = statistics.mean(sched_times) / plain_mean
        print(
            f"| default schedule, mean over {args.schedule_steps} steps ({recorded} recorded, "
            f"{sched_rec.meta['host_syncs'] / args.schedule_steps:.2f} transfers/step; "
            f"stability index: {index.get('measured', 0)} measured, {index.get('skipped', 0)} "
            f"skipped, budget {args.sharpness_budget}) "
            f"| {statistics.mean(sched_times) * 1e3:.1f} ms | {ratio:.3f}x |"
        )
        print_index_share(sched_times, plain_mean, index)


def print_index_share(sched_times: list[float], plain_mean: float, index: dict) -> None:
    """The schedule's mean without the stability index's own time (its timer, meta.json's
    ``stability_index.seconds``), and that time spread over longer runs: measurements come at
    steps 2, 4, 8, ..., log2(N) of them over N steps, each costing what it cost here."""
    measured, seconds = index.get("measured", 0), index.get("seconds", 0.0)
    if not measured:
        return
    n = len(sched_times)
    without = (sum(sched_times) - seconds) / n
    print(
        f"| default schedule without the index's own time ({seconds:.1f} s in {measured} "
        f"measurements) | {without * 1e3:.1f} ms | {without / plain_mean:.3f}x |"
    )
    each = seconds / measured
    for steps in (10_000, 100_000):
        share = int(math.log2(steps)) * each / (steps * plain_mean)
        print(f"| the index over a {steps:,}-step run (log2 N measurements) | - | +{share:.1%} |")


if __name__ == "__main__":
    main()
