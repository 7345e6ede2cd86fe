"""torch.distributed through the library API: real torchrun runs (2 ranks, gloo, CPU) of
tests/dist_scripts/train.py, checked against one process that averages the ranks' gradients
by hand (what DDP's all-reduce and FSDP's reduce-scatter compute)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import stabscope
from stabscope import Schedule
from stabscope.analysis.summary import summarize
from stabscope.report.build import build_report
from stabscope.report.data import Budget, census_of, collect
from stabscope.report.rank_spread import collect_rank_spread
from stabscope.report.runs import open_run
from stabscope.rules import check_run
from tests.conftest import ROOT
from tests.dist_scripts import train as script

pytestmark = pytest.mark.slow

WORLD, STEPS = 2, 6
SCALE = 10.0  # rank 1's data is this many times larger in the desynchronised run
UNSYNC = 4  # and at this step its gradients are not all-reduced: the replicas part
CLIP = 0.05  # the FSDP runs clip to this max norm: below every step's gradient norm


def torchrun(out: Path, *args: str, script: str = "train.py") -> str:
    """Run a script of tests/dist_scripts on 2 ranks; returns its stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={WORLD}", str(ROOT / "tests/dist_scripts" / script), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if script == "train.py":
        args = ("--steps", str(STEPS), *args)
    proc = subprocess.run(
        [*cmd, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@dataclass
class Step:
    params: list[dict[str, torch.Tensor]]  # per rank, before the optimizer step
    grads: list[dict[str, torch.Tensor]]  # per rank, the gradient its optimizer applied
    losses: list[float]  # per rank
    act_rms: list[float]  # per rank, output of layer "0"
    grad_norm: float  # L2 norm of the averaged gradient over all parameters, before any clip
    exp_avg_sq: dict[str, torch.Tensor]  # rank 0's Adam second moments after the step


def reference(
    scale_rank: int = -1,
    scale: float = 1.0,
    same_data: bool = False,
    unsync_step: int = -1,
    clip: float | None = None,
) -> list[Step]:
    """The same training in one process without torch.distributed: one replica per rank, the
    ranks' gradients averaged by hand (what DDP's all-reduce and FSDP's reduce-scatter
    compute), except at ``unsync_step``, where each replica applies its own. With ``clip``
    the averaged gradient is scaled by min(1, clip / (its norm + 1e-6)), as torch clips."""
    replicas = [script.make_model() for _ in range(WORLD)]
    opts = [script.make_optimizer(m) for m in replicas]
    steps = []
    for step in range(STEPS):
        own, losses, acts = [], [], []
        for rank, model in enumerate(replicas):
            x, y = script.batch(step, rank, scale_rank, scale, same_data)
            hidden = model[0](x)
            loss = (model[1:](hidden) - y).pow(2).mean()
            grads = torch.autograd.grad(loss, list(model.parameters()))
            own.append({n: g for (n, _), g in zip(model.named_parameters(), grads)})
            losses.append(loss.item())
            acts.append(hidden.detach().double().pow(2).mean().sqrt().item())
        mean = {n: sum(g[n] for g in own) / WORLD for n in own[0]}
        norm = torch.stack([g.double().norm() for g in mean.values()]).norm().item()
        if clip is not None:
            mean = {n: g * min(1.0, clip / (norm + 1e-6)) for n, g in mean.items()}
        used = own if step == unsync_step else [mean] * WORLD
        params = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in replicas]
        for model, opt, grads in zip(replicas, opts, used):
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
        second = {
            n: opts[0].state[p]["exp_avg_sq"].clone() for n, p in replicas[0].named_parameters()
        }
        steps.append(Step(params, used, losses, acts, norm, second))
    return steps


def per_rank(ref: list[Step], what: str, name: str, of=lambda t: t.double().norm().item()):
    """(steps, ranks) array of ``of`` applied to a reference parameter or gradient."""
    return np.array([[of(d[name]) for d in getattr(s, what)] for s in ref])


def values(run: Path, metric: str, module: str) -> np.ndarray:
    """(steps, ranks) array of one metric of one module."""
    df = stabscope.load_run(run, modules=[module], metrics=[metric], phase="train")
    table = df[df.call == 0].pivot_table(index="step", columns="rank", values="value")
    return table.sort_index().to_numpy(np.float64)


@pytest.fixture(scope="module")
def desync_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    args = ["--scale-rank", "1", "--scale", str(SCALE), "--unsync-step", str(UNSYNC)]
    stdout = torchrun(out, *args, "--check-refusal")
    return out, stdout


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """FSDP2, clipped by ``torch.nn.utils.clip_grad_norm_`` at every step."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    torchrun(out, "--mode", "fsdp", "--clip", str(CLIP))
    return out


@pytest.fixture(scope="module")
def fsdp1_run(tmp_path_factory) -> Path:
    """FSDP1 (FULL_SHARD, every Linear and the root wrapped), clipped by its own
    ``clip_grad_norm_`` at every step."""
    out = tmp_path_factory.mktemp("fsdp1") / "run"
    torchrun(out, "--mode", "fsdp1", "--clip", str(CLIP))
    return out


def test_each_rank_writes_its_own_parts_and_rank0_owns_meta(desync_run):
    run, _ = desync_run
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "complete"
    assert meta["rank"] == 0 and meta["world_size"] == WORLD
    assert meta["distributed"] == {
        "world_size": WORLD,
        "backend": "gloo",
        "wrapper": "DistributedDataParallel",
        "sharded": False,
    }
    files = sorted(p.name for p in (run / "parts").iterdir())
    assert not [f for f in files if f.startswith(".")]  # nothing left half-written
    assert not list(run.glob(".*"))  # rank 0's lock and space reserve are gone with the run
    ranks_of = {f: set(pq.read_table(run / "parts" / f).column("rank").to_pylist()) for f in files}
    # Every part holds one rank, numbered in that rank's block: no file has two writers.
    for name, ranks in ranks_of.items():
        (rank,) = ranks
        assert int(name[5:-8]) // 10_000_000 == rank
    assert set().union(*ranks_of.values()) == {0, 1}
    df = stabscope.load_run(run)
    assert (df.groupby("rank").size() == len(df) // WORLD).all()


def test_both_ranks_refuse_an_existing_run_instead_of_waiting(desync_run):
    _, stdout = desync_run
    assert sorted(re.findall(r"rank (\d) refused: ", stdout)) == ["0", "1"]
    assert "rank 0: " in stdout  # rank 1 raises rank 0's error
    # While the run was open, --force was refused on every rank: rank 0 holds the lock.
    live = re.findall(r"rank (\d) refused while open: (.*)", stdout)
    assert sorted(r for r, _ in live) == ["0", "1"]
    assert all("is being written by another run" in why for _, why in live)


def test_names_are_the_inner_models_whether_ddp_or_inner_was_given(desync_run):
    run, _ = desync_run
    inner = script.make_model()
    expected = {n or "<root>" for n, _ in inner.named_modules()}
    expected |= {n for n, _ in inner.named_parameters()} | {"__run__"}
    df = stabscope.load_run(run)
    for rank in range(WORLD):  # rank 0 recorded the DDP wrapper, rank 1 the inner model
        assert set(df[df["rank"] == rank].module.astype(str)) == expected
    meta = stabscope.read_meta(run)
    assert {m["name"] for m in meta["modules"]} == {n or "<root>" for n, _ in inner.named_modules()}


def test_recorded_gradients_are_the_all_reduced_ones(desync_run):
    run, _ = desync_run
    ref = reference(scale_rank=1, scale=SCALE, unsync_step=UNSYNC)
    for name in ("0.weight", "2.bias", "4.weight"):
        got = values(run, "param_grad_norm", name)
        np.testing.assert_allclose(got, per_rank(ref, "grads", name), rtol=1e-5)
        assert (got[:UNSYNC, 0] == got[:UNSYNC, 1]).all()  # all-reduced: the same bits
        got = values(run, "param_norm", name)
        np.testing.assert_allclose(got, per_rank(ref, "params", name), rtol=1e-5)
        assert (got[: UNSYNC + 1, 0] == got[: UNSYNC + 1, 1]).all()
    # What each rank saw of its own batch stays its own.
    np.testing.assert_allclose(values(run, "loss", "__run__"), [s.losses for s in ref], rtol=1e-5)
    np.testing.assert_allclose(values(run, "act_rms", "0"), [s.act_rms for s in ref], rtol=1e-5)


def test_desynchronised_rank_is_flagged_by_check(desync_run, fsdp_run):
    run, _ = desync_run
    ref = reference(scale_rank=1, scale=SCALE, unsync_step=UNSYNC)
    ratio = np.exp(np.median([np.log(s.losses[1] / s.losses[0]) for s in ref]))
    findings = {f.metric: f for f in check_run(run).findings if f.rule == "rank-desync"}
    loss = findings["loss"]
    assert loss.severity == "warning" and "rank 1's loss" in loss.message
    assert loss.value == pytest.approx(ratio, rel=1e-4)
    assert ratio > 20  # the scaled rank's loss, ~SCALE² times the other's
    # The skipped all-reduce: gradients differ at that step, the weights from the next.
    grads, weights = findings["param_grad_norm"], findings["param_norm"]
    assert (grads.severity, grads.step) == ("error", UNSYNC)
    assert (weights.severity, weights.step) == ("error", UNSYNC + 1)
    got = per_rank(ref, "params", weights.module)[UNSYNC + 1]
    assert weights.value == pytest.approx(abs(got[0] - got[1]) / got.max(), rel=1e-3)
    # Ranks on differently drawn data of the same distribution are not flagged.
    assert not [f for f in check_run(fsdp_run).findings if f.rule == "rank-desync"]


def test_rules_see_one_row_per_number_not_one_per_rank(desync_run, tmp_path):
    """Both ranks train on the same data, so the 2-rank run must give exactly the findings of
    the same training in one process (an Inf at step 3 and a high learning rate give some)."""
    run = tmp_path / "ddp"
    shutil.copytree(desync_run[0], run)  # a finished run of both ranks already in the directory
    torchrun(run, "--same-data", "--lr", "0.5", "--inf-step", "3", "--force")
    model = script.make_model()
    opt = script.make_optimizer(model, 0.5)
    single = tmp_path / "single"
    with stabscope.Recorder(model, single, schedule=Schedule(dense=STEPS, every=0)) as rec:
        script.train_loop(model, opt, rec, STEPS, rank=0, inf_step=3)
    # --force removed both ranks' old parts: rank 1's losses equal rank 0's again.
    losses = values(run, "loss", "__run__")
    np.testing.assert_array_equal(losses[:, 0], losses[:, 1])

    def described(path: Path) -> list[tuple]:
        return [(f.rule, f.severity, f.module, f.step, f.message) for f in check_run(path).findings]

    got, want = described(run), described(single)
    assert {f[0] for f in want} >= {"nonfinite", "update-ratio"}
    assert got == want
    # So does `stabscope summary`: its largest/smallest tables and depth trend likewise.
    two, one = summarize(run), summarize(single)
    for field in ("loss_first", "loss_last", "largest", "smallest", "trend", "headlines"):
        assert repr(getattr(two, field)) == repr(getattr(one, field)), field  # nan == nan


def test_fsdp_parameter_statistics_are_per_shard_and_merge_to_the_full_tensor(fsdp_run):
    ref = reference(clip=CLIP)
    meta = stabscope.read_meta(fsdp_run)
    assert meta["distributed"]["sharded"] is True
    merged = stabscope.load_run(fsdp_run, phase="train", merge_ranks=True)
    for name in ("0.weight", "2.weight", "4.bias"):
        # fully_shard splits dim 0 into WORLD chunks, rank r holding chunk r.
        shard = [[c.double().norm().item() for c in s.params[0][name].chunk(WORLD)] for s in ref]
        np.testing.assert_allclose(values(fsdp_run, "param_norm", name), shard, rtol=1e-5)
        rows = merged[merged.module == name].set_index(["metric", "step"]).value.sort_index()
        full = [s.params[0][name].double() for s in ref]
        grad = [s.grads[0][name].double() for s in ref]
        np.testing.assert_allclose(rows["param_norm"], [p.norm().item() for p in full], rtol=1e-5)
        want = [p.pow(2).mean().sqrt().item() for p in full]
        np.testing.assert_allclose(rows["param_rms"], want, rtol=1e-5)
        want = [g.norm().item() for g in grad]
        np.testing.assert_allclose(rows["param_grad_norm"], want, rtol=1e-5)
    # Module outputs are computed with the gathered weights: full statistics on every rank.
    np.testing.assert_allclose(
        values(fsdp_run, "act_rms", "0"), [s.act_rms for s in ref], rtol=1e-5
    )
    np.testing.assert_allclose(
        values(fsdp_run, "loss", "__run__"), [s.losses for s in ref], rtol=1e-5
    )


def merged_values(run: Path, metric: str, module: str) -> np.ndarray:
    """(steps,) array of one metric of one module, ranks merged."""
    df = stabscope.load_run(
        run, modules=[module], metrics=[metric], phase="train", merge_ranks=True
    )
    return df[df.call == 0].sort_values("step").value.to_numpy(np.float64)


@pytest.mark.parametrize("mode", ["fsdp", "fsdp1"])
def test_fsdp_grad_norm_is_the_clips_total_before_clipping(mode, request):
    """FSDP2 clipped by torch.nn.utils.clip_grad_norm_, FSDP1 by its own clip_grad_norm_:
    each rank records its shards' norm, and the ranks' rows merge to the norm the script's
    clip returned (over every rank's shard) and the reference's, before clipping."""
    run = request.getfixturevalue(f"{mode}_run")
    ref = reference(clip=CLIP)
    returned = json.loads(script.clips_file(run).read_text())
    assert len(returned) == STEPS and min(returned) > 4 * CLIP  # every step clipped
    np.testing.assert_allclose(returned, [s.grad_norm for s in ref], rtol=1e-5)
    pre = merged_values(run, "grad_norm", "__run__")
    np.testing.assert_allclose(pre, returned, rtol=1e-5)
    # After the clip: the norm of the clipped gradients the reference applied (= CLIP).
    clipped = [torch.stack([g.double().norm() for g in s.grads[0].values()]).norm() for s in ref]
    np.testing.assert_allclose(clipped, CLIP, rtol=1e-4)
    post = merged_values(run, "grad_norm_clipped", "__run__")
    np.testing.assert_allclose(post, clipped, rtol=1e-5)
    # Per rank: its shards' part, neither the whole norm nor one rank's for all.
    per_rank = values(run, "grad_norm", "__run__")
    assert (per_rank < pre[:, None] * (1 - 1e-3)).all()


def flat(tensors: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """FSDP1's FlatParameter of Linear ``layer`` (weight, then bias, flattened), unpadded."""
    return torch.cat([tensors[f"{layer}.weight"].flatten(), tensors[f"{layer}.bias"]]).double()


def test_fsdp1_is_sharded_and_its_flat_parameters_merge_to_the_full_ones(fsdp1_run):
    ref = reference(clip=CLIP)
    meta = stabscope.read_meta(fsdp1_run)
    assert meta["distributed"]["sharded"] is True
    assert meta["distributed"]["wrapper"] == "FullyShardedDataParallel"
    beta2, eps = 0.999, 1e-8  # Adam's defaults (script.make_optimizer)
    for layer in (0, 2, 4):  # Linear 4's 39 values are padded to 40 for 2 ranks
        name = f"_fsdp_wrapped_module.{layer}._fsdp_wrapped_module._flat_param"
        full = [flat(s.params[0], layer) for s in ref]
        got = merged_values(fsdp1_run, "param_norm", name)
        np.testing.assert_allclose(got, [p.norm().item() for p in full], rtol=1e-5)
        got = merged_values(fsdp1_run, "param_rms", name)
        np.testing.assert_allclose(got, [p.pow(2).mean().sqrt().item() for p in full], rtol=1e-5)
        got = merged_values(fsdp1_run, "param_grad_norm", name)
        want = [flat(s.grads[0], layer).norm().item() for s in ref]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        got = merged_values(fsdp1_run, "adam_sqrtv_over_eps", name)
        v = [flat(s.exp_avg_sq, layer) for s in ref]
        want = [(x.mean() / (1 - beta2 ** (t + 1))).sqrt().item() / eps for t, x in enumerate(v)]
        assert len(got) == STEPS - 1  # recorded from step 1 on
        np.testing.assert_allclose(got, want[1:], rtol=1e-5)
    # Each rank holds a different shard: not a desynchronised replica.
    assert not [f for f in check_run(fsdp1_run).findings if f.rule == "rank-desync"]


def test_report_merges_ranks_and_shows_their_spread(desync_run, tmp_path):
    run, _ = desync_run
    ref = reference(scale_rank=1, scale=SCALE, unsync_step=UNSYNC)
    result = build_report([run], tmp_path / "ddp.html")
    assert "ranks" in [s.id for s in result.sections]
    html = (tmp_path / "ddp.html").read_text()
    assert all(f'id="fig-ranks-{m}"' in html for m in ("loss", "param_grad_norm", "act_rms"))
    opened = open_run(run, "ddp")
    census = census_of(opened)
    data = collect(opened, census, Budget())
    # Merged: the loss is the mean over ranks; layer 0's gradient norm is rank 0's, not the
    # root-sum-square of both replicas' copies.
    np.testing.assert_allclose(data.series["loss"].mean[0], [np.mean(s.losses) for s in ref])
    _, norms = data.layer_exact["param_grad_norm"]
    want = np.hypot(per_rank(ref, "grads", "0.weight"), per_rank(ref, "grads", "0.bias"))[:, 0]
    np.testing.assert_allclose(norms[opened.layers.index("0")], want, rtol=1e-5)
    # Apart: each rank's loss, and max/min across ranks of layer 0's output rms.
    spread = collect_rank_spread(opened, census)
    np.testing.assert_allclose(spread.curves["loss"].values.T, [s.losses for s in ref], rtol=1e-6)
    ratio = spread.ratios["act_rms"]
    want = [max(s.act_rms) / min(s.act_rms) for s in ref]
    np.testing.assert_allclose(ratio.ratio[ratio.layers.index("0")], want, rtol=1e-5)
    # A single-process run has no Ranks section.
    single = tmp_path / "single"
    model = script.make_model()
    with stabscope.Recorder(model, single) as rec:
        script.train_loop(model, script.make_optimizer(model), rec, 2, rank=0)
    assert "ranks" not in [s.id for s in build_report([single], tmp_path / "1.html").sections]


def test_fsdp_merged_statistics_equal_ddps_on_the_sample_gpt(tmp_path):
    """The same GPT training under DDP (replicated parameters) and FSDP2 (sharded), full
    preset: every merged number of the sharded run equals the replicated run's."""
    torchrun(tmp_path, script="gpt_ddp_fsdp.py")
    runs = {m: tmp_path / m for m in ("ddp", "fsdp")}
    assert [stabscope.read_meta(r)["distributed"]["sharded"] for r in runs.values()] == [
        False,
        True,
    ]
    keys = ["step", "phase", "module", "call", "metric", "index"]
    ddp, fsdp = (
        stabscope.load_run(r, merge_ranks=True).sort_values(keys, ignore_index=True)
        for r in runs.values()
    )
    assert len(ddp) == len(fsdp) > 1000
    assert {"adam_sqrtv_over_eps", "param_mean", "update_ratio", "attn_entropy"} <= set(
        ddp.metric.astype(str)
    )
    for key in keys:
        assert (ddp[key].astype(str) == fsdp[key].astype(str)).all(), key
    np.testing.assert_allclose(fsdp.value, ddp.value, rtol=1e-4, atol=1e-6)
    # The report's grids too: per-layer parameter aggregates and every heatmap.
    ddp, fsdp = (
        collect(open_run(r, m), census_of(open_run(r, m)), Budget()) for m, r in runs.items()
    )
    assert {"param_norm", "update_ratio", "adam_sqrtv_over_eps"} <= set(ddp.layer_exact)
    for key, (_, want) in ddp.layer_exact.items():
        np.testing.assert_allclose(fsdp.layer_exact[key][1], want, rtol=1e-5)
    assert len(ddp.heat) > 10
    for key, grid in ddp.heat.items():
        np.testing.assert_allclose(fsdp.heat[key].mean, grid.mean, rtol=1e-5, atol=1e-7)


def test_a_rank_that_comes_late_gets_rank_0s_refusal_after_rank_0_has_ended(tmp_path):
    """The store is served by rank 0's process here (``env://`` without torchrun): rank 0
    waits for every rank's acknowledgement before it raises and ends, so rank 1, arriving
    1.5 s later, still reads rank 0's answer."""
    out = tmp_path / "run"
    stabscope.Recorder(torch.nn.Linear(2, 2), out, schedule=Schedule(dense=1, every=0)).close()
    with socket.socket() as s:  # a free port for the store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env |= {"WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tests/dist_scripts/late_rank.py"), str(out)]
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    lines = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], lines
    assert lines[0].startswith("rank 0: RunExistsError: ") and "already holds a run" in lines[0]
    assert lines[1].startswith("rank 1: RunExistsError: rank 0: "), lines[1]


def test_a_process_group_without_a_usable_store_falls_back_to_a_broadcast(tmp_path):
    """torch's fake backend (as MPI's) holds a placeholder store that cannot set a key."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with stabscope.Recorder(torch.nn.Linear(2, 2), tmp_path / "run") as rec:
            rec.step(loss=torch.tensor(1.0))
    finally:
        torch.distributed.destroy_process_group()
    assert (tmp_path / "run" / "meta.json").exists()
