"""Every rule on NaN/Inf data, written through the real store: a run that goes non-finite
partway, one non-finite from step 0, +/-Inf, a single step. No rule may raise, and a
divergence adds the ``nonfinite`` error without changing what any other rule concludes from
the finite steps before it."""

from __future__ import annotations

import json
import math

import pytest

from stabscope.theory.prediction import PREDICTION_FILE, LayerPrediction, Prediction
from tests.rule_runs import checked, post_ln_structure, write

NAN, INF = math.nan, math.inf

LAYERS = 4
STEPS = 12
BLOCKS = [f"blocks.{i}" for i in range(LAYERS)]
MODULES = [{"name": b, "layer": i, "role": "block", "depth": 1} for i, b in enumerate(BLOCKS)]
PARAMETERS = [{"name": f"{b}.w", "shape": [4, 4]} for b in BLOCKS]
STRUCTURE = post_ln_structure(BLOCKS)
# loss-spike's window shortened so that 12 steps can hold a spike.
SETTINGS = {"loss-spike": {"window": 3}}


def healthy_rows(steps: range) -> list[tuple[int, int, str, str, int, float]]:
    """(rank, step, module, metric, index, value): a run that trips most rules while finite.

    Shapes: layer 0's gradient falls 10x per step (gradient-growth, norm-input-growth), the
    norm inputs grow, attention logits grow past 1e3, head 0's entropy collapses, token
    correlation ends near 1, a loss spike at step 5, a big update at step 3, a logit past
    1e3 at step 4, Adam's sqrt(v) near eps, β_ii heavy at init, a blow-up-then-stall model
    update, rank 1's output gradients 3x rank 0's, and block outputs 3x the predicted rms."""
    rows = []
    for s in steps:
        loss = 12.0 if s == 5 else 3.0 - 0.01 * s
        for rank in (0, 1):
            rows.append((rank, s, "__run__", "loss", -1, loss))
            for b in BLOCKS:
                rows.append((rank, s, b, "grad_rms", -1, 0.1 * (3 if rank else 1)))
                rows.append((rank, s, b, "act_rms", -1, 3.0))
        rows.append((0, s, "__run__", "model_update_rel", -1, 1.32 + 0.02 * s))
        rows.append((0, s, "<root>", "logit_max", -1, 2e3 if s == 4 else 12.0))
        rows.append((0, s, "<root>", "logit_min", -1, -5.0))
        for i, b in enumerate(BLOCKS):
            rows.append((0, s, f"{b}.w", "param_grad_norm", -1, 10.0**-s if i == 0 else 1.0))
            rows.append((0, s, f"{b}.w", "update_ratio", -1, 0.5 if s == 3 else 1e-3))
            rows.append((0, s, f"{b}.w", "adam_sqrtv_over_eps", -1, 2.0))
            rows.append((0, s, f"{b}.ln", "norm_input_rms", -1, 1.2 * (1 + 0.1 * s)))
            rows.append((0, s, b, "token_corr", -1, min(0.5 + 0.05 * s, 0.97)))
            for f in ("act_nonfinite", "grad_nonfinite"):
                rows.append((0, s, b, f, -1, 0.0))
            for k, beta in enumerate((0.3, 0.7)):
                rows.append((0, s, b, "res_beta", k, beta))
        for head in (0, 1):
            rows.append((0, s, "blocks.0.attn", "attn_logit_max", head, 5.0 + 300.0 * s))
            rows.append((0, s, "blocks.0.attn", "attn_entropy", head, 0.9 / (1 + s * (1 - head))))
    return rows


