"""The forecast's trend features on real recorded runs of the sample GPT: each against the
same quantity computed independently from ``load_run``'s rows, and on analytic cases (a head
scaled x1000, a run cut short by ``until``, a run that turns NaN, runs of one and two steps)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import stabscope
from stabscope import Schedule
from stabscope.rules.forecast_features import READS, trend_features
from stabscope.rules.view import RunView
from tests.conftest import record_steps

STEPS = 8
NAN_AT = 5  # the step whose forward first sees a NaN weight


def record(
    run_dir: Path,
    steps=STEPS,
    head_scale=1.0,
    nan_at=None,
    tied=False,
    norm="pre",
    qk_scale=1.0,
    head_bias=True,
    loss_scale=1.0,
) -> Path:
    """The sample GPT (2 Pre-LN blocks, width 16) on its successor task, Adam at 3e-2, every
    step recorded. ``head_scale`` multiplies the output head's weight after init (its bias
    is 0: the logits scale exactly); ``nan_at`` puts a NaN in a weight before that step;
    ``tied`` shares the head's weight with the token embedding; ``norm`` places the norms;
    ``qk_scale`` multiplies every query and key projection (weight and bias): the attention
    logits by its square at step 0; ``loss_scale``: the loss trained on and recorded is the
    mean cross-entropy times this (the batch's token count: a loss summed over tokens)."""
    import gpt as sample

    import stabscope.drivers.script

    cfg = stabscope.drivers.script.ScriptConfig(
        sample.CONFIG | {"depth": 2, "width": 16, "seq_len": 8, "batch_size": 4, "norm": norm}
    )
    torch.manual_seed(0)
    model = sample.model(cfg)
    with torch.no_grad():
        model.head.weight *= head_scale
        for block in model.blocks:
            for proj in (block.attn.q, block.attn.k):
                proj.weight *= qk_scale
                proj.bias *= qk_scale
    if tied:
        model.head.weight = model.tok.weight
    if not head_bias:
        model.head.bias = None
    data = sample.batches(cfg)
    batches = [next(data) for _ in range(steps)]
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    forward = lambda m: sample.loss(m, batches[0])  # noqa: E731
    with stabscope.Recorder(model, run_dir, schedule=Schedule(steps, 0), forward=forward) as rec:
        for step in range(steps):
            if step == nan_at:
                with torch.no_grad():
                    model.blocks[0].mlp.fc.weight[0, 0] = math.nan
            loss = sample.loss(model, batches[step]) * loss_scale
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("forecast")
    return {
        "plain": record(root / "plain"),
        "scaled": record(root / "scaled", steps=2, head_scale=1000.0),
        "nan": record(root / "nan", nan_at=NAN_AT),
        "short": record(root / "short", steps=5),
        "post": record(root / "post", norm="post"),
        "small_qk": record(root / "small_qk", qk_scale=0.03),
        "summed": record(root / "summed", steps=3, loss_scale=4 * 8),  # (batch, seq) = (4, 8)
    }


def features(run: Path, until: int | None = None) -> dict[str, stabscope.rules.trends.Feature]:
    view = RunView.open(run, until)
    view.plan(READS)
    found = trend_features(view)
    assert view.scan.passes == 1  # READS covers every read
    return found


# --- independent references from load_run's rows ----------------------------------------


def rows(run: Path, metric: str, until: int | None) -> pd.DataFrame:
    df = stabscope.load_run(run, metrics=metric, phase="train")
    df = df[df.step < until] if until is not None else df
    return df.assign(module=df.module.astype(str))


def log_ratio(per_step: pd.DataFrame, floor: float = 0.0) -> pd.Series:
    """Per module: log10(value at its last step / max(value at its first, floor)), from
    (module, step) rows."""
    wide = per_step.pivot(index="step", columns="module", values="value").sort_index()
    return np.log10(wide.ffill().iloc[-1] / wide.bfill().iloc[0].clip(lower=floor))


def reference(run: Path, until: int | None) -> dict[str, float]:
    meta = stabscope.read_meta(run)
    ref = {}
    z = rows(run, "logit_*", until)
    z0 = z[z.step == 0].set_index("metric").value
    ref["init_logit_scale"] = math.log10(z0["logit_max"] - z0["logit_min"])
    loss = rows(run, "loss", until).sort_values("step").value.to_numpy(float)
    ln_v = math.log(32)  # the sample's vocabulary
    ref["init_loss_ratio"] = math.log10(loss[0] / ln_v)
    att = rows(run, "attn_logit_max", until).groupby(["module", "step"]).value.max()
    ref["attn_logit_growth"] = log_ratio(att.reset_index(), floor=1.0).max()
    ent = rows(run, "attn_entropy", until)
    ent = ent.assign(module=ent.module + "/" + ent["index"].astype(str))
    ref["entropy_drop"] = (-log_ratio(ent)).max()
    g = rows(run, "param_grad_norm", until)
    total = g.groupby("step").value.apply(lambda v: np.sqrt((v.astype(float) ** 2).sum()))
    ref["grad_norm_trend"] = math.log10(total.iloc[-1] / total.iloc[0])
    blocks = [b["name"] for b in meta["structure"]["blocks"]]
    norms = meta["structure"]["norms"]
    act = rows(run, "act_rms", until)
    stream = pd.concat([act[act.module.isin(blocks)], rows(run, "norm_input_rms", until)])
    assert set(stream.module) == {*blocks, *norms}
    ref["residual_growth"] = log_ratio(stream[["module", "step", "value"]]).max()
    matrices = [p["name"] for p in meta["parameters"] if len(p["shape"]) >= 2]
    u = rows(run, "update_ratio", until)
    median = u[u.module.isin(matrices)].groupby("step").value.median()
    ref["update_ratio_level"] = math.log10(median.iloc[-1])
    ref["update_ratio_trend"] = math.log10(median.iloc[-1] / median.iloc[0])
    tail = loss[-math.ceil(0.2 * len(loss)) :].mean()
    ref["loss_stall"] = tail / loss[0]
    ref["loss_level"] = tail / ln_v
    return ref


@pytest.mark.slow
@pytest.mark.parametrize(("run", "until"), [("plain", None), ("plain", 6), ("plain", 2),
                                            ("post", None)])  # fmt: skip
def test_features_equal_an_independent_computation(runs, run, until):
    got = features(runs[run], until)
    want = reference(runs[run], until)
    assert set(got) == set(want)
    for name, w in want.items():
        f = got[name]
        assert np.isfinite(f.value), f
        assert f.value == pytest.approx(w, rel=1e-5, abs=1e-6), (name, f.evidence)
        last = (until or STEPS) - 1
        assert f.step in (0, last), f  # the step at init, or the window's last
        assert f.evidence


def test_post_ln_residual_stream_is_read_at_the_norms(runs):
    """Post-LN blocks end in a LayerNorm: their outputs keep unit rms, and the stream's
    growth shows only at the norms' inputs."""
    found = features(runs["post"])["residual_growth"]
    act = rows(runs["post"], "act_rms", None)
    outputs = log_ratio(act[act.module.isin(["blocks.0", "blocks.1"])])
    assert found.value > outputs.max() + 0.05
    assert ".ln" in found.evidence


def test_a_head_scaled_x1000_has_logits_three_decades_larger(runs):
    plain, scaled = features(runs["plain"]), features(runs["scaled"])
    gap = scaled["init_logit_scale"].value - plain["init_logit_scale"].value
    assert gap == pytest.approx(3.0, abs=1e-3)  # logits = W h + 0: exactly x1000 at step 0
    # A uniform prediction has loss ln V: ratio 1 (0 in log10); the scaled head's is 1e2+.
    assert abs(plain["init_loss_ratio"].value) < 0.2
    assert scaled["init_loss_ratio"].value > 2
    assert "V = 32, head" in scaled["init_loss_ratio"].evidence


def test_a_loss_summed_over_tokens_is_not_read_against_ln_v(runs):
    """A token's cross-entropy is at most the logits' span + ln V: a first loss over twice
    that is no mean cross-entropy (here the sum over 32 tokens), and a ratio to ln V would
    read it as a bad init. The head x1000 run's loss is a mean and keeps its ratio."""
    found = features(runs["summed"])
    for name in ("init_loss_ratio", "loss_level"):
        assert math.isnan(found[name].value), found[name]
        assert "not a mean cross-entropy" in found[name].evidence
    z = rows(runs["summed"], "logit_*", None)
    z0 = z[z.step == 0].set_index("metric").value
    bound = z0["logit_max"] - z0["logit_min"] + math.log(32)
    loss0 = rows(runs["summed"], "loss", None).sort_values("step").value.iloc[0]
    assert loss0 > 2 * bound and loss0 / 32 < bound  # summed: over it; per token: under it
    assert f"({bound:.3g}: the logits' span + ln V)" in found["init_loss_ratio"].evidence
    assert features(runs["plain"])["loss_level"].value == pytest.approx(
        reference(runs["plain"], None)["loss_level"], rel=1e-5
    )
    scaled = rows(runs["scaled"], "logit_*", None)
    assert np.isfinite(features(runs["scaled"])["init_loss_ratio"].value)
    assert scaled.value.abs().max() > 100  # its logits are wide: a large mean loss fits


def test_attention_logits_below_one_nat_grow_from_one(runs):
    """Logits that start near 0 (queries and keys x0.03: logits x1e-3) and rise to a few nats
    grow from 1, not from their start: a softmax barely feels logits below 1."""
    att = rows(runs["small_qk"], "attn_logit_max", None).groupby(["module", "step"]).value.max()
    wide = att.unstack("module").sort_index()
    first, last = wide.iloc[0], wide.iloc[-1]
    assert (first < 0.05).all()  # the floor is what the growth is measured from
    found = features(runs["small_qk"])["attn_logit_growth"]
    assert found.value == pytest.approx(np.log10(last / 1.0).max(), rel=1e-6)
    assert np.log10(last / first).max() > found.value + 1  # unfloored: over a decade more
    assert "from 1 if below" in found.evidence


def test_until_sees_what_a_run_of_those_steps_sees(runs):
    """The first 5 steps of the 12-step run, through ``until``, give the features of the run
    that stopped after 5 steps (same seed, same batches: the same numbers)."""
    cut, short = features(runs["plain"], until=5), features(runs["short"])
    for name, f in short.items():
        assert cut[name].value == pytest.approx(f.value, rel=1e-6), name
        assert cut[name].step == f.step and f.step in (0, 4)
    whole = features(runs["plain"])
    assert whole["loss_stall"].value != pytest.approx(short["loss_stall"].value, rel=1e-3)


def test_a_nan_run_gives_inf_with_its_first_nonfinite_step(runs):
    after = features(runs["nan"])
    assert after["loss_stall"].value == math.inf
    assert after["loss_stall"].step == NAN_AT
    assert "nan" in after["loss_stall"].evidence
    assert after["loss_level"].value == math.inf
    for name in ("attn_logit_growth", "entropy_drop", "grad_norm_trend", "residual_growth"):
        assert after[name].value == math.inf, after[name]
        assert after[name].step == NAN_AT, after[name]
    # The init features see step 0 only: still finite, the same as the plain run's.
    plain = features(runs["plain"])
    for name in ("init_logit_scale", "init_loss_ratio"):
        assert after[name].value == pytest.approx(plain[name].value, rel=1e-6)
    # Before the NaN, the run is the plain one.
    before, plain = features(runs["nan"], until=NAN_AT), features(runs["plain"], until=NAN_AT)
    for name, f in before.items():
        assert f.value == pytest.approx(plain[name].value, rel=1e-6), name


def test_one_step_has_levels_but_no_trends(runs):
    one = features(runs["plain"], until=1)
    for name in ("init_logit_scale", "init_loss_ratio", "update_ratio_level", "loss_level"):
        assert np.isfinite(one[name].value), one[name]
    for name in ("attn_logit_growth", "entropy_drop", "grad_norm_trend", "residual_growth",
                 "update_ratio_trend", "loss_stall"):  # fmt: skip
        assert math.isnan(one[name].value), one[name]
        assert one[name].step is None and one[name].evidence
    empty = features(runs["plain"], until=0)
    assert all(math.isnan(f.value) for f in empty.values())


@pytest.mark.slow
@pytest.mark.parametrize("head_bias", [True, False])
def test_a_tied_head_reads_its_classes_from_its_bias_or_the_embedding(tmp_path, head_bias):
    """The head's weight is the embedding's (listed once, as ``tok.weight``): V comes from
    the head's bias, or without one from the one embedding weight of the head's size, and
    agrees with the logits (their bounds on ln V hold); the loss features read against it."""
    run = record(tmp_path / "tied", steps=3, tied=True, head_bias=head_bias)
    found = features(run)
    loss = rows(run, "loss", None).sort_values("step").value
    assert found["init_loss_ratio"].value == pytest.approx(
        math.log10(loss.iloc[0] / math.log(32)), abs=1e-6
    )
    where = "head, tied" if head_bias else "head, tied to tok.weight"
    assert f"V = 32, {where}" in found["init_loss_ratio"].evidence
    assert np.isfinite(found["loss_level"].value)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["Linear", "Conv1D"])
