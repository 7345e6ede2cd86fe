"""Each rule on a healthy and a pathological run written through the real store; the CI gate
end to end on the sample GPT; its JUnit, GitHub and JSON outputs; configuration errors."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stabscope.cli import app
from stabscope.errors import StabscopeWarning
from stabscope.rules import RULES_BY_ID, check_run, settings_from_mapping
from stabscope.rules.transformer import deepnorm_alpha
from stabscope.store import PartWriter, new_meta, save_meta
from tests.conftest import SAMPLES
from tests.rule_runs import post_ln_structure

runner = CliRunner()


def write_run(run_dir, rows, structure=None, parameters=None, modules=None):
    """rows: (step, module, metric, index, value) tuples, phase train."""
    meta = new_meta(
        modules=modules or [], parameters=parameters or [], structure=structure, status="complete"
    )
    save_meta(run_dir, meta)
    w = PartWriter(run_dir)
    for step, module, metric, index, value in rows:
        w.append(
            np.array([step]),
            np.array([w.phases("train")]),
            np.array([w.modules(module)]),
            np.array([0]),
            np.array([w.metrics(metric)]),
            np.array([index]),
            np.array([value]),
        )
    w.flush()
    return run_dir


def rules_hit(run_dir, **settings):
    """The findings by rule, but the failure forecast's (always present: tests/test_forecast.py
    tests it on real runs; these synthetic runs test the other rules)."""
    result = check_run(run_dir, settings_from_mapping(settings) if settings else None)
    return {f.rule: f for f in result.findings if f.rule != "failure-forecast"}, result.skipped


def test_attention_logit_growth_thresholds(tmp_path):
    base = [(s, "blocks.0.attn", "attn_logit_max", h, 5.0 + s) for s in range(5) for h in range(2)]
    healthy, _ = rules_hit(write_run(tmp_path / "ok", base))
    assert "attention-logit-growth" not in healthy
    warn, _ = rules_hit(
        write_run(tmp_path / "warn", [*base, (9, "blocks.0.attn", "attn_logit_max", 1, 2e3)])
    )
    assert warn["attention-logit-growth"].severity == "warning"
    err, _ = rules_hit(
        write_run(tmp_path / "err", [*base, (9, "blocks.0.attn", "attn_logit_max", 1, 2e4)])
    )
    f = err["attention-logit-growth"]
    assert (f.severity, f.step, f.value, f.threshold) == ("error", 9, 2e4, 1e4)


def test_rank_collapse_and_entropy_collapse(tmp_path):
    healthy = [(s, f"blocks.{i}", "token_corr", -1, 0.3) for s in range(3) for i in range(4)]
    healthy += [(s, "blocks.0.attn", "attn_entropy", 0, 0.8) for s in range(3)]
    found, _ = rules_hit(write_run(tmp_path / "ok", healthy))
    assert not found
    sick = [
        (s, f"blocks.{i}", "token_corr", -1, 0.3 if i < 2 else 0.995)
        for s in range(3)
        for i in range(4)
    ]
    sick += [(s, "blocks.0.attn", "attn_entropy", 0, 0.8 - 0.35 * s) for s in range(3)]
    found, _ = rules_hit(write_run(tmp_path / "sick", sick))
    # Collapsed from the first recorded step: a risk at init (deep Post-LN models that start
    # there can train), a warning that the failure forecast weighs with other signals.
    assert found["rank-collapse"].severity == "warning" and found["rank-collapse"].step == 0
    assert "risk at init" in found["rank-collapse"].message
    # 0.8 -> 0.1: below a quarter of its starting value.
    assert found["attention-entropy-collapse"].value == pytest.approx(0.1, abs=1e-6)


def test_rank_collapse_during_training_must_persist(tmp_path):
    # Healthy runs at a high learning rate sit near 1 for a few steps, then recover.
    def run(name, values):
        return write_run(tmp_path / name, [(s, "blocks.3", "token_corr", -1, v) for s, v in values])

    transient = [(0, 0.7), (3, 0.995), (9, 0.997)]
    assert rules_hit(run("t", transient))[0]["rank-collapse"].severity == "warning"
    recovered = [*transient, (12, 0.1)]
    assert "rank-collapse" not in rules_hit(run("r", recovered))[0]
    lasting = [*transient, (60, 0.998)]
    f = rules_hit(run("l", lasting))[0]["rank-collapse"]
    assert (f.severity, f.step) == ("error", 60) and "since step 3" in f.message
    # Collapsed from the start and never apart since: a risk at init while it is young, an
    # error once it has lasted as a collapse that appeared must (a Post-LN decoder with its
    # branches x4 sat at 0.999 from step 0 to its end, its loss stuck near chance).
    young = [(0, 0.995), (3, 0.997), (9, 0.997)]
    f = rules_hit(run("y", young))[0]["rank-collapse"]
    assert (f.severity, f.step) == ("warning", 0) and "risk at init" in f.message
    never_apart = [*young, (60, 0.998)]
    f = rules_hit(run("n", never_apart))[0]["rank-collapse"]
    assert (f.severity, f.step) == ("error", 60) and "since step 0" in f.message
    # The remedy follows the blocks: unknown or Post-LN, the placement; all Pre-LN, the lr.
    assert f.remedy.startswith("use Pre-LN")
    for placement, start in (("post", "use Pre-LN"), ("pre", "lower the peak learning rate")):
        rows = [(s, "blocks.3", "token_corr", -1, v) for s, v in lasting]
        structure = post_ln_structure([f"blocks.{i}" for i in range(4)], placement)
        run_dir = write_run(tmp_path / placement, rows, structure=structure)
        assert rules_hit(run_dir)[0]["rank-collapse"].remedy.startswith(start)


def test_rank_collapse_with_a_budget_must_last_half_the_run(tmp_path):
    """A healthy GPT-2 at a high lr sat at 0.99 for its first 100 of 300 steps, then learned:
    with the budget known, a collapse is an error once it has lasted half the planned run."""

    def run(name, last):
        steps = [0, *range(1, last + 1, 25)]
        rows = [(s, "blocks.3", "token_corr", -1, 0.5 if s == 0 else 0.995) for s in steps]
        run_dir = write_run(tmp_path / name, rows)
        meta = json.loads((run_dir / "meta.json").read_text())
        meta["lr_plan"] = {"budget": 300, "source": "constant"}
        (run_dir / "meta.json").write_text(json.dumps(meta))
        return rules_hit(run_dir)[0]["rank-collapse"]

    assert run("third", 101).severity == "warning"  # 100 steps since step 1: a plateau
    lasting = run("half", 176)  # 175 steps: past 150
    assert (lasting.severity, lasting.step) == ("error", 176) and "since step 1" in lasting.message


def test_rank_collapse_is_an_error_only_at_the_output_block(tmp_path):
    """An encoder-decoder whose encoder collapses for good while the decoder, which the head
    reads, keeps its tokens apart trains (measured: Post-LN nn.Transformer on a task the
    decoder learns alone); the same collapse at the last decoder block is the verdict."""
    names = [f"encoder.layers.{i}" for i in range(2)] + [f"decoder.layers.{i}" for i in range(2)]
    modules = [{"name": n, "forward_order": k} for k, n in enumerate(names)]

    def run(name, last_block):
        rows = [(0, n, "token_corr", -1, 0.5) for n in names]
        for s in (5, 60, 120):
            rows += [(s, n, "token_corr", -1, 0.999 if "encoder" in n else 0.05) for n in names]
            rows.append((s, "decoder.layers.1", "token_corr", -1, last_block))
        return write_run(tmp_path / name, rows, modules=modules)

    kept = rules_hit(run("kept", 0.05))[0]["rank-collapse"]
    assert kept.severity == "warning" and kept.module == "encoder.layers.0"
    assert "the output block decoder.layers.1 keeps them apart (0.050)" in kept.message
    lost = rules_hit(run("lost", 0.998))[0]["rank-collapse"]
    assert (lost.severity, lost.module, lost.step) == ("error", "decoder.layers.1", 120)
    assert "since step 5" in lost.message


def test_rank_collapse_of_positions_the_output_does_not_keep_is_a_warning(tmp_path):
    """A lasting collapse at the output block is the verdict where the model's output keeps
    that block's positions (an LM's logits); where the output is pooled (a classifier, a
    Perceiver's latents) no prediction collapses with them: a warning that says so."""
    rows = [(s, "blocks.3", "token_corr", -1, v) for s, v in [(0, 0.7), (3, 0.995), (60, 0.998)]]
    blocks = [f"blocks.{i}" for i in range(4)]

    def run(name, positions):
        structure = {**post_ln_structure(blocks, "pre"), "output_positions": positions}
        return rules_hit(write_run(tmp_path / name, rows, structure=structure))[0]

    assert run("lm", True)["rank-collapse"].severity == "error"
    assert run("unknown", None)["rank-collapse"].severity == "error"  # runs before the field
    pooled = run("pooled", False)["rank-collapse"]
    assert pooled.severity == "warning"
    assert "the model's output keeps none of blocks.3's positions (pooled)" in pooled.message
    assert pooled.remedy.startswith("none for the collapse itself")  # nothing to lower
    assert "the output of 1 block carries" in pooled.message  # a count of blocks, in words


def test_gradient_growth_of_an_encoder_decoder_reads_the_decoder(tmp_path):
    """Both stacks number their layers 0-3; the decoder runs last and feeds the head, so its
    ratio is the one judged (an encoder the task barely uses gets vanishing gradients)."""
    stacks = ("encoder", "decoder")
    modules = [
        {"name": f"{s}.layers.{i}", "layer": i, "depth": 2, "role": None,
         "forward_order": 4 * k + i}
        for k, s in enumerate(stacks) for i in range(4)
    ]  # fmt: skip

    def run(name, ratio):  # per stack: last layer's gradient norm over the first layer's
        rows = [
            (0, f"{s}.layers.{i}.fc.weight", "param_grad_norm", -1, ratio[s] ** (i / 3))
            for s in stacks
            for i in range(4)
        ]
        return write_run(tmp_path / name, rows, modules=modules)

    found = rules_hit(run("enc", {"encoder": 300.0, "decoder": 2.0}))[0]
    assert "gradient-growth" not in found
    f = rules_hit(run("dec", {"encoder": 2.0, "decoder": 300.0}))[0]["gradient-growth"]
    assert f.severity == "error" and f.value == pytest.approx(300.0)


def test_residual_dependency_from_beta(tmp_path):
    def beta(own):  # β rows whose last entry is β_ii
        return [
            (0, f"blocks.{i}.mlp", "res_beta", j, own if j == 1 else 0.3)
            for i in range(4)
            for j in range(2)
        ]

    found, _ = rules_hit(write_run(tmp_path / "pre", beta(0.2)))
    assert "residual-dependency" not in found
    found, _ = rules_hit(write_run(tmp_path / "post", beta(0.6)))
    f = found["residual-dependency"]
    assert (f.value, f.threshold) == (pytest.approx(0.6), 0.4)  # median β_ii, every branch
    assert "in 4 of 4 branches" in f.message


def test_deepnorm_constants(tmp_path):
    assert deepnorm_alpha(0, 18)[""] == pytest.approx(6**0.5)  # (2·18)^(1/4) = sqrt(6)
    enc_dec = deepnorm_alpha(6, 6)
    assert enc_dec["encoder"] == pytest.approx(0.81 * (6**5) ** (1 / 16))
    assert enc_dec["decoder"] == pytest.approx(18**0.25)

    def structure(alpha):
        return {
            "recognised": True,
            "blocks": [
                {"name": f"blocks.{i}", "stack": "", "placement": "deepnorm", "alpha": alpha}
                for i in range(8)
            ],
        }

    rows = [(0, "__run__", "loss", -1, 1.0)]
    good, _ = rules_hit(write_run(tmp_path / "good", rows, structure(2.0)))  # (2·8)^(1/4) = 2
    assert "deepnorm-constants" not in good
    bad, _ = rules_hit(write_run(tmp_path / "bad", rows, structure(1.5)))
    assert bad["deepnorm-constants"].threshold == pytest.approx(2.0)


def test_health_rules(tmp_path):
    params = [{"name": "w", "shape": [4, 4]}, {"name": "b", "shape": [4]}]
    rows = [(s, "__run__", "loss", -1, 3.0 - 0.01 * s) for s in range(30)]
    rows += [(s, "w", "update_ratio", -1, 1e-3) for s in range(3)]
    rows += [(s, "b", "update_ratio", -1, float("inf")) for s in range(3)]  # zero-init bias
    rows += [(2, "w", "adam_sqrtv_over_eps", -1, 1e4), (2, "<root>", "logit_max", -1, 12.0)]
    rows += [(s, "0", "act_nonfinite", -1, 0.0) for s in range(3)]
    found, skipped = rules_hit(write_run(tmp_path / "ok", rows, parameters=params))
    assert not found and "attention-logit-growth" in skipped
    rows += [
        (30, "__run__", "loss", -1, 12.0),
        (3, "w", "update_ratio", -1, 0.5),
        (3, "w", "adam_sqrtv_over_eps", -1, 2.0),
        (3, "<root>", "logit_min", -1, -5e3),
        (3, "0", "act_nonfinite", -1, 1.0),
    ]
    found, _ = rules_hit(write_run(tmp_path / "sick", rows, parameters=params))
    assert set(found) == {
        "loss-spike",
        "update-ratio",
        "adam-epsilon",
        "output-logit-divergence",
        "nonfinite",
    }
    assert found["nonfinite"].severity == "error" and found["nonfinite"].step == 3
    assert found["loss-spike"].step == 30


def test_settings_errors_and_overrides(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'rank-colapse'"):
        settings_from_mapping({"rank-colapse": {"error": 0.9}})
    with pytest.raises(ValueError, match="valid: severity, error, persist, persist_share, warning"):
        settings_from_mapping({"rank-collapse": {"eror": 0.9}})
    with pytest.raises(ValueError, match="unknown rules"):
        settings_from_mapping({"disable": ["nope"]})
    rows = [(0, f"blocks.{i}", "token_corr", -1, 0.97) for i in range(3)]  # 0.97 at init
    run = write_run(tmp_path / "r", rows)
    assert rules_hit(run)[0]["rank-collapse"].severity == "warning"
    # Past the error threshold at init it is still a risk, a warning; a project that wants it
    # to fail the gate says so.
    lowered = rules_hit(run, **{"rank-collapse": {"error": 0.96}})[0]["rank-collapse"]
    assert lowered.severity == "warning" and lowered.threshold == 0.96
    forced = rules_hit(run, **{"rank-collapse": {"error": 0.96, "severity": "error"}})[0]
    assert forced["rank-collapse"].severity == "error"
    assert "rank-collapse" not in rules_hit(run, disable=["rank-collapse"])[0]
    assert set(RULES_BY_ID) >= {"nonfinite", "rank-collapse", "attention-logit-growth"}


@pytest.mark.slow
def test_gate_fails_deep_post_ln_and_passes_pre_ln(tmp_path):
    runs = {}
    for norm in ("post", "pre"):
        out = tmp_path / norm
        res = runner.invoke(
            app,
            [
                "profile",
                str(SAMPLES / "gpt.py"),
                "--steps",
                "12",
                "-q",
                "--out",
                str(out),
                "--set",
                f"norm={norm}",
                "--set",
                "depth=24",
            ],
        )
        assert res.exit_code == 0, res.output
        runs[norm] = out
    junit = tmp_path / "junit.xml"
    res = runner.invoke(app, ["check", str(runs["post"]), "--junit", str(junit)])
    assert res.exit_code == 1, res.output
    assert "gradient-growth" in res.stderr and "failed" in res.stderr
    suite = ET.parse(junit).getroot()
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["gradient-growth"]  # rank collapse at init is a risk: a warning
    assert int(suite.get("tests")) == len(RULES_BY_ID)
    findings = json.loads((runs["post"] / "findings.json").read_text())
    by_rule = {f["rule"]: f for f in findings}
    # Rule 1 (Xiong et al.): the gradient ratio passes 100x within a few steps; token
    # correlation is 1 from step 0, a warning.
    assert findings[0]["rule"] == "gradient-growth"
    assert (by_rule["rank-collapse"]["severity"], by_rule["rank-collapse"]["step"]) == (
        "warning",
        0,
    )
    growth = by_rule["gradient-growth"]
    assert growth["severity"] == "error" and growth["step"] < 6 and growth["value"] > 100
    assert growth["remedy"].startswith("use Pre-LN or DeepNorm")  # residual blocks found

    res = runner.invoke(app, ["check", str(runs["pre"]), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["failed"] is False

    res = runner.invoke(
        app, ["check", str(runs["post"]), "--format", "github", "--fail-on", "warning"]
    )
    lines = res.stdout.strip().splitlines()
    assert res.exit_code == 1
    assert lines[0].startswith("::error title=stabscope gradient-growth::")
    assert any(
        line.startswith("::warning title=stabscope rank-collapse (blocks.") for line in lines
    )
    assert all(line.startswith(("::error ", "::warning ", "::notice ")) for line in lines)
    # A finding on the run as a whole names no module ("__run__" stays in the JSON).
    forecast = next(line for line in lines if "failure-forecast" in line)
    assert forecast.split("::")[1] == "notice title=stabscope failure-forecast"
    assert by_rule["failure-forecast"]["module"] == "__run__"


def test_check_bad_input(tmp_path):
    res = runner.invoke(app, ["check", str(tmp_path)])
    assert res.exit_code == 2 and res.stderr.startswith("error:")
    res = runner.invoke(app, ["check", str(tmp_path), "--fail-on", "fatal"])
    assert res.exit_code == 2 and "'fatal' is not one of 'error', 'warning', 'info'" in res.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text("[tool.stabscope.rules]\nbogus = 1\n")
    run = write_run(tmp_path / "r", [(0, "__run__", "loss", -1, 1.0)])
    res = runner.invoke(app, ["check", str(run), "--config", str(cfg)])
    assert res.exit_code == 2 and "unknown key 'bogus'" in res.stderr


@pytest.mark.slow
def test_gradient_growth_on_a_deep_plain_mlp(tmp_path):
    """Xiong et al.'s depth profile on the simplest case: a default-init ReLU MLP has
    gradients that vanish toward the input, by a factor the rule reports exactly."""
    from stabscope.analysis.summary import layer_modules, layer_param_grad_trend
    from stabscope.store import read_meta

    out = tmp_path / "mlp"
    res = runner.invoke(
        app,
        [
            "profile",
            str(SAMPLES / "mlp.py"),
            "--steps",
            "2",
            "-q",
            "--out",
            str(out),
            "--set",
            "depth=8",
        ],
    )
    assert res.exit_code == 0, res.output
    found, _ = rules_hit(out)
    trend = layer_param_grad_trend(out, read_meta(out))
    f = found["gradient-growth"]
    assert f.value == pytest.approx(trend.first_to_last) and f.value > 100
    assert f.severity == "error"
    # No residual blocks: the lever is the init, not the norm placement.
    assert "Kaiming" in f.remedy and "Pre-LN" not in f.remedy
    named = {i: n for n, i in layer_modules(read_meta(out)).items()}
    # A Sequential's module "16" is its layer's index already: said once.
    last, first = (
        f"layer {i}" if named[i] == str(i) else f"layer {i}, {named[i]}"
        for i in (trend.layers[-1], trend.layers[0])
    )
    layers = f"the last of {len(trend.layers)} layers ({last})"
    assert layers in f.message and f"the first ({first}" in f.message
    # Raising the thresholds past the measured factor silences it.
    assert (
        "gradient-growth"
        not in rules_hit(
            out, **{"gradient-growth": {"warning": 2 * f.value, "error": 4 * f.value}}
        )[0]
    )


def test_model_update_blow_up_then_stall(tmp_path):
    # Shapes measured on the 24-layer sample with the full preset: Post-LN jumps to 1.32 in
    # one step and adds 0.26 by step 55; Pre-LN 1.03 then +0.83; DeepNorm 0.25 then +1.6.
    def series(first, last):
        return [
            (s, "__run__", "model_update_rel", -1, first + (last - first) * s / 55)
            for s in (0, 5, 55)
        ]

    post, _ = rules_hit(write_run(tmp_path / "post", series(1.32, 1.57)))
    f = post["model-update"]
    assert (f.value, f.step, f.severity) == (pytest.approx(1.32), 0, "warning")
    assert "model-update" not in rules_hit(write_run(tmp_path / "pre", series(1.03, 1.86)))[0]
    assert "model-update" not in rules_hit(write_run(tmp_path / "dn", series(0.25, 1.88)))[0]


def test_rules_limited_to_early_steps(tmp_path):
    rows = [(s, "blocks.0.attn", "attn_logit_max", 0, 5.0) for s in range(10)]
    rows.append((12, "blocks.0.attn", "attn_logit_max", 0, 5e4))
    run = write_run(tmp_path / "r", rows)
    assert check_run(run).findings[0].step == 12
    assert check_run(run, until=10).findings == []  # the verdict from steps 0..9 only


def test_norm_input_growth_with_gradient_collapse_below(tmp_path):
    """DeepNet's Post-LN mechanism: norm inputs grow while gradients below collapse. Four
    layers, one weight and one post-norm each; the collapse factor is exact by construction."""
    modules = [{"name": f"blocks.{i}", "layer": i, "role": "block", "depth": 1} for i in range(4)]
    structure = {
        "blocks": [
            {
                "name": f"blocks.{i}",
                "placement": "post",
                "branches": [{"norm": f"blocks.{i}.ln", "placement": "post"}],
            }
            for i in range(4)
        ]
    }

    def run(name, grad_bottom, growth):
        rows = []
        for step, g0, grow in ((0, 1.0, 1.0), (5, grad_bottom, growth)):
            for i in range(4):
                rows.append((step, f"blocks.{i}.w", "param_grad_norm", -1, g0 if i == 0 else 1.0))
                rows.append((step, f"blocks.{i}.ln", "norm_input_rms", -1, 1.2 * grow))
        out = write_run(tmp_path / name, rows, structure=structure)
        meta = json.loads((out / "meta.json").read_text())
        meta["modules"] = modules
        (out / "meta.json").write_text(json.dumps(meta))
        return rules_hit(out)[0]

    f = run("post", 1e-3, 1.5)["norm-input-growth"]
    assert (f.step, f.severity, f.value) == (5, "warning", pytest.approx(1e3))
    assert f"x{1.5**4:.3g} of gradient attenuation" in f.message  # four stream norms compound
    # Pre-LN-like: inputs grow, gradients below stay -> nothing; collapse without growth -> nothing.
    assert "norm-input-growth" not in run("pre", 1.0, 2.0)
    assert "norm-input-growth" not in run("flat", 1e-3, 1.0)


def test_gate_fails_a_failed_or_empty_run_and_warns_on_an_unfinished_one(tmp_path):
    rows = [(s, "__run__", "loss", -1, 3.0) for s in range(3)]

    def run_with(name, status, rows, error=None):
        run = write_run(tmp_path / name, rows)
        meta = json.loads((run / "meta.json").read_text())
        meta.update(status=status, recorded_steps=len(rows), error=error)
        (run / "meta.json").write_text(json.dumps(meta))
        return run

    error = {"type": "RuntimeError", "message": "CUDA out of memory"}
    failed = rules_hit(run_with("failed", "failed", rows, error))[0]["run-status"]
    assert failed.severity == "error" and "RuntimeError: CUDA out of memory" in failed.message
    assert failed.value == 3
    empty = rules_hit(run_with("empty", "complete", []))[0]["run-status"]
    assert (empty.severity, empty.value) == ("error", 0)
    assert "nothing was recorded" in empty.message and "profile at least one step" in empty.remedy
    # Rows written, but its one part damaged since: said as such, not as an empty run.
    damaged = run_with("damaged", "complete", rows)
    meta = json.loads((damaged / "meta.json").read_text())
    (damaged / "meta.json").write_text(json.dumps({**meta, "rows": len(rows)}))
    for part in (damaged / "parts").glob("*.parquet"):
        part.write_bytes(b"not parquet")
    with pytest.warns(StabscopeWarning, match="skipping unreadable part"):
        lost = rules_hit(damaged)[0]["run-status"]
    assert lost.severity == "error"
    assert "meta.json counts 3 rows written, and no part holds a readable one" in lost.message
    assert "restore them from a copy" in lost.remedy
    unfinished = rules_hit(run_with("running", "running", rows))[0]["run-status"]
    assert unfinished.severity == "warning"
    assert "run-status" not in rules_hit(run_with("done", "complete", rows))[0]
    # Through the CLI, the failed run fails the gate.
    res = runner.invoke(app, ["check", str(tmp_path / "failed")])
    assert res.exit_code == 1, res.output


@pytest.mark.slow
def test_gradients_that_vanish_to_exactly_zero_before_the_input_are_an_error(tmp_path):
    """A 64-layer sigmoid stack: each layer scales the backward signal by at most 1/4, and by
    the first layers float32 holds exactly 0 (checked here on a copy of the model). No ratio
    is defined over 0; the limit is infinite growth toward the output."""
    import copy

    from stabscope import Recorder, Schedule

    torch.manual_seed(0)
    layers = [m for _ in range(64) for m in (torch.nn.Linear(16, 16), torch.nn.Sigmoid())]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 4))
    x, y = torch.randn(64, 16), torch.randint(4, (64,))
    probe = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(probe(x), y).backward()
    assert probe[0].weight.grad.abs().max().item() == 0.0
    assert probe[-1].weight.grad.abs().max().item() > 0.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Recorder(model, tmp_path / "r", schedule=Schedule(dense=2, every=0)) as rec:
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    f = rules_hit(tmp_path / "r")[0]["gradient-growth"]
    assert (f.severity, f.step, f.value) == ("error", 0, None)  # no ratio over 0
    assert "(layer 0) is exactly 0 and that of the last" in f.message  # module "0"
    assert "vanish before they reach the input" in f.message and "detach" in f.remedy


def test_a_first_layer_gradient_that_dies_during_training_names_dead_units(tmp_path):
    """A ReLU stack whose middle layer's units are all pushed below 0 after step 1 (its bias
    set to -1e3, as an oversized update does): from then on the layers under it get exactly
    0, where at step 0 they did not (checked on the model itself). That is no decay with
    depth: the finding says a gradient reached the first layer before, and the remedy names
    dead units and the learning rate, not the init."""
    from stabscope import Recorder, Schedule

    torch.manual_seed(0)
    sizes = [(16, 32), (32, 32), (32, 32), (32, 32)]
    layers = [m for i, o in sizes for m in (torch.nn.Linear(i, o), torch.nn.ReLU())]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 4))
    x, y = torch.randn(64, 16), torch.randint(4, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    first_grad = []
    with Recorder(model, tmp_path / "r", schedule=Schedule(dense=4, every=0)) as rec:
        for step in range(4):
            if step == 2:
                with torch.no_grad():
                    model[4].bias.fill_(-1e3)  # every unit of layer 4 below 0 for all x
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            first_grad.append(model[0].weight.grad.abs().max().item())
            opt.step()
            rec.step(loss=loss)
    assert first_grad[0] > 0 and first_grad[2] == first_grad[3] == 0.0
    f = rules_hit(tmp_path / "r")[0]["gradient-growth"]
    assert (f.severity, f.step) == ("error", 2)
    assert "(layer 0) is exactly 0" in f.message
    assert "no gradient passes between them, where one did at step 0" in f.message
    assert "learning rate" in f.remedy and "Kaiming" not in f.remedy
