"""``loss-far-above-chance`` on real training: a next-token model on a Markov chain whose
output layer starts x1000 too large is confidently wrong at step 0 (its loss hundreds of
times ln V) and after 30 steps of Adam at 1e-3 still sits far above 3 ln V; the same model
with its head x10 too large falls back under ln V within those steps. The finding's ratio is
checked against the script's own losses; a warm-up still under way is not judged. A
regression read against its constant bar: raw targets (mean 250) that a small learning rate
cannot reach stay far above their variance, standardised ones fall under it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import stabscope
from stabscope.rules import check_run
from tests.scripts import train_regression
from tests.scripts.harness import record
from tests.test_rules_constant_prediction import V, markov_batch

STEPS = 30  # past the rule's min_steps (20)
RULE = "loss-far-above-chance"


class Net(nn.Module):
    def __init__(self, head_scale: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU())
        self.head = nn.Linear(64, V)
        with torch.no_grad():
            self.head.weight.mul_(head_scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.head(self.body(self.emb(tokens)))


def train(run, head_scale: float, warmup: int = 0, lr: float = 1e-3) -> list[float]:
    """The script's own loss at every step (budget 400 steps: far from the planned end)."""
    torch.manual_seed(0)
    model = Net(head_scale)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = (
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=warmup)
        if warmup
        else None
    )
    g = torch.Generator().manual_seed(1)
    seen = []
    with stabscope.Recorder(model, run, budget=400) as rec:
        for _ in range(STEPS):
            batch = markov_batch(g)
            logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            rec.step(loss=loss)
            seen.append(loss.item())
    return seen


def best_level(losses: list[float]) -> float:
    """The lowest median of w = 5 consecutive losses (30 losses: max(5, 30 // 20) = 5)."""
    x = np.asarray(losses)
    return min(float(np.median(x[i - 5 : i])) for i in range(5, len(x) + 1))


def far_above(run) -> list:
    return [f for f in check_run(run).findings if f.rule == RULE]


def test_an_output_layer_too_large_to_recover_from_is_an_error(tmp_path):
    seen = train(tmp_path / "run", head_scale=1000.0)
    assert seen[0] > 100 * math.log(V)  # confidently wrong from the start
    (found,) = far_above(tmp_path / "run")
    assert found.severity == "error"
    assert found.value == pytest.approx(best_level(seen) / math.log(V), rel=1e-5)
    assert found.value >= 3
    assert f"after {STEPS} steps at its full learning rate" in found.message


@pytest.mark.slow
def test_a_large_init_that_falls_back_and_one_under_warm_up_pass(tmp_path):
    seen = train(tmp_path / "recovers", head_scale=10.0)
    assert seen[0] > 1.5 * math.log(V)  # it did start above ln V
    assert best_level(seen) < math.log(V)
    assert far_above(tmp_path / "recovers") == []
    # The x1000 head under a warm-up over 400 steps: at step 29 the lr is 7.3% of its peak,
    # so the model has not had its learning rate yet, whatever its loss.
    seen = train(tmp_path / "warmup", head_scale=1000.0, warmup=400)
    assert best_level(seen) > 3 * math.log(V)
    assert far_above(tmp_path / "warmup") == []
    lr = stabscope.load_run(tmp_path / "warmup", metrics=["lr"]).groupby("step").value.max()
    assert lr.iloc[-1] == pytest.approx(1e-3 * (1e-3 + (1 - 1e-3) * (STEPS - 1) / 400), rel=1e-5)


def regression(tmp_path, *args: str) -> tuple[list[float], list[float], list]:
    """train_regression for 30 steps of a 120-step budget: its losses, its bars (the
    Bessel-corrected variance of each step's targets), the findings."""
    run, log = record(tmp_path, "train_regression.py", "--steps", str(STEPS), *args, budget=120)
    bars = []
    for step in range(STEPS):
        y = train_regression.data(step, 0)[1]  # (BATCH, 1) raw targets
        if "--standardize" in args:
            y = (y - train_regression.MEAN) / train_regression.SD
        bars.append(y.var(0, correction=1).item())
    return [row["loss"] for row in log], bars, far_above(run)


@pytest.mark.slow
def test_a_regression_far_above_its_targets_variance_is_read_against_it(tmp_path):
    losses, bars, found = regression(tmp_path / "raw")
    # The lowest ratio of sums over 5 consecutive steps (30 steps: a window of 5).
    best = min(sum(losses[i - 5 : i]) / sum(bars[i - 5 : i]) for i in range(5, STEPS + 1))
    assert best > 3
    (error,) = found
    assert error.value == pytest.approx(best, rel=1e-4)
    assert "the targets' mean" in error.message
    losses, bars, found = regression(tmp_path / "std", "--standardize")
    assert sum(losses[-5:]) / sum(bars[-5:]) < 1 and found == []


def test_a_loss_that_began_near_chance_and_blew_up_is_not_an_init_finding(tmp_path):
    """A sound init (the loss at step 0 near ln 16) at Adam lr 10: the first updates throw
    the weights off and the loss sits far above 3 ln V from then on. That is a divergence
    (``loss-divergence``'s), and no init the model failed to undo."""
    seen = train(tmp_path / "run", head_scale=1.0, lr=10.0)
    assert seen[0] < 1.5 * math.log(V)
    assert best_level(seen) > 3 * math.log(V)
    assert far_above(tmp_path / "run") == []
