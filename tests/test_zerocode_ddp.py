"""An unmodified DDP or FSDP2 training script under ``torchrun --nproc_per_node=2 -m stabscope
profile`` (gloo, CPU): every rank records its own parts, rank 0 owns meta.json, load_run sees
both, and the numbers match one process that averages the ranks' gradients by hand."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import stabscope
from stabscope.rules import check_run
from tests.conftest import ROOT
from tests.scripts import train_ddp
from tests.scripts.harness import SCRIPTS, read_log
from tests.scripts.train_ddp import HIDDEN

pytestmark = pytest.mark.slow

WORLD, STEPS = 2, 4


def reference_grads() -> list[torch.Tensor]:
    """The mean over ranks of each rank's gradient of 0.weight, (HIDDEN, D_IN) per step: DDP's
    all-reduce; FSDP2's reduce-scatter gives rank r rows r*HIDDEN/WORLD onwards of it."""
    model = train_ddp.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grads = []
    for step in range(STEPS):
        opt.zero_grad()
        for rank in range(WORLD):
            x, y = train_ddp.batch(step, rank)
            (nn.functional.mse_loss(model(x), y) / WORLD).backward()
        grads.append(model[0].weight.grad.clone())
        opt.step()
    return grads


def torchrun_profile(
    out, logs, *script_args: str, force: bool = False, script: str = "train_ddp.py"
):
    """``torchrun --nproc_per_node=2 -m stabscope profile train_ddp.py`` (gloo, CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={WORLD}", "-m", "stabscope", "profile"]
    cmd += [str(SCRIPTS / script), "--out", str(out), "-q", *(["--force"] * force)]
    return subprocess.run(
        [*cmd, "--", "--steps", str(STEPS), "--log-dir", str(logs), *script_args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_records_each_rank_of_an_unmodified_script(tmp_path, fsdp):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    proc = torchrun_profile(out, logs, *(["--fsdp"] if fsdp else []))
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = stabscope.read_meta(out)
    assert meta["status"] == "complete" and meta["rank"] == 0 and meta["world_size"] == WORLD
    assert meta["distributed"]["sharded"] == fsdp
    if not fsdp:
        assert meta["run"]["wrapper"] == "DistributedDataParallel"
    # Names without DDP's `module.` prefix.
    assert {m["name"] for m in meta["modules"]} == {"<root>", "0", "1", "2"}
    # Each part file holds one rank's rows; both ranks wrote.
    ranks_per_part = [
        set(pq.read_table(p, columns=["rank"]).column("rank").to_pylist())
        for p in sorted((out / "parts").glob("*.parquet"))
    ]
    assert all(len(r) == 1 for r in ranks_per_part)
    assert set().union(*ranks_per_part) == {0, 1}
    df = stabscope.load_run(out)
    for rank in range(WORLD):
        mine = df[(df["rank"] == rank) & (df.metric == "loss")].sort_values("step")
        logged = read_log(logs / f"rank{rank}.jsonl")
        assert mine.value.tolist() == pytest.approx([r["loss"] for r in logged], rel=1e-6)
        grad = df[(df["rank"] == rank) & (df.metric == "param_grad_norm")]
        grad = grad[grad.module == "0.weight"].sort_values("step")
        rows = slice(rank * HIDDEN // WORLD, (rank + 1) * HIDDEN // WORLD) if fsdp else slice(None)
        want = [g[rows].norm().item() for g in reference_grads()]  # the rank's shard, or all
        assert grad.value.tolist() == pytest.approx(want, rel=1e-5)
    # Merged over ranks: the full parameter's gradient norm either way.
    merged = stabscope.load_run(out, merge_ranks=True, modules=["0.weight"])
    merged = merged[merged.metric == "param_grad_norm"].sort_values("step")
    want = [g.norm().item() for g in reference_grads()]
    assert merged.value.tolist() == pytest.approx(want, rel=1e-5)


def test_a_failure_on_rank_1_is_the_runs_error_not_rank_0s_knock_on(tmp_path):
    """Rank 1 raises before step 2's forward. Rank 0 then fails in the all-reduce ("Connection
    closed by peer"), or torchrun ends it with SIGTERM, whichever comes first: meta.json, which
    rank 0 alone writes, must still give rank 1's error as the run's, and the gate say so.
    Profiling again with --force leaves none of it behind."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    proc = torchrun_profile(out, logs, "--fail-rank", "1", "--fail-at", "2")
    assert proc.returncode != 0
    meta = stabscope.read_meta(out)
    assert meta["status"] == "failed"
    error = meta["error"]
    assert (error["rank"], error["type"]) == (1, "ValueError")
    assert "rank 1's data loader failed at step 2" in error["message"]
    assert any("train_ddp.py" in frame and "main" in frame for frame in error["traceback"])
    assert meta["rank_errors"][0] == error
    assert [e["time"] for e in meta["rank_errors"]] == sorted(
        e["time"] for e in meta["rank_errors"]
    )
    # Rank 0 recorded its two steps: their losses are the ones its own log has.
    df = stabscope.load_run(out, metrics=["loss"])
    mine = df[df["rank"] == 0].sort_values("step")
    assert mine.value.tolist() == pytest.approx(
        [r["loss"] for r in read_log(logs / "rank0.jsonl")], rel=1e-6
    )
    assert len(mine) == 2
    (status,) = [f for f in check_run(out).findings if f.rule == "run-status"]
    assert status.severity == "error"
    assert "rank 1 failed first with ValueError: rank 1's data loader failed" in status.message

    for log in logs.iterdir():
        log.unlink()
    again = torchrun_profile(out, logs, force=True)
    assert again.returncode == 0, again.stderr[-4000:]
    assert not list(out.glob("error-rank*.json"))
    assert stabscope.read_meta(out)["status"] == "complete"
    assert "rank_errors" not in stabscope.read_meta(out)


def test_a_fault_of_stabscopes_own_on_rank_1_makes_the_run_incomplete(tmp_path):
    """stabscope's step boundary raises on rank 1 at step 2 (rank 1's recording stops there;
    its training goes on): meta.json, which rank 0 alone writes, must say so, and the gate
    read the run as incomplete. Both ranks' losses are those of the script without the fault,
    and rank 1's recorded steps end at the fault."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    proc = torchrun_profile(
        out, logs, "--fault-rank", "1", "--fault-at", "2", script="train_ddp_tool_fault.py"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stabscope's own error in a step boundary at step 2" in proc.stderr
    meta = stabscope.read_meta(out)
    assert meta["status"] == "complete" and meta.get("error") is None
    fault = meta["tool_error"]
    assert (fault["rank"], fault["step"], fault["message"]) == (1, 2, "injected fault on rank 1")
    df = stabscope.load_run(out, metrics=["loss"])
    for rank in range(WORLD):
        own = [r["loss"] for r in read_log(logs / f"rank{rank}.jsonl")]
        assert len(own) == STEPS
        mine = df[df["rank"] == rank].sort_values("step")
        assert mine.value.tolist() == pytest.approx(own[: len(mine)], rel=1e-6)
    assert df[df["rank"] == 1].step.max() <= 2 < df[df["rank"] == 0].step.max()
    (status,) = [f for f in check_run(out).findings if f.rule == "run-status"]
    assert status.severity == "error"
    assert status.message.startswith("the recording of rank 1 stopped at step 2")
    again = torchrun_profile(out, logs, force=True)
    assert again.returncode == 0, again.stderr[-4000:]
    assert not list(out.glob("fault-rank*.json"))
    assert "tool_error" not in stabscope.read_meta(out)
