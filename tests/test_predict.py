"""``stabscope predict`` through the CLI, the prediction stored by ``profile``, rule
prediction-mismatch, and the report's overlay."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from stabscope.cli import app
from stabscope.drivers.describe_model import NotCovered, describe
from stabscope.drivers.profile import profile_script
from stabscope.drivers.script import load_script, parse_set
from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from stabscope.store import read_meta
from stabscope.structure import discover
from stabscope.theory import predict

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_predict_description_json_and_out(tmp_path):
    out = tmp_path / "p.json"
    res = invoke("predict", "--depth", "5", "--width", "64", "--norm", "post", "--seq", "16",
                 "--json", "--out", str(out))  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert json.loads(out.read_text()) == data
    assert data["format"] == "stabscope-prediction" and len(data["layers"]) == 5
    # Post-LN: every block ends in a LayerNorm of unit gain, so its output rms is exactly 1.
    assert all(layer["act_rms"] == pytest.approx(1.0) for layer in data["layers"])
    assert data["layers"][-1]["grad_rms_rel"] == pytest.approx(1.0)
    # Uniform causal attention only averages tokens: correlation rises with depth.
    corr = [layer["token_corr"] for layer in data["layers"]]
    assert corr == sorted(corr) and corr[0] > 0


def test_predict_table_and_verdict_for_deep_post_ln():
    res = invoke("predict", "--depth", "96", "--width", "512", "--norm", "post", "--seq", "32")
    assert res.exit_code == 0, res.output
    assert "predicted at init" in res.output and "verdict: error" in res.output
    assert "rank collapse" in res.output


def test_predict_script_reads_the_built_model():
    res = invoke("predict", "sample_models/gpt.py", "--set", "depth=3", "--set", "norm=deepnorm",
                 "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [layer["module"] for layer in data["layers"]] == ["blocks.0", "blocks.1", "blocks.2"]
    # DeepNet's α for 3 layers, read off the detected residual adds.
    assert data["description"]["alpha"] == pytest.approx(6**0.25, rel=1e-4)
    # The first block's input is tok + pos embeddings, each N(0, 1): second moment 2.
    assert data["input"]["second_moment"] == pytest.approx(2.0, rel=0.1)
    assert data["input"]["source"] == "measured on the first batch"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--depth", "4", "--width", "64", "--norm", "side"], "unknown norm"),
        (["--depth", "0", "--width", "64"], "depth must be"),
        (["--depth", "4", "--width", "64", "--heads", "5"], "divisible"),
        (["sample_models/gpt.py", "--depth", "4"], "not both"),
        ([], "nothing to predict"),
        (["--depth", "4", "--width", "64", "--set", "depth=3"], "--set needs"),
        (["sample_models/mlp.py"], "does not cover"),
        (["--depth", "2", "--width", "8", "--out", "/nonexistent/dir/p.json"], "cannot write"),
    ],
)
def test_predict_bad_input_exits_2(args, message):
    res = invoke("predict", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "hint:" in res.output


def _profile(tmp_path, name, sets):
    script = load_script("sample_models/gpt.py" if name != "mlp" else "sample_models/mlp.py",
                         parse_set(sets))  # fmt: skip
    return profile_script(script, tmp_path / name, 2, RecorderConfig(), device="cpu").run_dir


def test_profile_stores_prediction_or_a_note(tmp_path):
    run = _profile(tmp_path, "gpt", ["depth=3"])
    stored = json.loads((run / "prediction.json").read_text())
    assert [layer["module"] for layer in stored["layers"]] == ["blocks.0", "blocks.1", "blocks.2"]
    mlp = _profile(tmp_path, "mlp", [])
    assert not (mlp / "prediction.json").exists()
    assert any(n.startswith("no theory prediction") for n in read_meta(mlp)["notes"])


@pytest.mark.slow
def test_prediction_mismatch_fires_on_another_init_and_not_on_its_own(tmp_path):
    run = _profile(tmp_path, "gpt", ["depth=4"])
    own = check_run(run)
    assert "prediction-mismatch" not in {f.rule for f in own.findings}
    # A prediction for another init (weights 3x xavier's) than the model was built with.
    other = ["--init", "normal", "--init-std", "0.375", "--out", str(run / "prediction.json")]
    res = invoke("predict", "--depth", "4", "--width", "64", "--seq", "32", "--input-var", "2",
                 *other)  # fmt: skip
    assert res.exit_code == 0, res.output
    found = [f for f in check_run(run).findings if f.rule == "prediction-mismatch"]
    assert len(found) == 1 and found[0].severity == "warning"
    assert found[0].metric == "act_rms2" and found[0].value < found[0].threshold
    assert "Kedia" in found[0].citation and found[0].remedy


def test_a_prediction_that_overflowed_reads_back_as_nan_and_judges_nothing(tmp_path):
    """A prediction of a badly initialised model can overflow: its NaNs are written as JSON
    null, read back as NaN, and the rule compares nothing rather than raising."""
    run = _profile(tmp_path, "gpt", ["depth=3"])
    path = run / "prediction.json"
    stored = json.loads(path.read_text())
    for layer in stored["layers"]:
        layer["act_rms"] = layer["grad_rms_rel"] = None
    path.write_text(json.dumps(stored))
    from stabscope.theory.prediction import load_prediction

    layers = load_prediction(path).layers
    assert all(math.isnan(x.act_rms) and math.isnan(x.grad_rms_rel) for x in layers)
    result = check_run(run)
    assert "prediction-mismatch" not in result.failed
    assert "prediction-mismatch" not in {f.rule for f in result.findings}


def test_an_init_that_overflows_the_theory_predicts_nan_without_numpy_warnings():
    """Weights of std 1 at width 64: the attention's e^c overflows float64. The profile
    holds no finite value past that point, and numpy prints nothing into the user's run."""
    import warnings

    from stabscope.theory import ModelDescription

    desc = ModelDescription(depth=4, width=64, init="normal", init_std=1.0, seq=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would raise here
        prediction = predict(desc)
    assert not all(math.isfinite(x.act_rms) for x in prediction.layers)
    sane = predict(ModelDescription(depth=4, width=64, init="normal", init_std=0.02, seq=32))
    assert all(math.isfinite(x.act_rms) for x in sane.layers)


@pytest.mark.slow
def test_report_overlays_the_prediction(tmp_path):
    run = _profile(tmp_path, "gpt", ["depth=2"])
    html = tmp_path / "r.html"
    assert invoke("report", str(run), "-o", str(html)).exit_code == 0
    assert "predicted at init" in html.read_text()
    (run / "prediction.json").unlink()
    assert invoke("report", str(run), "-o", str(html)).exit_code == 0
    assert "predicted at init" not in html.read_text()


@pytest.mark.slow
def test_theory_and_rule_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, stabscope.theory, stabscope.rules.prediction; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_torch_encoder_layers_feed_forward_is_read_from_the_layer(activation):
    """``nn.TransformerEncoderLayer`` runs linear1, its activation function and linear2 in
    its own forward: the MLP branch is named by linear2, and the theory reads both maps and
    the activation (a function, not a module) from the layer."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 2, 48, dropout=0.0, activation=activation, batch_first=True, norm_first=True
    )
    model = nn.Sequential(nn.TransformerEncoder(layer, 3, enable_nested_tensor=False))
    x = torch.randn(4, 8, 16)

    def forward(m):
        return m(x).pow(2).mean()

    d = describe(model, discover(model, forward), forward)
    assert (d.depth, d.width, d.heads, d.ffn, d.norm, d.activation) == (
        3, 16, 2, 3.0, "pre", activation,
    )  # fmt: skip
    for roles, built in zip(d.projections, model[0].layers):
        for role, linear in (("fc", built.linear1), ("proj", built.linear2)):
            w = linear.weight.detach().double()
            assert roles[role].std == pytest.approx(float(w.pow(2).mean().sqrt()), rel=1e-12)
            assert roles[role].bias == pytest.approx(
                float(linear.bias.detach().double().pow(2).mean().sqrt()), rel=1e-12
            )


def test_grouped_query_attention_is_named_as_not_covered():
    """A LLaMA with 2 key/value heads for 4 query heads: k and v are narrower than q, which
    the theory does not compose; the reason says so, with the maps' shapes."""
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(conf)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))

    def forward(m):
        return m(input_ids=ids).logits.pow(2).mean()

    with pytest.raises(NotCovered, match=r"grouped- or multi-query.*k_proj 32->16"):
        describe(model, discover(model, forward), forward)


@pytest.mark.slow
def test_a_compiled_model_is_described_as_the_model_it_wraps():
    """``torch.compile`` puts the model under ``_orig_mod``; the structure names its blocks
    without that prefix, and the description (its projections' measured stds, its measured
    input) is the uncompiled model's."""
    script = load_script("sample_models/gpt.py", parse_set(["depth=2"]))
    torch.manual_seed(0)
    model = script.model(script.config)
    batch = next(iter(script.batches(script.config)))

    def forward(m):
        return script.loss(m, batch)

    plain = describe(model, discover(model, forward), forward)
    compiled = torch.compile(model, backend="eager")
    wrapped = describe(compiled, discover(compiled, forward), forward)
    assert predict(wrapped).to_json() == predict(plain).to_json()
    # The measured init is the wrapped model's own weights (blocks.0's MLP output map).
    w = model.blocks[0].mlp.proj.weight.detach().double()
    assert wrapped.projections[0]["proj"].std == pytest.approx(float(w.pow(2).mean().sqrt()))
