"""Verdicts while the run trains: the online rules, ``--on-error warn|stop``, ``on_finding``,
and a stopped run's status, on real training (a run that diverges to NaN near step 100, and
the same run kept healthy)."""

from __future__ import annotations

import json
import sys
import warnings
from argparse import Namespace

import pytest
import torch
from typer.testing import CliRunner

import stabscope
from stabscope import Recorder, Schedule
from stabscope.cli import app
from stabscope.errors import UsageError
from stabscope.record.config import RecorderConfig
from stabscope.rules import ALL_RULES
from stabscope.rules.online import FULL, WORKER, OnlineVerdicts, online_rules
from tests.conftest import ROOT
from tests.script_training import script_training

sys.path.insert(0, str(ROOT / "tests" / "scripts"))
import diverging_late

LATE = ROOT / "tests" / "scripts" / "diverging_late.py"
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def meta(run) -> dict:
    return json.loads((run / "meta.json").read_text())


def assert_readable_and_gated(run) -> None:
    """load_run reads every step taken; check fails the stopped run (exit 1) and says why."""
    m = meta(run)
    df = stabscope.load_run(run, metrics=["loss"])
    assert df.step.max() == m["steps"] - 1
    result = invoke("check", run)
    assert result.exit_code == 1, result.output
    found = json.loads((run / "findings.json").read_text())
    assert {m["stopped_by"]["rule"], "run-status"} <= {f["rule"] for f in found}
    status = next(f for f in found if f["rule"] == "run-status")
    assert "stopped after step" in status["message"]


#: The error rules that see the divergence: the loss rising x1e25 (loss-divergence), the
#: ReLUs it kills (gradient-growth: at step 100 the first layers' gradients are exactly 0
#: under the last one's 3e10), then the NaN/Inf (nonfinite).
DIVERGED = {"loss-divergence", "gradient-growth", "nonfinite"}

#: These tests are about the scheduled rows; the flight recorder would find the NaN earlier.
NOFLIGHT = RecorderConfig(flight=False)

#: The first step at which ``loss-divergence`` holds on diverging_late's losses so far.
LATE_DIVERGED = diverging_late.DIVERGES_AT

#: diverging_late's lr factor that overflows the loss at step 98, three steps after the jump
#: (x6e10 a step): too few finite steps of rising loss for the loss rules to see it first.
OVERFLOW = 1e8


def test_whole_run_rules_do_not_act_online():
    ids = {r.id for r in online_rules()}
    # The forecast acts, in its window of the budget (tests/test_forecast_online.py).
    assert "failure-forecast" in ids
    whole_run = {
        "run-status",
        "model-update",
        "lr-rise-past-catapult",
        "constant-prediction",
        "loss-above-uniform",
        "loss-above-constant",
        "no-better-than-constant",
        "loss-frozen",  # a streak the next step may end
    }
    assert whole_run.isdisjoint(ids)
    assert {"nonfinite", "gradient-growth", "attention-logit-growth"} <= ids
    assert len(ids) == len(ALL_RULES) - len(whole_run)


@pytest.mark.slow
def test_the_forecast_stops_a_run_planned_to_diverge_at_a_tenth_of_it(tmp_path):
    # The scheduler's plan holds the x1000 jump at step 95: at step 20 of 200 the forecast
    # reads it ahead and stops the run 75 steps before the loss shows anything.
    run = tmp_path / "late"
    result = invoke("profile", LATE, "--steps", 200, "--on-error", "stop", "--out", run, "-q")
    assert result.exit_code == 1, result.output
    m = meta(run)
    by = m["stopped_by"]
    assert (by["rule"], m["status"], m["steps"]) == ("failure-forecast", "stopped", 20)
    assert "expected to fail near step" in by["message"]
    loss = stabscope.load_run(run, metrics=["loss"]).value.to_numpy(float)
    assert loss[-1] < loss[0]  # the run was still learning when it was stopped
    assert_readable_and_gated(run)


