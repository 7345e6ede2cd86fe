"""Rule ``lr-negative`` on real zero-code runs: a cosine schedule written without its offset,
``peak * cos(pi * t)``, turns negative half-way. Set by hand in the loop, the recorded lr
names the first negative step; through a ``LambdaLR`` with a planned budget, the plan names
it while the run is at its tenth step. The reference is the formula itself; the healthy
cosine, ``peak * (1 + cos(pi * t)) / 2``, which ends at exactly 0, gives nothing."""

from __future__ import annotations

import math

import pytest

from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from tests.scripts.harness import run_both

STEPS, PEAK = 60, 1e-2

SCRIPT = """
import json, math, sys
import torch

KIND, STEPS, STOP = {kind!r}, {steps}, {stop}
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr={peak})


def factor(step):
    t = step / STEPS
    return math.cos(math.pi * t) if KIND.endswith("typo") else (1 + math.cos(math.pi * t)) / 2


sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if KIND.startswith("lambda") else None
x = torch.randn(64, 4)
y = x.sum(1, keepdim=True)
losses = []
for step in range(STOP):
    if sched is None:
        for group in opt.param_groups:
            group["lr"] = {peak} * factor(step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    losses.append(loss.item())
json.dump(losses, open(sys.argv[1], "w"))
"""


def first_negative() -> int:
    return next(s for s in range(STEPS) if math.cos(math.pi * s / STEPS) < 0)


def negative_findings(tmp_path, kind: str, stop: int, budget: int | None = None) -> list:
    text = SCRIPT.format(kind=kind, steps=STEPS, stop=stop, peak=PEAK)
    _, _, run = run_both(tmp_path, text, RecorderConfig(online_rules=False), budget=budget)
    return [f for f in check_run(run).findings if f.rule == "lr-negative"]


@pytest.mark.parametrize("kind", ["hand_typo", "lambda_typo"])
def test_a_cosine_without_its_offset_turns_negative_at_its_half(tmp_path, kind, recwarn):
    (f,) = negative_findings(tmp_path, kind, STEPS)
    # The stability index is not measured at a negative lr (its preconditioner's square
    # root has no real value): no complex number reaches the Hessian products.
    assert not [w for w in recwarn if "complex" in str(w.message)]
    assert f.severity == "error" and f.step == first_negative() == 31
    assert f.value == pytest.approx(PEAK * math.cos(math.pi * 31 / STEPS), rel=1e-5)


def test_the_plan_names_the_negative_lr_at_the_runs_tenth_step(tmp_path):
    (f,) = negative_findings(tmp_path, "lambda_typo", 10, budget=STEPS)
    assert f.step == first_negative() and "planned learning rate turns negative" in f.message
    # Only planned: a warning (a budget past the scheduler's own horizon plans below zero
    # too); the recorded lr's own turn, above, is the error.
    assert f.severity == "warning"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hand", "lambda"])
def test_a_cosine_that_ends_at_zero_is_not_negative(tmp_path, kind):
    assert negative_findings(tmp_path, kind, STEPS) == []
    (tmp_path / "early").mkdir()
    assert negative_findings(tmp_path / "early", kind, 10, budget=STEPS) == []
