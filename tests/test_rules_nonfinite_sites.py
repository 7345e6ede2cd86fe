"""Each rule that misread NaN/Inf data, on a run written through the real store, against
values computed here: no crash, no verdict drawn from a NaN- or Inf-poisoned aggregate, and
the verdict the finite steps support."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stabscope.rules.base import RunView
from stabscope.rules.baseline import compare_to_baseline
from tests.rule_runs import checked, post_ln_structure, write

NAN, INF = math.nan, math.inf
BLOCKS = [f"blocks.{i}" for i in range(4)]
MODULES = [{"name": b, "layer": i, "role": "block", "depth": 1} for i, b in enumerate(BLOCKS)]


def found(run_dir, until=None, **settings):
    return {f.rule: f for f in checked(run_dir, until, **settings).findings}


@pytest.mark.parametrize("poison", ["nan-bottom", "inf-top"])
def test_gradient_growth_skips_a_layer_norm_it_cannot_compute(tmp_path, poison):
    """Layer norm = sqrt(sum of its parameters' squared gradient norms). At step 1 one
    parameter is NaN (bottom) or Inf (top): that layer's norm is undefined, not the norm of
    the rest (1e-4, a 1.4e4x "growth") nor Inf. Step 2 is finite: 200x."""
    rows = []
    for b in BLOCKS:
        rows += [
            (0, f"{b}.w", "param_grad_norm", -1, 1.0),
            (0, f"{b}.b", "param_grad_norm", -1, 1.0),
        ]
    step1 = {f"{b}.{p}": 1.0 for b in BLOCKS for p in "wb"}
    step1["blocks.0.b"] = 1e-4
    step1["blocks.0.w" if poison == "nan-bottom" else "blocks.3.w"] = (
        NAN if poison == "nan-bottom" else INF
    )
    rows += [(1, name, "param_grad_norm", -1, v) for name, v in step1.items()]
    step2 = {f"{b}.{p}": 1.0 for b in BLOCKS for p in "wb"}
    step2 |= {"blocks.0.w": 3e-3, "blocks.0.b": 4e-3, "blocks.3.w": 0.6, "blocks.3.b": 0.8}
    rows += [(2, name, "param_grad_norm", -1, v) for name, v in step2.items()]
    f = found(write(tmp_path / poison, rows, modules=MODULES))["gradient-growth"]
    expected = math.hypot(0.6, 0.8) / math.hypot(3e-3, 4e-3)  # 200
    assert (f.severity, f.step) == ("error", 2)
    assert f.value == pytest.approx(expected, rel=1e-5)


STRUCTURE = post_ln_structure(BLOCKS)


def norm_run(tmp_path, name, steps):
    """steps: (step, bottom layer's gradient norm, norm input rms); other layers' gradient 1."""
    rows = []
    for step, bottom, rms in steps:
        for i, b in enumerate(BLOCKS):
            rows.append((step, f"{b}.w", "param_grad_norm", -1, bottom if i == 0 else 1.0))
            rows.append((step, f"{b}.ln", "norm_input_rms", -1, rms))
    return found(write(tmp_path / name, rows, modules=MODULES, structure=STRUCTURE))


def test_norm_input_growth_on_nan_gradients_and_norm_inputs(tmp_path):
    # Step 5 all NaN: every layer's gradient norm used to sum to 0, then divide by it.
    f = norm_run(tmp_path, "mid", [(0, 1.0, 1.2), (5, NAN, NAN), (10, 1e-3, 1.8)])
    f = f["norm-input-growth"]
    assert (f.step, f.module) == (10, "blocks.0.ln")
    assert f.value == pytest.approx((1.0 / 1e-3) * (1.0 / 1.0), rel=1e-5)
    assert f"grew x{1.8 / 1.2:.3g}" in f.message
    # A first step without a finite input rms: growth since then cannot be measured (it is
    # not growth since the next step).
    late = norm_run(tmp_path, "first", [(0, 1.0, NAN), (5, 1.0, 1.2), (10, 1e-3, 1.8)])
    assert "norm-input-growth" not in late
    # A zero gradient norm (a saturated layer) has no collapse factor either, and no crash.
    zero = norm_run(tmp_path, "zero", [(0, 1.0, 1.2), (5, 0.0, 1.5), (10, 1e-3, 1.8)])
    assert zero["norm-input-growth"].step == 10


def test_output_logit_divergence_reads_finite_logits(tmp_path):
    nan = [(s, "<root>", m, -1, NAN) for s in range(3) for m in ("logit_max", "logit_min")]
    assert "output-logit-divergence" not in found(write(tmp_path / "nan", nan))
    rows = [(s, "<root>", "logit_max", -1, v) for s, v in enumerate([12.0, INF, 1500.0])]
    rows += [(s, "<root>", "logit_min", -1, v) for s, v in enumerate([-5.0, -INF, -2500.0])]
    f = found(write(tmp_path / "inf", rows))["output-logit-divergence"]
    assert (f.step, f.metric, f.value) == (2, "logit_min", 2500.0)


def test_attention_logit_growth_reads_finite_logits(tmp_path):
    attn = "blocks.0.attn"
    nan = [(s, attn, "attn_logit_max", h, NAN) for s in range(3) for h in range(2)]
    assert "attention-logit-growth" not in found(write(tmp_path / "nan", nan))
    rows = [(s, attn, "attn_logit_max", 0, v) for s, v in enumerate([5.0, 2e3, INF])]
    f = found(write(tmp_path / "inf", rows))["attention-logit-growth"]
    assert (f.severity, f.step, f.value) == ("warning", 1, 2e3)
    assert f"x{2e3 / 5.0:.3g} over 1 steps (from 5, the largest at step 0)" in f.message


def test_rank_collapse_that_lasted_until_the_run_went_nan(tmp_path):
    rows = [(0, b, "token_corr", -1, 0.5) for b in BLOCKS]
    rows += [(s, b, "token_corr", -1, 0.995) for s in range(1, 61) for b in BLOCKS]
    rows += [(61, b, "token_corr", -1, NAN) for b in BLOCKS]
    f = found(write(tmp_path / "r", rows))["rank-collapse"]
    # Above 0.99 from step 1 to step 60, the last finite one: 59 >= persist (50) steps.
    assert (f.severity, f.step) == ("error", 60)
    assert f.value == pytest.approx(0.995, rel=1e-6) and "since step 1" in f.message


def test_attention_entropy_collapse_is_dated_at_its_last_finite_step(tmp_path):
    attn = "blocks.0.attn"
    values = [0.9, 0.5, 0.2, 0.1, 0.05, NAN]
    f = found(
        write(tmp_path / "r", [(s, attn, "attn_entropy", 0, v) for s, v in enumerate(values)])
    )
    f = f["attention-entropy-collapse"]
    assert (f.step, f.value) == (4, pytest.approx(0.05))


def test_residual_dependency_never_takes_another_beta_for_a_nan_beta_ii(tmp_path):
    betas = {"b.0": [0.1, 0.9], "b.1": [0.2, 0.8], "b.2": [0.45, NAN]}
    rows = [(0, m, "res_beta", k, v) for m, row in betas.items() for k, v in enumerate(row)]
    f = found(write(tmp_path / "r", rows))["residual-dependency"]
    # Two branches with a finite β_ii (0.9, 0.8); b.2's 0.45 is β_{2,1}, not β_22.
    assert f.value == pytest.approx(np.median([0.9, 0.8]), rel=1e-6)
    assert "in 2 of 2 branches" in f.message


def test_model_update_judged_up_to_the_last_finite_step(tmp_path):
    series = [(0, 1.32), (5, 1.4), (55, 1.57), (60, NAN)]
    rows = [(s, "__run__", "model_update_rel", -1, v) for s, v in series]
    f = found(write(tmp_path / "r", rows))["model-update"]
    assert (f.step, f.value) == (0, pytest.approx(1.32))
    assert f"{1.57 - 1.32:+.3g} more by step 55" in f.message


def test_loss_spike_after_a_nan_first_loss(tmp_path):
    losses = [NAN] + [3.0] * 25 + [12.0]
    rows = [(s, "__run__", "loss", -1, v) for s, v in enumerate(losses)]
    f = found(write(tmp_path / "r", rows))["loss-spike"]
    # The 25 finite losses before it are constant: an infinite z-score, 4x their mean.
    assert (f.step, f.value) == (26, math.inf) and "(4.00x)" in f.message


def test_adam_epsilon_at_the_last_finite_step(tmp_path):
    rows = [(s, "w", "adam_sqrtv_over_eps", -1, 2.0) for s in range(5)]
    rows.append((5, "w", "adam_sqrtv_over_eps", -1, NAN))
    f = found(write(tmp_path / "r", rows, parameters=[{"name": "w", "shape": [4, 4]}]))
    assert (f["adam-epsilon"].step, f["adam-epsilon"].value) == (4, 2.0)


def test_rank_desync_with_a_loss_nan_on_every_rank(tmp_path):
    rows = [(r, s, "__run__", "loss", -1, NAN) for r in (0, 1) for s in range(4)]
    rows += [
        (r, s, "blocks.0", "grad_rms", -1, 0.1 * (3 if r else 1)) for r in (0, 1) for s in range(4)
    ]
    f = found(write(tmp_path / "r", rows))["rank-desync"]
    assert (f.metric, f.value) == ("grad_rms", pytest.approx(3.0, rel=1e-6))


def test_baseline_compares_finite_values_only(tmp_path):
    def run(name, m1_step1, m0_step1):
        rows = [(0, m, "act_rms", -1, 1.0) for m in ("m0", "m1")]
        rows += [(1, "m0", "act_rms", -1, m0_step1), (1, "m1", "act_rms", -1, m1_step1)]
        return RunView.open(write(tmp_path / name, rows))

    findings = list(compare_to_baseline(run("run", 50.0, NAN), run("base", 1.0, 1.0)))
    # m0's NaN is the nonfinite rule's; m1 moved 50x.
    assert [(f.module, f.step, f.value) for f in findings] == [("m1", 1, 50.0)]
