"""The failure forecast while the run trains: it speaks between 10% and 25% of a known budget
(the horizons the development grid scored it at), so ``--on-error stop`` ends a run planned
far past the edge of stability there, before its loss blows up, and leaves a calm twin alone.
The reference for "before it blows up" is the same seed trained to its end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stabscope import load_run
from stabscope.cli import app
from stabscope.rules import check_run
from stabscope.rules.forecast import ONLINE_FROM, ONLINE_UNTIL, not_online_now
from stabscope.rules.view import RunView

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ramping_sgd.py"
BUDGET = 40
runner = CliRunner()


def profile(out: Path, ramp: str, on_error: str) -> tuple[int, dict]:
    res = runner.invoke(
        app,
        ["profile", str(SCRIPT), "--steps", str(BUDGET), "--budget", str(BUDGET),
         "--set", f"ramp={ramp}", "--on-error", on_error, "-q", "--out", str(out)],
    )  # fmt: skip
    return res.exit_code, json.loads((out / "meta.json").read_text())


def test_a_run_planned_past_stability_stops_at_the_forecast_horizon(tmp_path) -> None:
    # Warned, the run goes on to its end and blows up after the ramp (steps 10-20, x1e4).
    code, warned = profile(tmp_path / "warn", "10000", "warn")
    assert warned["status"] == "complete" and warned["steps"] == BUDGET
    loss = load_run(tmp_path / "warn", metrics="loss").sort_values("step").value.to_numpy(float)
    blown = int(np.flatnonzero(~(loss < 2 * loss[0]))[0])
    (said,) = [f for f in warned["online"]["findings"] if f["rule"] == "failure-forecast"]
    assert said["severity"] == "error" and said["value"] >= 0.8
    # Said once, inside the window, from the steps before the loss showed anything.
    assert ONLINE_FROM * BUDGET <= said["seen_at"] + 1 < ONLINE_UNTIL * BUDGET
    assert said["seen_at"] < blown

    code, stopped = profile(tmp_path / "stop", "10000", "stop")
    assert code == 1 and stopped["status"] == "stopped"
    assert stopped["stopped_by"]["rule"] == "failure-forecast"
    # The first boundary at 10% of the budget judges it: steps 0-3 ran, then the stop.
    assert stopped["steps"] == int(np.ceil(ONLINE_FROM * BUDGET)) < blown


def test_a_calm_twin_is_not_stopped(tmp_path) -> None:
    code, calm = profile(tmp_path / "calm", "2", "stop")
    assert code == 0 and calm["status"] == "complete" and calm["steps"] == BUDGET
    assert calm["online"]["findings"] == []


def test_outside_the_window_a_training_run_has_no_forecast(tmp_path) -> None:
    profile(tmp_path / "done", "10000", "warn")
    # The same rows, read as if the run were still training at each step.
    live = tmp_path / "live"
    shutil.copytree(tmp_path / "done", live)
    meta = json.loads((live / "meta.json").read_text())
    (live / "meta.json").write_text(json.dumps({**meta, "status": "running"}))
    lo, hi = int(np.ceil(ONLINE_FROM * BUDGET)), int(np.ceil(ONLINE_UNTIL * BUDGET))
    outside = [s for s in range(1, BUDGET + 1) if not_online_now(RunView.open(live, until=s))]
    assert outside == [*range(1, lo), *range(hi, BUDGET + 1)]
    # A run no longer training is judged at every step.
    assert not any(not_online_now(RunView.open(tmp_path / "done", until=s)) for s in (1, 39))
    # Without a budget there is no share of it: never while training.
    del meta["lr_plan"]
    (live / "meta.json").write_text(json.dumps({**meta, "status": "running"}))
    assert not_online_now(RunView.open(live, until=lo))
    # Nor in a replay of the finished run before its end: where it would end was not known
    # then. At its end the whole run is judged.
    (live / "meta.json").write_text(json.dumps(meta))
    assert not_online_now(RunView.open(live, until=lo))
    assert not not_online_now(RunView.open(live)) and not not_online_now(
        RunView.open(live, until=BUDGET)
    )
    replayed = {f.rule for f in check_run(live, until=lo).findings}
    assert "failure-forecast" not in replayed
    assert "failure-forecast" in {f.rule for f in check_run(tmp_path / "done", until=lo).findings}
