"""``negligible-updates`` on real training: the Markov-chain next-token model under Adam at
lr 1e-7 moves its weights by about 1e-4 over its 200 planned steps, which the rule reads at
the first tenth of the run; at lr 1e-2 it does not fire. The projected total is checked
against update ratios the test measures itself, from the weights before and after each
step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import stabscope
from stabscope.rules import check_run
from tests.test_rules_constant_prediction import NextToken, markov_batch

BUDGET = 200
CUT = 19  # the first tenth: steps 0-19 seen, 0-9 recorded by the default schedule
LAST = (7, 8, 9)  # the rule's last three recorded steps


def train(run, lr: float) -> dict[int, float]:
    """Train CUT + 1 steps of a run planned for BUDGET; per step, the median over the
    weight matrices of ||Δθ|| / ||θ|| (θ before the step), in float64."""
    torch.manual_seed(0)
    model = NextToken(sees_input=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    ratios = {}
    with stabscope.Recorder(model, run, budget=BUDGET) as rec:
        for step in range(CUT + 1):
            batch = markov_batch(g)
            logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 16), batch[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            before = [p.detach().double().clone() for p in matrices]
            opt.step()
            rec.step(loss=loss)
            each = [(p.detach().double() - b).norm() / b.norm() for p, b in zip(matrices, before)]
            ratios[step] = float(np.median([r.item() for r in each]))
    return ratios


def negligible(run) -> list:
    return [f for f in check_run(run).findings if f.rule == "negligible-updates"]


@pytest.mark.slow
def test_an_lr_far_too_small_is_read_at_the_first_tenth_of_the_run(tmp_path):
    ratios = train(tmp_path / "run", lr=1e-7)
    (found,) = negligible(tmp_path / "run")
    # A constant lr: the planned sum over lr(t) is BUDGET steps of it.
    want = max(ratios[s] for s in LAST) * BUDGET
    assert found.severity == "error" and found.value == pytest.approx(want, rel=1e-4)
    assert found.value < 1e-3 and found.step in LAST


@pytest.mark.slow
def test_an_lr_that_trains_passes(tmp_path):
    ratios = train(tmp_path / "run", lr=1e-2)
    assert max(ratios[s] for s in LAST) * BUDGET > 0.1
    assert negligible(tmp_path / "run") == []
