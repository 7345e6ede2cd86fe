"""``loss-divergence`` on a jump the loss does not come back from: an 8-class task learned
from ln 8 to ~0.3 nats, then at step 100 the learning rate is raised x30 (a warm restart far
above the peak): the loss jumps ~7x and ends near 3x its level before the jump, having
given back only a third of what it learned, so neither of the rule's other two cases sees
it. The probe batch (the same batch, eval mode) scores worse after the jump too. A
curriculum whose batches get harder at step 100 raises the loss for good as well, but the
model keeps its score on the probe batch: a warning. One corrupt batch is a spike the loss
comes back from: nothing. The finding's value is checked against the script's own losses."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabscope import Recorder, RecorderConfig
from stabscope.rules import check_run
from tests.rule_runs import checked, write
from tests.scripts.harness import recorded_ce_step

STEPS, AT, WINDOW = 200, 100, 10  # 200 losses: levels are medians over max(5, 200 // 20)


def train(run, change: str) -> list[float]:
    """Adam at 1e-2 on y = argmax(x·W + noise) over 8 classes; at step ``AT``: ``restart``
    raises the lr x30, ``harder`` moves from rows whose two best classes stand 1.5 apart
    (almost noise-free) to all rows, ``corrupt`` shuffles that one batch's labels. Returns
    the script's own losses."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 8, generator=g)

    def sample(n: int, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(8 * n, 10, generator=g)
        scores = x @ w  # (8n, 8)
        top = scores.topk(2, dim=1).values
        x = x[top[:, 0] - top[:, 1] >= margin][:n]  # (n, 10)
        y = (x @ w + 0.3 * torch.randn(len(x), 8, generator=g)).argmax(1)
        return x, y

    net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    easy = 1.5 if change == "harder" else 0.0
    first = sample(128, easy)

    def probe(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(first[0]), first[1])

    seen = []
    with Recorder(net, run, RecorderConfig(online_rules=False), forward=probe) as rec:
        for step in range(STEPS):
            if change == "restart" and step == AT:
                for group in opt.param_groups:
                    group["lr"] *= 30
            x, y = first if step == 0 else sample(128, easy if step < AT else 0.0)
            if change == "corrupt" and step == AT:
                y = y[torch.randperm(len(y), generator=g)]
            seen.append(recorded_ce_step(net, opt, rec, x, y))
    return seen


def divergence(run) -> list:
    return [f for f in check_run(run).findings if f.rule == "loss-divergence"]


@pytest.mark.slow
def test_a_jump_the_loss_does_not_come_back_from_is_an_error(tmp_path):
    seen = train(tmp_path / "restart", "restart")
    # Step AT's loss is read before its update, the first at the raised lr: it jumps at AT+1.
    before = statistics.median(seen[AT + 1 - WINDOW : AT + 1])
    end = statistics.median(seen[-WINDOW:])
    start, best = (
        statistics.median(seen[:WINDOW]),
        min(statistics.median(seen[i - WINDOW : i]) for i in range(WINDOW, STEPS + 1)),
    )
    assert max(seen[AT : AT + 5]) > 5 * before  # it jumped
    assert end - best < 0.5 * (start - best)  # gave back under half: not the other cases
    (error,) = divergence(tmp_path / "restart")
    assert error.severity == "error" and f"jumped at step {AT + 1}" in error.message
    assert error.value == pytest.approx((end - before) / before, rel=1e-4)
    assert error.value > 0.2


@pytest.mark.slow
def test_harder_batches_for_good_warn_and_one_corrupt_batch_is_nothing(tmp_path):
    seen = train(tmp_path / "harder", "harder")
    assert statistics.median(seen[-WINDOW:]) > 1.5 * statistics.median(seen[AT - WINDOW : AT])
    (warning,) = divergence(tmp_path / "harder")
    assert warning.severity == "warning" and "before the jump" in warning.message
    seen = train(tmp_path / "corrupt", "corrupt")
    assert seen[AT] > 3 * statistics.median(seen[AT - WINDOW : AT])  # the spike
    assert divergence(tmp_path / "corrupt") == []


def test_a_jump_from_a_loss_at_exactly_zero_is_read_without_a_ratio(tmp_path):
    """A hinge loss that fell from 10 to exactly 0 (met) for 90 steps, then sits at 0.5 for
    good: it gave back 5% of its fall (not the first case), ends far under its start (not
    the second), and has no level before the jump to be a share above: no finding, and no
    rule fails (checked: a division by that level would have raised)."""
    losses = [10.0] * 10 + [0.0] * 90 + [0.5] * 100
    rows = [(s, "__run__", "loss", -1, v) for s, v in enumerate(losses)]
    result = checked(write(tmp_path / "run", rows))
    assert [f for f in result.findings if f.rule == "loss-divergence"] == []
