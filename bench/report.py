"""Time, peak memory and page size of `stabscope report` on large synthetic runs.

    python bench/report.py                      # the three cases below
    python bench/report.py --cases 48x2000      # one case
    python bench/report.py --keep /tmp/bench    # keep the runs and reports there

Each case is a GPT-like run of LAYERS blocks recorded at STEPS steps, written through the
real run store (PartWriter, new_meta, save_meta) with every metric the recorder and the
transformer probes write: per block 10 modules x 8 moments, 12 parameters x 7 statistics,
2 residual branches x 3, 4 heads x 2 attention statistics, token correlation, 2 norm
inputs (181 rows per layer and step), plus loss, lr and model update.
The report is built in a fresh process that prints its own wall time and peak resident
memory (ru_maxrss), so the numbers are those of `stabscope report` alone.
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

from stabscope.store import PartWriter, new_meta, save_meta

CASES = {"48x2000": (48, 2000), "48x10000": (48, 10000), "1000x1000": (1000, 1000)}
MODULES = ("", ".ln1", ".attn", ".attn.qkv", ".attn.proj", ".ln2", ".mlp", ".mlp.fc")
MODULES += (".mlp.act", ".mlp.proj")
MOMENTS = ("act_mean", "act_rms", "act_absmax", "act_nonfinite")
MOMENTS += ("grad_mean", "grad_rms", "grad_absmax", "grad_nonfinite")
PARAMS = tuple(
    f"{m}.{w}"
    for m in (".ln1", ".attn.qkv", ".attn.proj", ".ln2", ".mlp.fc", ".mlp.proj")
    for w in ("weight", "bias")
)
PARAM_STATS = ("param_norm", "param_rms", "param_grad_norm", "param_grad_rms")
PARAM_STATS += ("update_norm", "update_ratio", "adam_sqrtv_over_eps")
HEADS = 4

MEASURE = """
import json, resource, sys, time
t0 = time.perf_counter()
from stabscope.report.build import build_report
r = build_report(sys.argv[1:-1], sys.argv[-1])
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": r.size, "plots": r.plots,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def meta(layers: int, steps: int) -> dict:
    modules = [{"name": "<root>", "type": "GPT", "layer": None, "role": "model", "depth": 0}]
    blocks = []
    for i in range(layers):
        for suffix in MODULES:
            name = f"blocks.{i}{suffix}"
            role = "block" if not suffix else suffix.rsplit(".", 1)[-1]
            modules.append({"name": name, "type": role, "layer": i, "role": role})
            modules[-1]["depth"] = name.count(".") + 1
        branches = [
            {"name": f"blocks.{i}.attn", "kind": "attention", "norm": f"blocks.{i}.ln1"},
            {"name": f"blocks.{i}.mlp", "kind": "mlp", "norm": f"blocks.{i}.ln2"},
        ]
        blocks.append(
            {
                "name": f"blocks.{i}",
                "index": i,
                "stack": "",
                "placement": "pre",
                "alpha": None,
                "branches": branches,
                "attention": [{"name": f"blocks.{i}.attn", "heads": HEADS}],
            }
        )
    for order, m in enumerate(modules):
        m["forward_order"] = order
    params = [
        {"name": f"blocks.{i}{p}", "shape": [64], "numel": 64, "layer": i}
        for i in range(layers)
        for p in PARAMS
    ]
    return new_meta(
        command=["bench/report.py"],
        status="complete",
        model_type="GPT",
        modules=modules,
        parameters=params,
        structure={"recognised": True, "notes": [], "blocks": blocks},
        config={"preset": "standard", "schedule": {"dense": 10, "every": 1, "log": False}},
        steps=steps,
        recorded_steps=steps,
    )


def write_run(run_dir: Path, layers: int, steps: int) -> int:
    """The run's rows, step by step, as the recorder would append them."""
    save_meta(run_dir, meta(layers, steps))
    w = PartWriter(run_dir, part_rows=2_000_000, flush_seconds=1e9)
    train = w.phases("train")
    codes, metrics, index, depth = [], [], [], []

    def rows(names: list[str], stats: tuple[str, ...], heads: int = 0) -> None:
        for layer, name in names:
            for stat in stats:
                for h in range(heads) or [-1]:
                    codes.append(w.modules(name))
                    metrics.append(w.metrics(stat))
                    index.append(h)
                    depth.append(layer)

    per_layer = range(layers)
    rows([(i, f"blocks.{i}{s}") for i in per_layer for s in MODULES], MOMENTS)
    rows([(i, f"blocks.{i}{p}") for i in per_layer for p in PARAMS], PARAM_STATS)
    branches = [(i, f"blocks.{i}.{b}") for i in per_layer for b in ("attn", "mlp")]
    rows(branches, ("res_ratio", "res_dependency", "res_omega"))
    rows([(i, f"blocks.{i}.attn") for i in per_layer], ("attn_entropy", "attn_logit_max"), HEADS)
    rows([(i, f"blocks.{i}") for i in per_layer], ("token_corr",))
    rows([(i, f"blocks.{i}.ln{k}") for i in per_layer for k in (1, 2)], ("norm_input_rms",))
    rows([(0, "__run__")], ("loss", "lr", "model_update"))
    codes_a, metrics_a = np.array(codes), np.array(metrics)
    index_a, depth_a = np.array(index), np.array(depth, np.float32)
    n = len(codes_a)
    rng = np.random.default_rng(0)
    scale = (1 + depth_a / max(layers, 1)).astype(np.float32)
    spike = (depth_a == layers // 2) & (metrics_a == w.metrics("grad_rms"))
    for step in range(steps):
        # log-normal noise around a depth trend; one layer's gradient spikes once
        values = scale * np.exp(rng.normal(0, 0.3, n)).astype(np.float32) / (1 + step / 100)
        if step == (7 * steps) // 10:
            values[spike] *= 100
        w.append(
            np.full(n, step), np.full(n, train), codes_a, np.zeros(n), metrics_a, index_a, values
        )
    w.flush()
    return w.rows_written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES)
    )
    ap.add_argument("--keep", type=Path, default=None, help="directory for the runs and reports")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="stabscope-bench-"))
    print("| case | rows | parts on disk | written in | report | with start-up | peak RSS | HTML |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        layers, steps = CASES[case]
        run = root / f"run-{case}"
        t0 = time.perf_counter()
        n = write_run(run, layers, steps)
        written = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in (run / "parts").glob("*.parquet")) / 1e6
        out = root / f"report-{case}.html"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-c", MEASURE, str(run), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        total = time.perf_counter() - t0
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"| {layers} layers x {steps} steps | {n / 1e6:.1f}M | {disk:.0f} MB | {written:.1f} s "
            f"| **{m['seconds']:.1f} s** | {total:.1f} s | {m['peak_mb']:.0f} MB "
            f"| {m['bytes'] / 1e6:.1f} MB, {m['plots']} plots |",
            flush=True,
        )
    if args.keep:
        print(f"runs and reports in {root}")
    else:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
