"""The failure forecast of a finished run reads its window too: its score at 10% or 25% of
the planned steps, where the grid validated it and where the live judge gives it, wherever
that reaches a severity the score at the run's end does not. A model pushed hard at the
start whose signals fade once it settles would otherwise have the whole-run check take back
what the live judge said. The reference is the replay of the same run at each cut
(``check_run(run, until=cut)``), and the end's own score from the rule's scoring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabscope.cli import app
from stabscope.rules import check_run
from stabscope.rules.forecast import ONLINE_FROM, ONLINE_UNTIL, score_view
from stabscope.rules.view import RunView

SCRIPT = Path(__file__).resolve().parents[1] / "sample_models" / "gpt.py"
STEPS = 80


def forecast(run: Path, until: int | None = None):
    (f,) = [f for f in check_run(run, until=until).findings if f.rule == "failure-forecast"]
    return f


@pytest.mark.slow
def test_a_finished_run_keeps_the_forecast_its_window_gave(tmp_path):
    run = tmp_path / "hot"
    res = CliRunner().invoke(
        app,
        ["profile", str(SCRIPT), "--steps", str(STEPS), "--set", "depth=2", "--set", "width=64",
         "--set", "lr=5e-2", "-q", "--out", str(run)],
    )  # fmt: skip
    assert res.exit_code in (0, 1), res.output
    cuts = [math.ceil(share * STEPS) for share in (ONLINE_FROM, ONLINE_UNTIL)]
    window = {cut: forecast(run, cut).value for cut in cuts}
    end = score_view(RunView.open(run))[0]
    best = max(window, key=window.__getitem__)
    # This run's signals fade after its hot start: the window reaches an error, its end not.
    assert window[best] >= 0.8 > end
    whole = forecast(run)
    assert whole.value == pytest.approx(window[best], rel=1e-9)
    assert whole.step == best - 1
    assert f"by step {best} ({best / STEPS:.0%} of it" in whole.message