def poisoned(rows: list, since: int, how: str) -> list:
    """From step ``since`` on: every value NaN (or +/-Inf, alternating), the non-finite flags
    1, and the recorder's markers: blocks.1 first in forward order, blocks.3 in backward."""
    out = []
    for i, (rank, s, module, metric, index, value) in enumerate(rows):
        if s >= since:
            if metric.endswith("_nonfinite"):
                value = 1.0
            elif how == "nan":
                value = math.nan
            else:
                value = math.inf if i % 2 else -math.inf
        out.append((rank, s, module, metric, index, value))
    for s in sorted({r[1] for r in rows if r[1] >= since}):
        out.append((0, s, "blocks.1", "first_nonfinite_forward", -1, 1.0))
        out.append((0, s, "blocks.3", "first_nonfinite_backward", -1, 1.0))
    return out


def write_full(run_dir, rows):
    """With the theory's prediction at init: act_rms 1 where 3 is measured (mismatch)."""
    write(run_dir, rows, modules=MODULES, parameters=PARAMETERS, structure=STRUCTURE)
    layers = [LayerPrediction(i, b, 0.0, 1.0, 1.0, 1.0, 0.5) for i, b in enumerate(BLOCKS)]
    (run_dir / PREDICTION_FILE).write_text(Prediction({}, {}, layers).to_json())
    return run_dir


def check(run_dir, until=None):
    return checked(run_dir, until, **SETTINGS)


def verdicts(findings) -> set:
    return {(f.rule, f.severity, f.module, f.step, f.value) for f in findings}


def test_the_healthy_twin_trips_the_rules_this_file_relies_on(tmp_path):
    found = {
        f.rule for f in check(write_full(tmp_path / "ok", healthy_rows(range(STEPS)))).findings
    }
    assert found == {
        "gradient-growth",
        "norm-input-growth",
        "attention-logit-growth",
        "attention-entropy-collapse",
        "rank-collapse",
        "residual-dependency",
        "loss-spike",
        "update-ratio",
        "output-logit-divergence",
        "adam-epsilon",
        "model-update",
        "rank-desync",
        "prediction-mismatch",
        "failure-forecast",
    }


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_a_divergence_partway_adds_nonfinite_and_changes_nothing_else(tmp_path, how):
    since = 8
    run = write_full(tmp_path / how, poisoned(healthy_rows(range(STEPS)), since, how))
    result = check(run)
    nonfinite = [f for f in result.findings if f.rule == "nonfinite"]
    others = [f for f in result.findings if f.rule != "nonfinite"]
    # The finite steps alone (the gate's own --until) give the same verdicts, but for the
    # failure forecast: a run that has failed gets none (nonfinite says it), its prefix does.
    prefix = check(run, until=since).findings
    assert "failure-forecast" in {f.rule for f in prefix}
    assert verdicts(others) == verdicts(f for f in prefix if f.rule != "failure-forecast")
    (f,) = nonfinite
    assert (f.severity, f.module, f.step, f.metric) == ("error", "blocks.1", since, "act_nonfinite")
    assert "the loss went non-finite at step 8" in f.message
    assert "backward pass: first the output gradient of blocks.3 at step 8" in f.message
    # 4 blocks x 2 directions x 4 non-finite recorded steps.
    assert f.value == 2 * LAYERS * (STEPS - since)


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_a_run_non_finite_from_step_0_gets_the_nonfinite_error_only(tmp_path, how):
    run = write_full(tmp_path / how, poisoned(healthy_rows(range(STEPS)), 0, how))
    findings = check(run).findings
    assert [(f.rule, f.step, f.module) for f in findings] == [("nonfinite", 0, "blocks.1")]


@pytest.mark.parametrize("how", ["finite", "nan", "inf"])
def test_a_single_step(tmp_path, how):
    rows = healthy_rows(range(1))
    run = write_full(tmp_path / how, rows if how == "finite" else poisoned(rows, 0, how))
    rules = {f.rule for f in check(run).findings}
    # One step holds no trend, spike or stall; what it does hold, at init, is still said.
    at_init = {"residual-dependency", "rank-desync", "adam-epsilon", "prediction-mismatch"}
    at_init.add("failure-forecast")  # a score from init, and none once the run is non-finite
    assert rules == (at_init if how == "finite" else {"nonfinite"})


