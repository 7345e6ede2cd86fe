"""Train the development grid under stabscope and cache each run's ground truth.

    python -m bench.grid.run --out /tmp/stabscope-grid            # the grid, 2 workers
    python -m bench.grid.run --out /tmp/grid-smoke --smoke        # 2 configs a family, 30 steps
    python -m bench.grid.run --out DIR --families llama,bert --seeds 0
    python -m bench.grid.score --out DIR                          # LOFO tables: score.py

Each run: ``profile_script`` on bench/grid/script.py with the config's ``--set`` values, the
standard preset and the default schedule, 1 thread, into DIR/NAME-sSEED/; then
DIR/NAME-sSEED/truth.json (bench/grid/truth.py: from the recorded loss and the first
non-finite step, no rule involved), with the config, the unigram baseline and the planned lr
of every step. A run whose truth.json holds the same settings is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.grid.failures import GRID, Config

SCRIPT = Path(__file__).with_name("script.py")
TRUTH = "truth.json"


def one_thread() -> None:
    """1 thread per worker for torch, numba and BLAS (set before they are imported)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"


def run_dir(out: Path, config: Config, seed: int) -> Path:
    return out / f"{config.name}-s{seed}"


def nonfinite_step(meta: dict) -> int | None:
    """The first step with a non-finite forward or backward value the recorder saw."""
    steps = [w["step"] for w in (meta.get("first_nonfinite") or {}).values() if "step" in w]
    return min(steps) if steps else None


def train_one(job: tuple[Config, int, int, str]) -> dict:
    """Train and judge one run; returns its truth record (also written to truth.json)."""
    config, seed, steps, out = job
    import torch

    torch.set_num_threads(1)
    from bench.grid import families, tasks
    from bench.grid.script import planned_lrs
    from bench.grid.truth import judge
    from stabscope import load_run, read_meta
    from stabscope.drivers.profile import profile_script
    from stabscope.drivers.script import load_script
    from stabscope.record.config import RecorderConfig

    sets = settings(config, steps)
    script = load_script(SCRIPT, sets)
    directory = run_dir(Path(out), config, seed)
    start, cpu = time.perf_counter(), time.process_time()
    profile_script(script, directory, steps, RecorderConfig(), seed=seed, device="cpu", force=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    task = tasks.make_task(script.config)
    baseline = tasks.unigram_baseline(task, families.FORMS[config.family])
    loss = load_run(directory, metrics="loss").sort_values("step").value.to_numpy(float)
    truth = judge(loss, baseline, steps, nonfinite_step(read_meta(directory)))
    record = {
        "name": config.name,
        "seed": seed,
        "family": config.family,
        "kind": config.kind,
        "expect": config.expect,
        "task": script.config.task,
        "steps": steps,
        "sets": sets,
        "seconds": round(seconds, 2),  # wall clock of profile_script
        "cpu_seconds": round(cpu, 2),  # this process's CPU time: the wall time on an idle core
        "truth": truth.to_json(),
        "planned_lr": planned_lrs(script.config),
    }
    (directory / TRUTH).write_text(json.dumps(record, indent=1) + "\n")
    return record


def settings(config: Config, steps: int) -> dict[str, str]:
    """The script's --set values of a run: the config's, its family and the budget."""
    return {**config.sets, "family": config.family, "steps": str(steps)}


def finished(out: Path, config: Config, seed: int, steps: int) -> bool:
    """A truth.json recorded with exactly these settings (a changed config trains again)."""
    path = run_dir(out, config, seed) / TRUTH
    return path.exists() and json.loads(path.read_text())["sets"] == settings(config, steps)


def select(args: argparse.Namespace) -> list[Config]:
    grid = list(GRID)
    if args.families:
        wanted = set(args.families.split(","))
        grid = [c for c in grid if c.family in wanted]
    if args.kinds:
        wanted = set(args.kinds.split(","))
        grid = [c for c in grid if c.kind in wanted]
    if args.smoke:  # the first failing config of each family and its first healthy twin
        grid = [c for f in dict.fromkeys(c.family for c in grid) for c in smoke_pair(grid, f)]
    return grid


def smoke_pair(grid: list[Config], family: str) -> list[Config]:
    mine = [c for c in grid if c.family == family]
    fail = next((c for c in mine if c.expect == "fail"), None)
    twin = next((c for c in mine if c.expect == "healthy"), None)
    return [c for c in (fail, twin) if c is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/stabscope-grid"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--families", default="", help="comma-separated: only these families")
    ap.add_argument("--kinds", default="", help="comma-separated: only these failure kinds")
    ap.add_argument("--smoke", action="store_true", help="2 configs a family (use --steps 30)")
    args = ap.parse_args()
    one_thread()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(c, s, args.steps, str(args.out)) for c in select(args) for s in seeds]
    todo = [j for j in jobs if not finished(args.out, *j[:3])]
    print(f"{len(jobs)} runs, {len(todo)} to train", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        for i, rec in enumerate(pool.map(train_one, todo), 1):
            t = rec["truth"]
            print(
                f"[{i}/{len(todo)}] {rec['name']}-s{rec['seed']} {rec['seconds']:.0f}s "
                f"(cpu {rec['cpu_seconds']:.0f}s) "
                f"{t['kind']} step {t['failure_step']} final {t['final_loss']}",
                file=sys.stderr,
                flush=True,
            )
    print(f"trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