def test_features_of_a_model_without_attention_or_residual_blocks(tmp_path, head):
    """A plain MLP classifier: no attention (NaN), no residual blocks (every module's
    output, from rms 1 where it starts below), V = 5 from its last layer: a Linear, or HF's
    Conv1D, whose weight is (in, out)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    last = torch.nn.Linear(16, 5) if head == "Linear" else Conv1D(5, 16)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), last)
    x, y = torch.randn(32, 6), torch.randint(5, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    fwd = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    record_steps(model, tmp_path / "mlp", fwd, opt, 4, schedule=Schedule(4, 0))
    found = features(tmp_path / "mlp")
    assert math.isnan(found["attn_logit_growth"].value)
    assert math.isnan(found["entropy_drop"].value)
    act = rows(tmp_path / "mlp", "act_rms", None)
    assert found["residual_growth"].value == pytest.approx(
        log_ratio(act[act.module != "<root>"], floor=1.0).max(), rel=1e-5
    )
    assert "no residual blocks" in found["residual_growth"].evidence
    losses = rows(tmp_path / "mlp", "loss", None).sort_values("step").value
    assert found["init_loss_ratio"].value == pytest.approx(
        math.log10(losses.iloc[0] / math.log(5)), abs=1e-6
    )
    assert "V = 5, 2" in found["init_loss_ratio"].evidence


@pytest.mark.slow
def test_reading_the_features_does_not_import_torch(runs):
    import subprocess
    import sys

    code = (
        "import sys; from stabscope.rules.forecast_features import trend_features; "
        "from stabscope.rules.view import RunView; "
        f"f = trend_features(RunView.open({str(runs['plain'])!r})); "
        "assert len(f) == 10; sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_grid_auc_counts_pairs_ties_and_inf():
    """AUC = P(failed > healthy), ties one half (the Mann-Whitney U over n_f x n_h pairs);
    +inf ranks above every finite value, NaN is left out."""
    from bench.grid.features import auc

    assert auc([3.0, 4.0], [1.0, 2.0]) == (1.0, 2, 2)
    assert auc([1.0, 2.0], [3.0, 4.0])[0] == 0.0
    assert auc([1.0, 1.0], [1.0])[0] == 0.5
    # pairs: (inf > 2), (inf > 5), (3 > 2), (3 < 5): 3 of 4; the NaN runs drop out
    assert auc([math.inf, 3.0, math.nan], [2.0, 5.0, math.nan]) == (0.75, 2, 2)
    assert math.isnan(auc([math.nan], [1.0])[0])


@pytest.mark.slow
def test_a_roberta_head_tied_with_its_bias_beside_it_reads_the_word_embedding(tmp_path):
    """HF RoBERTa's masked-LM head ties its decoder to the word embeddings and lists its bias
    as ``lm_head.bias``. With 128 tokens, width 64 and 130 positions, the head's count
    (128·64 + 128) equals the position table's (130·64): V is the word embedding's, 128,
    which the logits' bounds confirm (the feature is defined only where they hold)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.RobertaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.RobertaForMaskedLM(config)
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight
    assert 128 * 64 + 128 == 130 * 64  # the coincidence
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 16), generator=g)
    labels = torch.where(torch.rand(4, 16, generator=g) < 0.3, ids, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    forward = lambda m: m(input_ids=ids, labels=labels).loss  # noqa: E731
    run = record_steps(model, tmp_path / "roberta", forward, opt, 3, schedule=Schedule(3, 0))
    found = features(run)["init_loss_ratio"]
    first = rows(run, "loss", None).sort_values("step").value.iloc[0]
    assert found.value == pytest.approx(math.log10(first / math.log(128)), abs=1e-6)
    assert "V = 128, lm_head.decoder, tied to roberta.embeddings.word_embeddings" in (
        found.evidence
    )


@pytest.mark.slow
def test_a_regressions_output_scale_is_no_logit_signal(tmp_path):
    """A regression's outputs are values in its targets' units: targets near 1000 make
    outputs near 1000 that match them. The forecast's init signal (fitted on logits) does not
    read them, and output-logit-divergence does not judge them; the same head under a
    cross-entropy is read (the span the test reads from the model's own output)."""
    from stabscope.rules import check_run

    spans = {}
    for kind in ("mse", "ce", "triplet"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        with torch.no_grad():
            net[2].weight.mul_(10000.0)  # outputs in the thousands
        x, y = torch.randn(32, 4), 3000.0 * torch.randn(32, 3)
        opt = torch.optim.SGD(net.parameters(), lr=1e-6)
        config = stabscope.RecorderConfig(schedule=Schedule(4, 0), online_rules=False)
        with stabscope.Recorder(net, tmp_path / kind, config) as rec:
            for _ in range(4):
                out = net(x)
                spans.setdefault(kind, []).append(float(out.detach().max() - out.detach().min()))
                if kind == "triplet":  # embeddings a margin loss compares: no logits
                    loss = F.triplet_margin_loss(out[:10], out[10:20], out[20:30])
                else:
                    loss = (
                        F.mse_loss(out, y) if kind == "mse" else F.cross_entropy(out, y.argmax(1))
                    )
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(loss)
    found = features(tmp_path / "mse")["init_logit_scale"]
    assert math.isnan(found.value) and "targets' units" in found.evidence
    read = features(tmp_path / "ce")["init_logit_scale"]
    assert read.value == pytest.approx(math.log10(spans["ce"][read.step]), rel=1e-5)
    rules = {kind: {f.rule for f in check_run(tmp_path / kind).findings} for kind in spans}
    assert "output-logit-divergence" in rules["ce"]
    assert "output-logit-divergence" not in rules["mse"]
    said = {
        kind: next(
            f for f in check_run(tmp_path / kind).findings if f.rule == "output-logit-divergence"
        )
        for kind in ("ce", "triplet")
    }
    assert said["ce"].message.startswith("output logit") and "z-loss" in said["ce"].remedy
    # Outputs a triplet loss compares are no logits: no z-loss for them.
    assert (
        said["triplet"].message.startswith("output value")
        and "z-loss" not in said["triplet"].remedy
    )
