"""Time and peak memory of `stabscope check` against `stabscope report` on one large run.

    python bench/check_scale.py                        # ~50M rows, 24 layers, full preset
    python bench/check_scale.py --rows 5e6             # a quick run
    python bench/check_scale.py --keep /tmp/bench-check --commands check

The run is shaped like a real one because it is built from one: the sample GPT
(``sample_models/gpt.py``, DEPTH layers) is recorded for two steps with the ``full`` preset
(every metric the rules read: moments of every module output and gradient, seven parameter
statistics and their moments, update ratios, Adam's sqrt(v)/eps, residual branches and
beta, attention entropy and max logit per head, token correlation, norm inputs, output
logits, model update, loss, lr; 9,006 rows a step at 24 layers). Its second step is then
repeated through the real run store (PartWriter with the recorder's 500k-row parts, its
meta.json and prediction.json kept) until the run holds ROWS rows, each value drawn
log-normally around the recorded one with a slow trend, so every rule reads real-shaped
data. Planted, so that rules fire: a loss spike at 70% of the run, one attention head's max
logit growing past 1e3, one weight matrix's update ratio at 0.3, and with ``--diverge``
(default) a last 1% of steps whose loss is NaN and whose last block's output is flagged
non-finite.

Each command runs in a fresh process under a wrapper whose only child it is, so the
wrapper's RUSAGE_CHILDREN peak RSS and CPU time (user + system) are that command's; CPU time
is the figure to compare on a shared machine, where wall time includes waiting for a core.
`check` exits 1 on a run with error findings; that is expected here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stabscope.store import PartWriter, load_run, read_meta, save_meta

ROOT = Path(__file__).resolve().parents[1]
MEASURE = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
seconds = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = usage.ru_utime + usage.ru_stime
print(json.dumps({"rc": rc, "seconds": seconds, "cpu": cpu, "peak_mb": usage.ru_maxrss / 1024}))
"""


def record_template(out: Path, depth: int) -> None:
    """Two real recorded steps of the sample GPT (the run's shape, meta and prediction)."""
    cmd = [sys.executable, "-m", "stabscope", "profile", str(ROOT / "sample_models/gpt.py")]
    cmd += ["--steps", "2", "--dense", "2", "--preset", "full", "--set", f"depth={depth}"]
    cmd += ["--out", str(out), "--force", "-q"]
    subprocess.run(cmd, check=True, capture_output=True)


def write_run(template: Path, run: Path, rows: int, diverge: bool, seed: int = 0) -> int:
    """``rows`` rows of the template's last recorded step, repeated with drift and noise."""
    rng = np.random.default_rng(seed)
    frame = load_run(template, phase="train")
    last = frame[frame.step == frame.step.max()].reset_index(drop=True)
    first = frame[frame.step == frame.step.min()].reset_index(drop=True)
    meta = read_meta(template)
    per_step = len(last)
    steps = max(2, rows // per_step)
    run.mkdir(parents=True)
    shutil.copy(template / "prediction.json", run / "prediction.json")
    writer = PartWriter(run, part_rows=500_000, flush_seconds=1e9)
    module = np.array([writer.modules(str(m)) for m in last.module])
    metric_names = last.metric.astype(str).to_numpy()
    metric = np.array([writer.metrics(m) for m in metric_names])
    index = last["index"].to_numpy(np.int16)
    base = last.value.to_numpy(np.float32)
    train = writer.phases("train")
    zeros = np.zeros(per_step, np.int16)

    def rows_of(name: str, module_name: str | None = None) -> np.ndarray:
        hit = metric_names == name
        if module_name is not None:
            hit &= last.module.astype(str).to_numpy() == module_name
        return np.flatnonzero(hit)

    loss, flags = rows_of("loss"), np.r_[rows_of("act_nonfinite"), rows_of("grad_nonfinite")]
    heads = rows_of("attn_logit_max")
    matrices = [p["name"] for p in meta["parameters"] if len(p["shape"]) >= 2]
    big_update = rows_of("update_ratio", matrices[len(matrices) // 2])
    last_block = [m for m in meta["modules"] if m.get("role") == "block"][-1]["name"]
    nonfinite = np.r_[rows_of("act_nonfinite", last_block), rows_of("grad_nonfinite", last_block)]
    spike, nan_from = (7 * steps) // 10, steps - max(1, steps // 100) if diverge else steps + 1
    for step in range(steps):
        if step == 0:  # the recorded init, unchanged
            values = first.value.to_numpy(np.float32).copy()
        else:
            values = base * np.exp(rng.normal(0, 0.05, per_step)).astype(np.float32)
            values[loss] = base[loss] * (1 + 3 / (1 + step / 100))
            values[flags] = 0
            values[heads[:1]] = base[heads[:1]] * (1 + 2000 * step / steps)
        if step == spike:
            values[loss] *= 5
            values[big_update] = 0.3
        if step >= nan_from:
            values[loss] = np.nan
            values[nonfinite] = 1
        writer.append(np.full(per_step, step), np.full(per_step, train), module, zeros,
                      metric, index, values)  # fmt: skip
    writer.flush()
    if diverge:
        meta["first_nonfinite"] = {"forward": {"step": nan_from, "module": last_block, "call": 0}}
    meta.update(steps=steps, recorded_steps=steps, rows=writer.rows_written)
    meta.update(parts=writer.parts_written, status="complete")
    save_meta(run, meta)
    return writer.rows_written


def measure(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=float, default=50e6, help="rows to write (default 50e6)")
    ap.add_argument("--depth", type=int, default=24, help="layers of the sample GPT")
    ap.add_argument("--keep", type=Path, help="keep the run here (reused when it exists)")
    ap.add_argument("--commands", default="report,check", help="which to time, in this order")
    ap.add_argument("--no-diverge", dest="diverge", action="store_false")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="stabscope-check-"))
    run = root / "run"
    if not (run / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        record_template(root / "template", args.depth)
        n = write_run(root / "template", run, int(args.rows), args.diverge)
        print(f"wrote {n / 1e6:.1f}M rows to {run} in {time.perf_counter() - t0:.1f} s")
    rows = read_meta(run)["rows"]
    disk = sum(p.stat().st_size for p in (run / "parts").glob("*.parquet")) / 1e6
    print(f"run: {rows / 1e6:.1f}M rows, {disk:.0f} MB of parts, depth {args.depth}")
    print("| command | exit | wall time | CPU time | peak RSS |\n|---|---|---|---|---|")
    stabscope = [sys.executable, "-m", "stabscope"]
    commands = {
        "report": [*stabscope, "report", str(run), "-o", str(root / "report.html")],
        "check": [*stabscope, "check", str(run), "--format", "json"],
    }
    for name in args.commands.split(","):
        m = measure(commands[name])
        print(
            f"| `stabscope {name}` | {m['rc']} | {m['seconds']:.1f} s | {m['cpu']:.1f} s "
            f"| {m['peak_mb']:.0f} MB |"
        )
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
