"""Run every foreign script's variants under `stabscope profile`, with truth from their own
loss logs (docs/foreign.md).

    python -m bench.foreign.run --out /tmp/stabscope-foreign [--workers 2] [--only lstm-ok,...]

Writes OUT/NAME/ (the run), OUT/NAME.loss.jsonl (the script's own loss log), OUT/NAME.out
(the command's output) and OUT/NAME/truth.json (bench/foreign/truth.py, from the loss log
only). A run is trained again only when its script, common.py or its command changed (a hash
of them is kept in truth.json); the truth of every run is recomputed each time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from bench.foreign import common, truth

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMEOUT_S = 1800


@dataclass(frozen=True)
class Variant:
    name: str
    script: str  # file in bench/foreign
    mode: str  # "model": a model script; "script": a plain training loop (zero-code); "recorder"
    steps: int  # the step budget (a model script's --steps; the others' own loop length)
    args: tuple[str, ...] = ()  # --set for a model script, the script's own arguments otherwise
    profile: tuple[str, ...] = ()  # extra `stabscope profile` options
    key: str = "loss"  # the logged column the truth judges (lower is better)
    baseline: Callable[[], float] | None = None  # the task's trivial baseline (truth.py)

    def command(self, out: Path) -> list[str]:
        script = str(HERE / self.script)
        if self.mode == "recorder":
            return [sys.executable, script, *self.args]
        cmd = [sys.executable, "-m", "stabscope", "profile", script, "--out", str(out), "--force"]
        if self.mode == "model":
            sets = [x for a in self.args for x in ("--set", a)]
            return [*cmd, "--steps", str(self.steps), "--device", "cpu", *sets, *self.profile]
        return [*cmd, *self.profile, *(["--", *self.args] if self.args else [])]


def text_unigram() -> float:
    return common.unigram_entropy(common.text_bytes(), 128)


def _ok_fail(name: str, script: str, steps: int, **kw) -> list[Variant]:
    return [
        Variant(f"{name}-ok", script, "model", steps, ("fail=0",), **kw),
        Variant(f"{name}-fail", script, "model", steps, ("fail=1",), **kw),
    ]


def uniform10() -> float:
    return common.UNIFORM_10


VARIANTS: list[Variant] = [
    *_ok_fail("lstm", "lstm_lm.py", 200, baseline=text_unigram),
    *_ok_fail("mixer", "mixer.py", 150, baseline=uniform10),
    *_ok_fail("vit", "vit.py", 150, baseline=uniform10),
    *_ok_fail("bert", "hf_bert_mlm.py", 250, baseline=common.walk_unigram),
    *_ok_fail("t5", "hf_t5.py", 200, baseline=lambda: math.log(32)),  # reversed uniform tokens
    *_ok_fail("resnet", "resnet_cnn.py", 150, baseline=uniform10),
    *_ok_fail("finetune", "finetune.py", 200),  # starts converged: progress is judged alone
    *_ok_fail("qk", "qknorm_bf16.py", 200, baseline=common.walk_unigram),
    *_ok_fail("wr", "warm_restarts.py", 240, baseline=uniform10),
    Variant("vae-ok", "rec_vae.py", "recorder", 300, ("ok",)),
    Variant("vae-fail", "rec_vae.py", "recorder", 300, ("fail",)),
    Variant("gan-ok", "train_gan.py", "script", 300, key="q"),
    Variant("gan-fail", "train_gan.py", "script", 300, ("--lr", "0.5", "--beta1", "0.9"), key="q"),
    # The healthy GAN again, with the online rules allowed to stop it: they must not.
    Variant("gan-ok-stop", "train_gan.py", "script", 300, profile=("--on-error", "stop"), key="q"),
    Variant("accum-ok", "train_accum.py", "script", 120, baseline=text_unigram),
    Variant("accum-nozero", "train_accum.py", "script", 120, ("--bug-no-zero",),
            baseline=text_unigram),
    Variant("labelnoise-ok", "train_labelnoise.py", "script", 200, baseline=uniform10),
    Variant("labelnoise-nostep", "train_labelnoise.py", "script", 200, ("--bug-no-step",),
            baseline=uniform10),
    Variant("labelnoise-zerobug", "train_labelnoise.py", "script", 200,
            ("--bug-zero-before-step",), baseline=uniform10),
]  # fmt: skip


def source_hash(v: Variant) -> str:
    """The script, common.py and the command (without paths): a change retrains the run."""
    digest = hashlib.sha256()
    for path in (HERE / v.script, HERE / "common.py"):
        digest.update(path.read_bytes())
    digest.update(json.dumps([v.mode, v.steps, v.args, v.profile]).encode())
    return digest.hexdigest()[:16]


def paths(out: Path, name: str) -> tuple[Path, Path, Path]:
    """The run directory, the script's loss log and the command's output of run ``name``."""
    return out / name, out / f"{name}.loss.jsonl", out / f"{name}.out"


def is_done(v: Variant, out: Path) -> bool:
    run, log, _ = paths(out, v.name)
    record = run / "truth.json"
    if not (record.exists() and log.exists() and (run / "meta.json").exists()):
        return False
    return json.loads(record.read_text()).get("source_hash") == source_hash(v)


def train(v: Variant, out: Path) -> tuple[int, float]:
    """Run ``v`` to completion (whatever its exit status: a failing run is data); returns the
    exit status and the wall seconds."""
    run, log, output = paths(out, v.name)
    shutil.rmtree(run, ignore_errors=True)
    log.unlink(missing_ok=True)
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env = {
        **os.environ,
        **threads,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        common.LOG_ENV: str(log),
        common.RUN_ENV: str(run),
    }
    start = time.perf_counter()
    with output.open("w") as sink:
        try:
            rc = subprocess.run(v.command(run), cwd=ROOT, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, timeout=TIMEOUT_S).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - start


def write_truth(v: Variant, out: Path, extra: dict) -> dict:
    """truth.json of ``v`` from its loss log (kept fields of an earlier write survive)."""
    run, log, _ = paths(out, v.name)
    run.mkdir(parents=True, exist_ok=True)
    record_path = run / "truth.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    values = truth.read_log(log, v.key) if log.exists() else []
    baseline = v.baseline() if v.baseline else None
    verdict = truth.judge(values, baseline)
    record.update(name=v.name, script=v.script, mode=v.mode, steps=v.steps, key=v.key)
    record.update(extra, truth=truth.to_json(verdict, v.steps))
    record_path.write_text(json.dumps(record, indent=1))
    return record


def select(only: str | None, ap: argparse.ArgumentParser) -> list[Variant]:
    if not only:
        return VARIANTS
    names = only.split(",")
    unknown = sorted(set(names) - {v.name for v in VARIANTS})
    if unknown:  # exits 2
        ap.error(f"unknown run(s) {', '.join(unknown)} (known: "
                 + ", ".join(v.name for v in VARIANTS) + ")")  # fmt: skip
    return [v for v in VARIANTS if v.name in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/stabscope-foreign"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", help="comma-separated run names (default: all)")
    args = ap.parse_args()
    variants = select(args.only, ap)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [v for v in variants if not is_done(v, args.out)]
    print(f"{len(variants)} runs, {len(todo)} to train", file=sys.stderr, flush=True)
    begin = time.perf_counter()

    with ThreadPoolExecutor(args.workers) as pool:
        jobs = {pool.submit(train, v, args.out): v for v in todo}
        for i, job in enumerate(as_completed(jobs), 1):
            v, (rc, wall) = jobs[job], job.result()
            extra = {"source_hash": source_hash(v), "exit_status": rc, "wall_s": round(wall, 1),
                     "command": v.command(paths(args.out, v.name)[0])}  # fmt: skip
            t = write_truth(v, args.out, extra)["truth"]
            verdict = f"FAIL ({t['reason']})" if t["failed"] else "healthy"
            print(f"[{i}/{len(todo)}] {v.name}: exit {rc}, {wall:.0f} s, truth {verdict}",
                  file=sys.stderr, flush=True)  # fmt: skip
    for v in variants:
        if v not in todo:
            write_truth(v, args.out, {})
    print(f"done in {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
