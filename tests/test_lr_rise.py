"""``lr-rise-past-catapult`` on real recorded runs of a planned lr ramp (full-batch SGD on a
regression, tests/scripts/ramping_sgd.py), against the stability index the runs recorded and
the plan written out again; and the look-ahead's base on a warm-restart plan, analytic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stabscope import load_run
from stabscope.cli import app
from stabscope.rules import check_run
from stabscope.rules.stability_features import lr_growth_ahead, stability_features
from stabscope.rules.view import RunView

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ramping_sgd.py"
RULE = "lr-rise-past-catapult"
runner = CliRunner()


def profile(out: Path, *sets: str, steps: int = 9) -> Path:
    """The steps before the ramp (steps 10-20) of a 40-step plan."""
    args = ["profile", str(SCRIPT), "--steps", str(steps), "--budget", "40", "-q", "--out"]
    res = runner.invoke(app, [*args, str(out), *(a for s in sets for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    return out


def index_now(run: Path) -> float:
    """The geometric mean of the last two recorded stability indices (the signal's S_now)."""
    df = load_run(run, metrics=["stability_index"]).sort_values("step")
    last = df.value.to_numpy(float)[-2:]
    return float(np.exp(np.log(last).mean()))


def rule_findings(run: Path) -> list:
    return [f for f in check_run(run).findings if f.rule == RULE]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lr_rise")
    return {
        "steep": profile(root / "steep", "ramp=1000"),  # the lr x1000 from step 10 to 20
        "calm": profile(root / "calm", "ramp=2"),
        "flat": profile(root / "flat", "ramp=1"),  # a constant plan
    }


@pytest.mark.slow
def test_a_ramp_past_six_times_the_edge_is_an_error(runs) -> None:
    now = index_now(runs["steep"])
    assert now * 1000 > 6  # the plan's x1000 takes the measured index past the bound
    (f,) = rule_findings(runs["steep"])
    assert f.severity == "error" and f.threshold == 6.0
    assert f.value == pytest.approx(now * 1000, rel=1e-4)
    assert f.step == 8  # said at the last step seen
    assert "the planned lr reaches 50 at step 20" in f.message
    assert f"lower the planned rise at least {now * 1000 / 6:.3g}x" in f.remedy
    res = runner.invoke(app, ["check", str(runs["steep"]), "-q"])
    assert res.exit_code == 1 and RULE in res.stderr + res.stdout


def test_a_small_ramp_keeps_its_forecast_and_no_error(runs) -> None:
    now = index_now(runs["calm"])
    forecast = stability_features(RunView.open(runs["calm"]))["stability_forecast"]
    assert forecast.value == pytest.approx(math.log10(now * 2), abs=1e-5)
    assert now * 2 < 6 and rule_findings(runs["calm"]) == []


def test_a_plan_with_no_rise_has_no_forecast_to_extrapolate(runs) -> None:
    found = stability_features(RunView.open(runs["flat"]))
    assert math.isnan(found["stability_forecast"].value)
    assert "the planned lr rises no further" in found["stability_forecast"].evidence
    assert found["stability_now"].value == pytest.approx(math.log10(index_now(runs["flat"])))
    assert rule_findings(runs["flat"]) == []


def sgdr(steps: np.ndarray, peak: float, period: int, scale: float = 1.0) -> np.ndarray:
    """Cosine annealing with warm restarts (no warm-up): each cycle falls from its peak to
    ~0; cycle c starts at peak x scale^c."""
    cycle, t = steps // period, steps % period
    return peak * scale**cycle * 0.5 * (1 + np.cos(np.pi * t / period))


def test_a_restart_to_a_trained_lr_is_no_rise_and_a_higher_one_counts_from_it() -> None:
    steps = np.arange(300)  # (300,) the plan: three cycles of 100 steps
    last = 95  # the bottom of the first cycle
    plain = sgdr(steps, 0.1, 100)
    ahead = lr_growth_ahead(steps, plain, last, float(plain[last]))
    assert plain[100] / plain[last] > 100  # from the lr now, the restart is a x100 rise
    assert ahead.factor == 1.0  # but the run has trained at 0.1 already
    assert ahead.words.startswith("the plan has trained at lr 0.1;")
    tenfold = sgdr(steps, 0.1, 100, scale=10)  # each restart's peak x10: a real rise
    ahead = lr_growth_ahead(steps, tenfold, last, float(tenfold[last]))
    assert ahead.factor == pytest.approx(100.0)  # to 10 at step 200, from the trained 0.1
    assert (ahead.base, ahead.step) == (pytest.approx(0.1), 200)
