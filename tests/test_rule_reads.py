"""The rules' one-pass reads (``RunView``) against the eager reads they replace: one
``load_run(..., phase="train", merge_ranks=...)`` per request, filtered in pandas. Frames must
be identical (rows, order, types), and so must every rule's findings, on a real recorded run
of the sample GPT and on a two-rank sharded run whose ranks name things in different orders."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stabscope.analysis.summary import DepthTrend, layer_modules, layer_param_grad_trends
from stabscope.rules import ALL_RULES, check_run
from stabscope.rules.scan import Read
from stabscope.rules.view import MATRICES, Request, RunView
from stabscope.store import PartWriter, load_run, new_meta, read_meta, save_meta
from tests.conftest import ROOT


class EagerView(RunView):
    """The rules' view as it was: each request read on its own, then filtered in pandas."""

    def has(self, *names: str) -> bool:
        return not self.metrics(*names).empty

    @property
    def ranks(self) -> int:
        return eager_ranks(self.run_dir, self.until)

    def _frame(self, names, step, modules, merge):
        steps = None if self.until is None else slice(0, self.until)
        frame = load_run(
            self.run_dir, metrics=list(names), phase="train", steps=steps, merge_ranks=merge
        )
        for col in ("module", "metric"):
            frame[col] = frame[col].astype(str)
        if modules is not None:
            frame = frame[frame.module.isin(set(modules))]
        if step is not None and not frame.empty:
            frame = frame[frame.step == (frame.step.min() if step == "first" else frame.step.max())]
        return frame.reset_index(drop=True)


def eager_ranks(run: Path, until: int | None) -> int:
    steps = None if until is None else slice(0, until)
    return int(load_run(run, phase="train", steps=steps, columns=["rank"])["rank"].nunique())


def requests_of_every_rule() -> list[Request]:
    extra = [
        Request(("grad_rms", "act_rms")),
        Request(("update_ratio",), step="last"),
        Request(("param_grad_norm", "update_ratio"), modules=MATRICES),
        Request(("attn_entropy", "res_beta"), step="first"),
        Request(("not_recorded",)),
        Request(("loss", "param_norm"), per_rank=True),
    ]
    return [r for rule in ALL_RULES for r in rule.requests] + extra


def assert_reads_equal(run: Path, until: int | None = None) -> RunView:
    """Every rule's requests, merged and per rank, and a few more, against the eager reads;
    the rules' own requests must all come from the first pass."""
    view, eager = RunView.open(run, until), EagerView.open(run, until)
    view.plan(r for rule in ALL_RULES for r in rule.requests)
    for req in [r for rule in ALL_RULES for r in rule.requests]:
        if req.per_rank and view.ranks < 2:
            continue  # rank-desync returns before reading on a run of one rank
        ask = view.per_rank if req.per_rank else view.metrics
        ask(*req.metrics, step=req.step, modules=view.matrices if req.modules else None)
    assert view.scan.passes == 1
    for req in requests_of_every_rule():
        modules = view.matrices if req.modules == MATRICES else None
        for ask in ("metrics", "per_rank"):
            got = getattr(view, ask)(*req.metrics, step=req.step, modules=modules)
            want = getattr(eager, ask)(*req.metrics, step=req.step, modules=modules)
            pd.testing.assert_frame_equal(got, want, obj=f"{ask}{req}")
        assert view.has(*req.metrics) == eager.has(*req.metrics)
    assert view.ranks == eager_ranks(run, until)
    return view


def findings(view: RunView) -> list[dict]:
    """Every rule's findings on ``view`` (as ``run_rules`` runs them), as plain dicts."""
    out = []
    for rule in ALL_RULES:
        if rule.needs and not view.has(*rule.needs):
            out.append({"skipped": rule.id})
            continue
        out += [asdict(f) for f in rule.check(view, dict(rule.defaults))]
    return out


# -- a real run: the sample GPT (Post-LN at a high learning rate, so rules fire) ------------


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    from stabscope.drivers.profile import profile_script
    from stabscope.drivers.script import load_script, parse_set
    from stabscope.record.config import RecorderConfig
    from stabscope.record.schedule import Schedule

    sets = ["norm=post", "depth=3", "lr=1e-2", "seq_len=16", "batch_size=4"]
    script = load_script(ROOT / "sample_models/gpt.py", parse_set(sets))
    # Small parts, so that every step's rows and every scoped read span several parts.
    config = RecorderConfig(preset="full", part_rows=700, schedule=Schedule(dense=6, every=0))
    out = tmp_path_factory.mktemp("gpt") / "run"
    profile_script(script, out, 6, config, seed=0, device="cpu")
    return out


@pytest.mark.slow
def test_every_read_of_every_rule_equals_the_eager_read_on_a_real_run(gpt_run):
    assert len(list((gpt_run / "parts").glob("*.parquet"))) > 6
    view = assert_reads_equal(gpt_run)
    # A read of the first step keeps that step's rows only (a real run's res_beta).
    kept = view.scan.rows[Read("res_beta", "first")]
    assert len(kept) == len(view.metrics("res_beta", step="first")) > 0
    assert set(kept.column("step").tolist()) == {0}
    assert_reads_equal(gpt_run, until=3)


@pytest.mark.slow
def test_findings_equal_the_eager_views_on_a_real_run(gpt_run):
    eager = EagerView.open(gpt_run)
    want = findings(eager)
    assert {f.get("rule") for f in want} >= {"update-ratio", "residual-dependency"}
    assert findings(RunView.open(gpt_run)) == want
    assert [asdict(f) for f in check_run(gpt_run).findings] == sorted_like_check(want)
    early = EagerView.open(gpt_run, until=2)
    assert findings(RunView.open(gpt_run, until=2)) == findings(early)