@pytest.fixture
def no_forecast(tmp_path, monkeypatch):
    """A project whose pyproject.toml disables the forecast (``[tool.stabscope.rules]``, as
    the online rules read it from the working directory): the divergence itself acts."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[tool.stabscope.rules]\ndisable = ["failure-forecast"]\n'
    )
    monkeypatch.chdir(project)


@pytest.mark.slow
@pytest.mark.usefixtures("no_forecast")
def test_on_error_stop_stops_a_diverging_model_script_at_the_finding(tmp_path):
    run = tmp_path / "late"
    with warnings.catch_warnings():  # a blanket filter, as a script's own may set one
        warnings.simplefilter("ignore")
        result = invoke("profile", LATE, "--steps", 200, "--on-error", "stop", "--out", run, "-q")
    assert result.exit_code == 1, result.output
    m = meta(run)
    assert m["status"] == "stopped"
    by = m["stopped_by"]
    assert by["rule"] in DIVERGED and by["severity"] == "error"
    # The lr is x1000 from step 95: the loss check sees the loss give back what it learned
    # from step 98 (LATE_DIVERGED), and the loss overflows at step 104, read at once (a CPU
    # loss needs no sync): the run ends at the first of these verdicts.
    assert LATE_DIVERGED <= by["step"] <= by["seen_at"] <= 106
    assert m["steps"] - 1 == by["seen_at"]
    assert f"stopped after step {by['seen_at']} by rule {by['rule']}" in result.output
    # The finding's own line, said while it trains, whatever the warning filters.
    assert f"error: {by['rule']} " in result.output and "stopping the run" in result.output
    assert m["online"]["findings"][0] == by
    assert {f["rule"] for f in m["online"]["findings"]} <= DIVERGED
    assert_readable_and_gated(run)
    summary = invoke("summary", run)
    assert summary.exit_code == 0 and "stopped" in summary.output


@pytest.mark.slow
def test_healthy_run_never_fires_and_warn_only_reports(tmp_path):
    healthy, warned = tmp_path / "healthy", tmp_path / "warned"
    args = ("--steps", 150, "-q", "--dense", 0, "--every", 10, "--preset", "cheap")
    ok = invoke("profile", LATE, *args, "--set", "factor=1", "--on-error", "stop", "--out", healthy)
    assert ok.exit_code == 0, ok.output
    m = meta(healthy)
    assert m["status"] == "complete" and m["steps"] == 150 and "stopped_by" not in m
    assert m["online"]["findings"] == [] and m["online"]["checks"] >= 1
    # The default, warn: the divergence is reported while it trains and the run goes on.
    with warnings.catch_warnings():  # PYTHONWARNINGS=ignore: the CLI still says it
        warnings.simplefilter("ignore")
        bad = invoke("profile", LATE, *args, "--out", warned)
    assert bad.exit_code == 0, bad.output
    assert "error: nonfinite" in bad.output
    m = meta(warned)
    assert m["status"] == "complete" and m["steps"] == 150
    assert {f["rule"] for f in m["online"]["findings"]} == DIVERGED


def test_bad_on_error_is_one_line_with_a_hint(tmp_path):
    result = invoke("profile", LATE, "--on-error", "bogus", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "--on-error must be one of warn, stop, got 'bogus'" in result.output
    assert "hint: e.g. --on-error stop" in result.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="on_error must be one of warn, stop"):
        Recorder(torch.nn.Linear(2, 2), tmp_path / "y", on_error="bogus")
    assert not (tmp_path / "y").exists()


def late_training(cfg: Namespace):
    return script_training(diverging_late, cfg)


@pytest.mark.slow
def test_on_finding_gets_each_error_finding_once(tmp_path):
    cfg = Namespace(**diverging_late.CONFIG)
    net, step = late_training(cfg)
    got = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        every10 = Schedule(10, 10)
        with Recorder(
            net, tmp_path / "run", schedule=every10, on_finding=got.append, config=NOFLIGHT
        ) as rec:
            for _ in range(160):
                rec.step(step())
    # The first two come from checks that run off the training thread, in either order.
    rules = [f.rule for f in got]
    assert sorted(rules[:2]) == ["gradient-growth", "loss-divergence"]
    assert rules[2:] == ["nonfinite", "nonfinite"]
    assert {f.severity for f in got} == {"error"}
    growth, diverged = (next(f for f in got if f.rule == r) for r in sorted(rules[:2]))
    # Recorded step 100, after the jump: the ReLUs are dead, the first layers' gradients 0.
    assert growth.step == 100 and "is exactly 0" in growth.message
    # The loss gave back what it had learned from step 98 on (LATE_DIVERGED), and overflows
    # at step 104: a CPU loss is read without a sync and judged by the loss check as it
    # rises, and at once when it overflows, with the steps before it.
    assert LATE_DIVERGED <= diverged.step <= 103
    assert (got[2].module, got[2].step) == ("__run__", 104)
    assert "the loss went non-finite at step 104" in got[2].message
    # The modules at the first recorded step with a non-finite row (every 10th step here).
    assert got[3].step == 110 and "NaN/Inf from step 110" in got[3].message
    m = meta(tmp_path / "run")
    assert m["status"] == "complete" and m["steps"] == 160  # warn: training went on
    seen = [f["seen_at"] for f in m["online"]["findings"]]
    assert all(f.step <= at <= 104 for f, at in zip(got[:2], seen[:2]))
    assert seen[0] <= seen[1] and seen[2:] == [104, 110]
    assert any("nonfinite" in str(w.message) for w in caught)


def late_loop_with_stop(run, steps: int, obey: bool) -> Recorder:
    """The late-diverging training for ``steps`` steps under ``on_error="stop"``, every 10th
    step recorded; ``obey``: the loop ends once ``rec.should_stop``."""
    net, step = late_training(Namespace(**diverging_late.CONFIG))
    with Recorder(net, run, schedule=Schedule(10, 10), on_error="stop", config=NOFLIGHT) as rec:
        for _ in range(steps):
            rec.step(step())
            if obey and rec.should_stop:
                break
    return rec


def test_a_plain_loop_stops_on_should_stop(tmp_path):
    rec = late_loop_with_stop(tmp_path / "run", 160, obey=True)
    m = meta(tmp_path / "run")
    # At the loss check that sees the divergence, at the non-finite loss (104) at the latest.
    seen = m["stopped_by"]["seen_at"]
    assert m["status"] == "stopped" and LATE_DIVERGED <= seen <= 104 and m["steps"] == seen + 1
    assert rec.stopped_by == m["stopped_by"]


def test_a_loop_that_ignores_the_stop_completes(tmp_path):
    """``stopped`` means the run ended where the finding asked; one that went on is complete."""
    rec = late_loop_with_stop(tmp_path / "run", 120, obey=False)
    m = meta(tmp_path / "run")
    assert m["status"] == "complete" and "stopped_by" not in m
    assert rec.stopped_by == m["online"]["findings"][0]
    assert LATE_DIVERGED <= rec.stopped_by["seen_at"] <= 104


def test_a_finding_inside_the_users_exception_handling_never_hides_the_exception(tmp_path):
    """The loss overflows at step 98 (lr x1e8 from step 95: x6e10 a step, too few steps for
    the loss rules to see before); the script's guard raises, and its handler ends the step
    before re-raising. The findings of that boundary wait, and the callback with them: the
    script's own exception ends the run."""
    cfg = Namespace(**{**diverging_late.CONFIG, "factor": OVERFLOW})
    net, _ = late_training(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    sched = diverging_late.scheduler(opt, cfg)
    data = diverging_late.batches(cfg)

    def callback(finding):
        raise RuntimeError(f"callback saw {finding.rule}")

    rec = Recorder(net, tmp_path / "run", schedule=Schedule(1000), on_error="stop",
                   on_finding=callback)  # fmt: skip
    with pytest.raises(FloatingPointError, match="step 98"), rec:
        for step in range(160):
            try:
                opt.zero_grad(set_to_none=True)
                loss = diverging_late.loss(net, next(data))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss {loss.item()} at step {step}")
                loss.backward()
                opt.step()
                sched.step()
                rec.step(loss)
            except FloatingPointError:
                rec.step(loss)  # the handler ends the step, then re-raises
                raise
    m = meta(tmp_path / "run")
    assert m["status"] == "failed" and m["error"]["type"] == "FloatingPointError"
    assert not rec.should_stop and "stopped_by" not in m


EXCEPT_SCRIPT = """
import sys
from argparse import Namespace
import torch
sys.path.insert(0, {scripts!r})
import diverging_late as d

cfg = Namespace(**{{**d.CONFIG, "factor": {factor!r}}})
torch.manual_seed(0)
net = d.model(cfg)
opt = d.optimizer(net, cfg)
sched = d.scheduler(opt, cfg)
data = d.batches(cfg)
for step in range(160):
    opt.zero_grad(set_to_none=True)
    loss = d.loss(net, next(data))
    try:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {{loss.item()}} at step {{step}}")
    except FloatingPointError:
        loss.backward()  # the handler finishes the step, then re-raises
        opt.step()
        raise
    loss.backward()
    opt.step()
    sched.step()
"""


@pytest.mark.slow
def test_zero_code_stop_ends_the_script_at_the_boundary_and_never_hides_its_error(tmp_path):
    common = ("--run-script", "--on-error", "stop", "--preset", "cheap", "-q")
    run = tmp_path / "zc"
    every10 = ("--dense", 0, "--every", 10)
    result = invoke("profile", LATE, *common, *every10, "--out", run, "--", "--steps", 160)
    assert result.exit_code == 1, result.output
    m = meta(run)
    # Judged as the loss rises (from step 96) or at the step the flight recorder flags (104),
    # not at the next recorded step (110).
    assert m["status"] == "stopped" and 96 <= m["stopped_by"]["seen_at"] <= 106
    assert m["stopped_by"]["rule"] in DIVERGED and m["steps"] == m["stopped_by"]["seen_at"] + 1
    assert_readable_and_gated(run)
    # Its own guard raises at step 98 and its handler steps: the script's error wins.
    script = tmp_path / "guarded.py"
    script.write_text(EXCEPT_SCRIPT.format(scripts=str(LATE.parent), factor=OVERFLOW))
    run = tmp_path / "guarded"
    result = invoke("profile", script, *common, "--dense", 1000, "--out", run)
    assert result.exit_code == 2, result.output
    assert "FloatingPointError" in result.output and "step 98" in result.output
    m = meta(run)
    assert m["status"] == "failed" and m["error"]["type"] == "FloatingPointError"
    assert "stopped_by" not in m


def test_closing_waits_for_the_check_in_progress(tmp_path):
    """No worker outlives its run: a daemon thread still inside pandas, pyarrow or torch at
    interpreter exit is ended as it takes the GIL back, which aborts the process (exit 134)
    after the user's script has finished."""
    net, step = late_training(Namespace(**diverging_late.CONFIG))
    with Recorder(net, tmp_path / "run", schedule=Schedule(40, 0), config=NOFLIGHT) as rec:
        for _ in range(40):
            rec.step(step())
    verdicts = OnlineVerdicts(tmp_path / "run", pause=0.0)
    verdicts.submit({FULL: None})  # the parts alone: one pass of the online rules, ~0.1 s
    worker = verdicts._thread
    assert worker is not None and worker.name == WORKER
    verdicts.close()
    assert not worker.is_alive()
