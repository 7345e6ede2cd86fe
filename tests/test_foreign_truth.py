"""The foreign bench's truth (bench/foreign/truth.py) on analytic loss series, each against
the rule's stated definition; no training."""

from __future__ import annotations

import json
import math

from bench.foreign import truth


def test_a_nan_fails_at_its_row_and_the_step_scales_with_the_rows():
    values = [2.0, 1.5, 1.2, math.nan, 1.0] + [0.5] * 15  # 20 rows
    t = truth.judge(values)
    assert t.failed and t.first_nonfinite == 3 and t.reason == "non-finite from row 3"
    # 20 rows over a 100-step run: row 3 sits at step 3 * 100 // 20 = 15.
    assert truth.failure_step(t, 100) == 15


def test_a_flat_series_made_no_progress():
    t = truth.judge([2.3] * 100)
    assert t.failed and t.reason == "no progress from start"
    # The rule's edge: a tail at 96% of the start is no progress, at 94% it is.
    assert truth.judge([1.0] * 5 + [0.96] * 95).failed
    assert not truth.judge([1.0] * 5 + [0.94] * 95).failed


def test_a_learning_series_is_healthy_unless_no_better_than_the_baseline():
    n = 200
    values = [3.0 * math.exp(-t / 40) + 0.5 for t in range(n)]  # 3.5 -> ~0.52
    t = truth.judge(values, baseline=2.9)
    tail = sum(values[-20:]) / 20  # the last max(10, n // 10) = 20 rows
    assert not t.failed and t.reason == "" and math.isclose(t.tail, tail)
    assert math.isclose(t.start, sum(values[:5]) / 5) and t.best == values[-1]
    assert truth.failure_step(t, n) == n  # a healthy run: the budget
    # The same series against a baseline its tail does not beat by 3%: no better than it.
    worse = truth.judge(values, baseline=tail / 0.98)
    assert worse.failed and worse.reason == "no better than the trivial baseline"


def test_a_series_that_learns_and_gives_it_back_fails():
    down = [4.0 - 3.0 * t / 99 for t in range(100)]  # 4 -> 1 (best 1.0)
    up = [1.0 + 2.5 * t / 99 for t in range(100)]  # back to 3.5: tail mean ~3.38 > 1.5 x 1 + 0.5
    t = truth.judge(down + up)
    assert t.failed and t.reason == "gave back its progress" and t.best == 1.0
    assert t.tail > 1.5 * t.best + 0.5 and t.tail < 0.95 * t.start
    # A smaller climb back (tail ~1.9 < 2.0) is a bump, not a failure.
    assert not truth.judge(down + [1.0 + 1.0 * t / 99 for t in range(100)]).failed


def test_the_log_format_reads_back(tmp_path):
    path = tmp_path / "x.loss.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            [{"loss": 2.0, "q": 1.0}, {"loss": "nan", "q": 0.5}]))  # fmt: skip
    assert truth.read_log(path, "q") == [1.0, 0.5]
    assert math.isnan(truth.read_log(path)[1]) and truth.judge(truth.read_log(path)).failed
    assert truth.judge([]).reason == "nothing logged"