def sorted_like_check(found: list[dict]) -> list[dict]:
    from stabscope.store.findings import SEVERITIES

    rows = [f for f in found if "rule" in f]
    return sorted(rows, key=lambda f: (SEVERITIES.index(f["severity"]), f["step"] or 0, f["rule"]))


def reference_trends(grads: pd.DataFrame, meta: dict) -> list[tuple]:
    """Per step, the layers' gradient norms and the fit, with plain pandas per step."""
    layers = layer_modules(meta)

    def owner(module: str) -> float:
        name = module.rsplit(".", 1)[0]
        while name and name not in layers:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return layers[name] if name else np.nan

    frame = grads.assign(layer=grads.module.map(owner)).dropna(subset=["layer"])
    sums = frame.assign(sq=frame.value.astype(float) ** 2).groupby(["step", "layer"]).sq.sum()
    out = []
    for step, per_layer in sums.groupby(level="step"):
        x = per_layer.index.get_level_values("layer").to_numpy(float)
        y = np.sqrt(per_layer.to_numpy())
        if len(x) < 2:
            continue
        ok = np.isfinite(y) & (y > 0)
        slope = np.polyfit(x[ok], np.log10(y[ok]), 1)[0] if ok.sum() >= 2 else np.nan
        ratio = float(y[-1] / y[0]) if y[0] > 0 else np.nan
        out.append((int(step), x.astype(int).tolist(), y.tolist(), float(10**slope), ratio))
    return out


@pytest.mark.slow
def test_layer_gradient_trends_equal_plain_pandas_on_a_real_run(gpt_run):
    view = RunView.open(gpt_run)
    grads = view.metrics("param_grad_norm")
    got = layer_param_grad_trends(grads, view.meta)
    want = reference_trends(grads, view.meta)
    assert [(t.step, t.layers, t.values, t.factor_per_layer, t.first_to_last) for t in got] == want
    assert len(got) == 6 and isinstance(got[0], DepthTrend)


# -- a two-rank sharded run, written by two writers that name things in different orders ---


def write_two_ranks(run: Path) -> None:
    rng = np.random.default_rng(0)
    params = [
        {"name": "w.a", "shape": [4, 4], "numel": 16},
        {"name": "w.b", "shape": [4], "numel": 4},
        {"name": "w.c", "shape": [4, 2], "numel": 8},
    ]
    meta = new_meta(modules=[], parameters=params, status="complete")
    meta["world_size"] = 2
    meta["distributed"] = {"world_size": 2, "sharded": True}
    save_meta(run, meta)
    metrics = ["loss", "param_norm", "update_norm", "update_ratio", "act_nonfinite"]
    metrics += ["adam_sqrtv_over_eps", "attn_entropy", "grad_rms"]
    for rank, order in ((0, [0, 1, 2]), (1, [2, 0, 1])):
        w = PartWriter(run, rank=rank, part_rows=40, flush_seconds=1e9)
        if rank == 1:
            w.phases("eval")  # rank 1's phase dictionary starts with eval
            for m in reversed(metrics):
                w.metrics(m)
        for step in range(7):
            rows = [("__run__", "loss", -1)]
            rows += [(params[i]["name"], m, -1) for i in order for m in metrics[1:4]]
            rows += [(params[i]["name"], "adam_sqrtv_over_eps", -1) for i in order]
            rows += [("attn", "attn_entropy", h) for h in range(2)] + [("mlp", "grad_rms", -1)]
            rows += [("mlp", "act_nonfinite", -1)]
            for phase in ("train", "eval") if step % 3 == 0 else ("train",):
                n = len(rows)
                value = rng.lognormal(0, 1, n).astype(np.float32)
                if rank == 1 and step == 4:
                    value[1] = np.nan  # one rank's NaN survives the merge
                w.append(
                    np.full(n, step),
                    np.full(n, w.phases(phase)),
                    np.array([w.modules(r[0]) for r in rows]),
                    np.zeros(n),
                    np.array([w.metrics(r[1]) for r in rows]),
                    np.array([r[2] for r in rows]),
                    value,
                )
        w.flush()


@pytest.mark.slow
def test_two_rank_sharded_reads_equal_the_eager_reads(tmp_path):
    run = tmp_path / "run"
    write_two_ranks(run)
    assert read_meta(run)["distributed"]["sharded"]
    assert len(list((run / "parts").glob("*.parquet"))) >= 6
    view = assert_reads_equal(run)
    assert view.ranks == 2
    # The sharded update ratio is recomputed from the merged norms, which are read for it.
    ratio = view.metrics("update_ratio")
    assert set(ratio.metric) == {"update_ratio"} and len(ratio) == 7 * 3


@pytest.mark.slow
def test_two_rank_reads_of_the_first_steps_equal_the_eager_reads(tmp_path):
    run = tmp_path / "run"
    write_two_ranks(run)
    assert_reads_equal(run, until=4)


@pytest.mark.slow
def test_findings_equal_the_eager_views_on_a_two_rank_run(tmp_path):
    run = tmp_path / "run"
    write_two_ranks(run)
    want = findings(EagerView.open(run))
    assert {f.get("rule") for f in want} >= {"nonfinite", "update-ratio", "rank-desync"}
    assert findings(RunView.open(run)) == want
