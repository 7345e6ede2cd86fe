import itertools

import pytest

from stabscope.record.schedule import Schedule


def test_dense_then_every():
    s = Schedule(dense=5, every=10)
    assert s.recorded_steps(45) == [0, 1, 2, 3, 4, 10, 20, 30, 40]


def test_log_spacing_is_geometric():
    s = Schedule(dense=10, every=0, log=True, per_decade=10)
    steps = [x for x in s.recorded_steps(1001) if x >= 10]
    # 10 points per decade: consecutive ratios stay near 10**0.1 = 1.259.
    ratios = [b / a for a, b in itertools.pairwise(steps) if a >= 100]
    assert min(ratios) > 1.2 and max(ratios) < 1.32
    assert {100, 1000} <= set(steps)
    assert len([x for x in steps if 100 <= x < 1000]) == 10


def test_parse_and_errors():
    assert Schedule.parse("dense=3,every=7") == Schedule(dense=3, every=7)
    assert Schedule.parse("log,dense=2").log
    with pytest.raises(ValueError):
        Schedule.parse("every=x")
    with pytest.raises(ValueError):
        Schedule(dense=0, every=0)