def reject(constant: str) -> None:
    raise ValueError(f"not strict JSON: {constant}")


def test_json_output_of_a_non_finite_run_is_strict_json(tmp_path):
    from stabscope.rules import write_findings
    from stabscope.rules.gate import run_gate
    from stabscope.rules.output import to_json
    from stabscope.store.findings import Finding

    run = write_full(tmp_path / "r", poisoned(healthy_rows(range(STEPS)), 8, "inf"))
    doc = json.loads(to_json(run_gate(run)), parse_constant=reject)
    assert doc["failed"] and doc["rule_errors"] == {}
    assert [f["step"] for f in doc["findings"] if f["rule"] == "nonfinite"] == [8]
    # A finding's non-finite number is null in findings.json, not the NaN/Infinity token.
    inf = Finding("x", "error", "m", value=math.inf, threshold=math.nan)
    doc = json.loads(write_findings(run, [inf]).read_text(), parse_constant=reject)
    assert (doc[0]["value"], doc[0]["threshold"]) == (None, None)


def nonfinite_of(run_dir, until=None):
    found = [f for f in checked(run_dir, until).findings if f.rule == "nonfinite"]
    return found[0] if found else None


ORDER = [{"name": n} for n in ("a", "b", "c")]  # registration (forward) order


def flags(direction_metric, modules, since, steps=8):
    return [(s, m, direction_metric, -1, float(s >= since)) for s in range(steps) for m in modules]


def test_nonfinite_leads_with_the_earlier_direction_from_meta(tmp_path):
    rows = flags("act_nonfinite", ["b"], 5) + flags("grad_nonfinite", ["c", "a"], 3)
    rows += [(s, "__run__", "loss", -1, 1.0 if s < 6 else NAN) for s in range(8)]
    first = {
        "forward": {"step": 5, "module": "b", "call": 0},
        "backward": {"step": 3, "module": "c", "call": 0},
    }
    f = nonfinite_of(write(tmp_path / "r", rows, modules=ORDER, first_nonfinite=first))
    assert (f.severity, f.module, f.step, f.metric) == ("error", "c", 3, "grad_nonfinite")
    assert f.message.startswith(
        "NaN/Inf from step 3, first in the backward pass: the output gradient of c"
    )
    assert "forward pass: first the output of b at step 5" in f.message
    assert "the loss went non-finite at step 6 (nan)" in f.message
    # 3 forward (b at 5-7) and 10 backward (c and a at 3-7) values, over 5 steps.
    assert f.value == 3 + 10 and "over 5 steps" in f.message


def test_nonfinite_in_one_step_forward_comes_first_and_without_markers_module_order_decides(
    tmp_path,
):
    # No meta entry and no marker rows: the first flagged module in registration order
    # (forward), the last one (backward).
    rows = flags("act_nonfinite", ["c", "b"], 4) + flags("grad_nonfinite", ["a", "b"], 4)
    f = nonfinite_of(write(tmp_path / "r", rows, modules=ORDER))
    assert (f.module, f.step, f.metric) == ("b", 4, "act_nonfinite")
    assert "backward pass: first the output gradient of b at step 4" in f.message


def test_nonfinite_of_the_loss_alone_and_before_until(tmp_path):
    rows = flags("act_nonfinite", ["a"], 99) + [
        (s, "__run__", "loss", -1, v) for s, v in enumerate([1.0, 2.0, INF, NAN])
    ]
    run = write(tmp_path / "loss", rows, modules=ORDER)
    f = nonfinite_of(run)
    assert (f.module, f.step, f.metric, f.value) == ("__run__", 2, "loss", 0.0)
    assert f.message.startswith("the loss went non-finite at step 2 (inf)")
    # The verdict from the steps before it has none.
    assert nonfinite_of(run, until=2) is None and nonfinite_of(run, until=3).step == 2
