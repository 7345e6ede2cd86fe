"""Training that runs and cannot learn, each from real training checked against what the
script itself knows: an optimizer built from part of the model (``no-update``'s unstepped
case, its share counted here from the parameters), a learning rate that vanishes early
(``lr-vanishes``, the planned steps counted from the schedule's formula), and a clip far below
the gradient norm under SGD (``clip-throttles``, its factor from ``clip_grad_norm_``'s own
return). The healthy twins have no finding."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

import stabscope
from stabscope import Schedule
from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from stabscope.rules.lr_plan_check import plan_conflict
from stabscope.rules.view import RunView
from tests.conftest import mlp

Setup = Callable[[torch.nn.Module], tuple[torch.optim.Optimizer, object]]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 6, generator=g), torch.randn(6, 3, generator=g)
    return x, torch.tanh(x @ w)


def train(
    run,
    setup: Setup,
    steps: int,
    budget: int | None = None,
    clip: float | None = None,
    epoch: int = 0,
    model: torch.nn.Module | None = None,
) -> list[float]:
    """An MLP regression under the Recorder; ``setup`` makes (optimizer, scheduler or None).
    ``epoch`` > 0 steps the scheduler once per ``epoch`` steps, else once per step. Returns
    what ``clip_grad_norm_`` returned at each step (empty without a clip)."""
    torch.manual_seed(0)
    model = model or mlp(hidden=32)
    opt, sched = setup(model)
    x, y = data()
    norms = []
    schedule = Schedule(dense=10, every=5)
    recorder = stabscope.Recorder(model, run, schedule=schedule, budget=budget, schedulers=sched)
    with recorder as rec:
        for step in range(steps):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            opt.step()
            if sched is not None and (epoch == 0 or (step + 1) % epoch == 0):
                sched.step()
            rec.step(loss=loss)
    return norms


def found(run, rule: str) -> list:
    return [f for f in check_run(run).findings if f.rule == rule]


# -- an optimizer that holds part of the model ---------------------------------------------


def test_weight_matrices_no_optimizer_holds_are_an_error_when_they_are_most_of_the_model(
    tmp_path,
):
    def biases_only(model):
        return torch.optim.Adam([p for p in model.parameters() if p.dim() < 2], lr=1e-2), None

    train(tmp_path / "biases", biases_only, steps=12)
    meta = json.loads((tmp_path / "biases" / "meta.json").read_text())
    assert {p["name"]: p["stepped"] for p in meta["parameters"]} == {
        f"{i}.{kind}": kind == "bias" for i in (0, 2, 4) for kind in ("weight", "bias")
    }
    (f,) = found(tmp_path / "biases", "no-update")
    assert f.severity == "error" and f.value == 1.0
    assert "3 weight matrices receive gradients but no optimizer holds them" in f.message


def test_a_module_added_after_the_optimizer_is_a_warning_and_a_frozen_one_nothing(tmp_path):
    model = mlp(hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model[4] = torch.nn.Linear(32, 3)  # a new head after the optimizer was made: never stepped

    def made(_):
        return opt, None

    train(tmp_path / "late", made, steps=12, model=model)
    (f,) = found(tmp_path / "late", "no-update")
    share = (32 * 3) / (6 * 32 + 32 * 32 + 32 * 3)  # the new head's share of the matrices
    assert f.severity == "warning" and f.value == pytest.approx(share)
    assert f.module == "4.weight"

    frozen = mlp(hidden=32)
    for p in frozen[0].parameters():
        p.requires_grad_(False)  # frozen on purpose: no gradient, not counted

    def trainable(model):
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2), None

    train(tmp_path / "frozen", trainable, steps=12, model=frozen)
    assert found(tmp_path / "frozen", "no-update") == []


BODY_REPLACED = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
model[0], model[2] = nn.Linear(6, 32), nn.Linear(32, 32)  # after the optimizer: never stepped
g = torch.Generator().manual_seed(1)
x, w = torch.randn(64, 6, generator=g), torch.randn(6, 3, generator=g)
for step in range(12):
    loss = (model(x) - torch.tanh(x @ w)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.mark.slow
def test_a_body_replaced_after_the_optimizer_was_built_is_an_error(tmp_path):
    """The optimizer still holds the old body, out of the graph: the recorder sees it too (a
    second set of parameters the script's optimizer steps), but it gets no gradient, so the
    new body's share is of the matrices that get one: (6·32 + 32·32) / (6·32 + 32·32 + 32·3)."""
    from tests.test_cli import invoke

    script = tmp_path / "replaced.py"
    script.write_text(BODY_REPLACED)
    res = invoke("profile", script, "--out", tmp_path / "run", "-q")
    assert res.exit_code == 0, res.output
    (f,) = found(tmp_path / "run", "no-update")
    body = 6 * 32 + 32 * 32
    assert f.severity == "error" and f.value == pytest.approx(body / (body + 32 * 3))


def test_a_part_released_later_with_add_param_group_counts_as_stepped(tmp_path):
    """Progressive unfreezing: the optimizer starts with the head, the body joins through
    ``add_param_group`` at step 6. meta.json's ``stepped`` follows the groups, so the body
    trained from step 6 on is not reported as never stepped."""
    torch.manual_seed(0)
    model = mlp(hidden=32)
    opt = torch.optim.Adam(model[4].parameters(), lr=1e-2)
    x, y = data()
    with stabscope.Recorder(model, tmp_path / "unfreeze", schedule=Schedule(dense=12)) as rec:
        for step in range(12):
            if step == 6:
                body = [p for m in (model[0], model[2]) for p in m.parameters()]
                opt.add_param_group({"params": body, "lr": 1e-3})
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    meta = json.loads((tmp_path / "unfreeze" / "meta.json").read_text())
    assert all(p["stepped"] for p in meta["parameters"])
    assert found(tmp_path / "unfreeze", "no-update") == []
    # Nor while it trained, before the body joined (steps 0-5 held only the head).
    assert [f for f in meta["online"]["findings"] if f["rule"] == "no-update"] == []


# -- a learning rate that vanishes early ---------------------------------------------------

BUDGET = 60


def linear(horizon: int, warmup: int = 5) -> Callable[[int], float]:
    """HF's linear schedule: warm-up to 1, then down to 0 at ``horizon``, 0 after."""
    return lambda s: s / warmup if s < warmup else max(0.0, (horizon - s) / (horizon - warmup))


@pytest.mark.slow
def test_a_schedule_whose_horizon_is_shorter_than_the_run_is_an_error_at_its_first_steps(
    tmp_path,
):
    def short(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear(horizon=20))

    train(tmp_path / "short", short, steps=8, budget=BUDGET)  # stopped at step 8 of 60
    (f,) = found(tmp_path / "short", "lr-vanishes")
    # The plan holds every step (60 <= 100 points): lr 0 from step 20 to 59, 40 steps.
    zero = [s for s in range(BUDGET) if linear(20)(s) < 1e-3 and s > 5]
    assert f.severity == "error" and f.step == zero[0] == 20
    assert f.value == pytest.approx(len(zero) / BUDGET)
    assert "stays there for 40 of the 60 planned steps (67%)" in f.message

    def full(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear(horizon=BUDGET))

    train(tmp_path / "full", full, steps=BUDGET, budget=BUDGET)  # decays to 0 at the end
    assert found(tmp_path / "full", "lr-vanishes") == []


def test_a_decay_that_falls_through_zero_is_said_to_go_negative_at_its_first_steps(tmp_path):
    # The same horizon of 20 without HF's clamp at 0: (20 - s) / 15 is below 0 from step 21.
    def through_zero(s: int) -> float:
        return s / 5 if s < 5 else (20 - s) / 15

    def unclamped(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, through_zero)

    train(tmp_path / "unclamped", unclamped, steps=8, budget=BUDGET)
    (f,) = found(tmp_path / "unclamped", "lr-vanishes")
    negative = next(s for s in range(BUDGET) if through_zero(s) < 0)
    assert negative == 21 and f"below zero from step {negative}" in f.message
    assert "the weights stop learning" in f.message
    (neg,) = found(tmp_path / "unclamped", "lr-negative")
    assert neg.step == negative


@pytest.mark.slow
def test_a_per_epoch_scheduler_is_judged_by_the_lr_it_used_not_a_per_step_plan(tmp_path):
    def step_lr(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)

    # Stepped once per epoch of 10 steps: the plan (once per step) is 0.7^s, the run's lr
    # 0.7^(s // 10); 0.7^19 < 1e-3 would read 40 of 60 planned steps as vanished.
    train(tmp_path / "epoch", step_lr, steps=BUDGET, budget=BUDGET, epoch=10)
    conflict = plan_conflict(RunView.open(tmp_path / "epoch"))
    assert conflict is not None and "(0.05)" in conflict
    assert found(tmp_path / "epoch", "lr-vanishes") == []
    # Nor while it trained, when the lr rows had not landed and the plan could not be checked.
    online = json.loads((tmp_path / "epoch" / "meta.json").read_text())["online"]["findings"]
    assert [f for f in online if f["rule"] == "lr-vanishes"] == []
    # The same scheduler stepped every step is what the plan says: the lr falls below 1/1000
    # of its peak at step 20 (0.7^20 = 8e-4) and stays there.
    train(tmp_path / "batch", step_lr, steps=10, budget=BUDGET)
    assert plan_conflict(RunView.open(tmp_path / "batch")) is None
    (f,) = found(tmp_path / "batch", "lr-vanishes")
    first = next(s for s in range(BUDGET) if 0.7**s < 1e-3)
    assert f.step == first == 20 and f.value == pytest.approx((BUDGET - first) / BUDGET)


def test_without_a_plan_the_recorded_lr_decides(tmp_path):
    def exp(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.6)

    train(tmp_path / "exp", exp, steps=40)  # no budget: no plan
    lrs = [0.05 * 0.6**s for s in range(40)]
    low = sum(lr < 1e-3 * 0.05 for lr in lrs[1:])  # 0.6^14 = 7.8e-4: steps 14-39
    (f,) = found(tmp_path / "exp", "lr-vanishes")
    assert f.step == 14 and f.value == pytest.approx(low / 40, rel=1e-6)
    assert "of the 40 steps so far" in f.message


def test_a_plan_of_chunks_is_checked_from_below_too(tmp_path):
    """A budget of 2000 steps keeps the plan as chunks of 20. The script steps its warm-up and
    decay every 10 steps, so it is still warming up where the plan (once per step) has
    already peaked: the run's lr sits below the chunks' minimum, not above their maximum.
    The plan is set aside and nothing vanished."""
    f = lambda s: (s + 1) / 20 if s < 20 else max(0.0, (200 - s) / 180)  # noqa: E731

    def every_ten(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)

    train(tmp_path / "k", every_ten, steps=100, budget=2000, epoch=10)
    plan = json.loads((tmp_path / "k" / "meta.json").read_text())["lr_plan"]
    assert len(plan["lr"]) == len(plan["lr_min"]) == 100  # chunks of 20 steps
    # Step 30: the run's lr is f(3) = 0.2 of 1e-2, still warming up; the plan's chunk
    # [20, 40) holds f(20..39), 1.0 down to 0.894 of it.
    assert 1e-2 * f(30 // 10) < plan["lr_min"][1] == pytest.approx(1e-2 * f(39))
    assert plan_conflict(RunView.open(tmp_path / "k")) is not None
    assert found(tmp_path / "k", "lr-vanishes") == []


@pytest.mark.slow
def test_an_lr_at_exactly_a_thousandth_of_its_peak_is_not_below_it(tmp_path):
    """Three x0.1 step decays from lr 0.1 end at 1e-4, 1/1000 of the peak, which the float32
    lr rows store just under 1e-4 x float32(0.1): not below. A fourth decay is."""

    def step_lr(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)

    train(tmp_path / "three", step_lr, steps=60)  # 1e-4 over steps 30-59: half the run
    assert np.float32(1e-4) < 1e-3 * np.float32(0.1)  # what a strict comparison would see
    assert found(tmp_path / "three", "lr-vanishes") == []
    train(tmp_path / "four", step_lr, steps=80)  # 1e-5 over steps 40-79
    (f,) = found(tmp_path / "four", "lr-vanishes")
    assert f.step == 40 and f.value == pytest.approx(40 / 80)


@pytest.mark.slow
def test_an_sgd_phase_handed_to_an_adam_fine_tune_is_two_scales_not_a_vanishing_lr(tmp_path):
    """SGD at lr 0.1 for 20 steps, then a new Adam at 1e-5 for 40: the second optimizer's lr is
    1e-4 of the first's, but each group is read against its own peak. The same drop inside one
    SGD group is an error."""
    torch.manual_seed(0)
    model = mlp(hidden=32)
    sgd_ = torch.optim.SGD(model.parameters(), lr=0.1)
    adam = torch.optim.Adam(model.parameters(), lr=1e-5)
    x, y = data()
    with stabscope.Recorder(model, tmp_path / "handover", schedule=Schedule(dense=10)) as rec:
        for step in range(60):
            opt = sgd_ if step < 20 else adam
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    assert found(tmp_path / "handover", "lr-vanishes") == []

    def drop(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 20 else 1e-4)

    train(tmp_path / "drop", drop, steps=60)
    (f,) = found(tmp_path / "drop", "lr-vanishes")
    assert f.step == 20 and f.value == pytest.approx(40 / 60)


# -- a clip far below the gradient norm ------------------------------------------------------


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), None


@pytest.mark.slow
def test_sgd_under_a_clip_a_thousand_times_below_the_gradient_norm_is_an_error(tmp_path):
    torch.manual_seed(0)
    weights = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in mlp(hidden=32).parameters()))
    norms = train(tmp_path / "tiny", sgd, steps=20, clip=1e-4)
    (f,) = found(tmp_path / "tiny", "clip-throttles")
    factors = [1e-4 / (n + 1e-6) for n in norms]  # clip_grad_norm_'s own scaling
    assert f.severity == "error"
    assert f.value == pytest.approx(float(np.quantile(factors, 0.9)), rel=1e-4)
    assert f.value < 1e-2
    # Each step: lr 0.1 x the clipped norm 1e-4 x momentum's gain 1/(1 - 0.9), over ||θ||.
    assert f"moving the weights by {0.1 * 1e-4 * 10 / weights:.2g} of their norm" in f.message
    # The usual clip passes most steps unchanged; Adam does not see a uniform factor.
    norms = train(tmp_path / "usual", sgd, steps=20, clip=1.0)
    assert found(tmp_path / "usual", "clip-throttles") == []
    assert max(norms) < math.inf

    def adam(model):
        return torch.optim.Adam(model.parameters(), lr=1e-2), None

    train(tmp_path / "adam", adam, steps=20, clip=1e-4)
    assert found(tmp_path / "adam", "clip-throttles") == []


def test_a_clip_at_every_step_with_an_lr_tuned_for_it_is_not_throttling(tmp_path):
    """Normalised gradient descent: a summed loss, clipped to 0.1 at every step, with lr 0.5.
    The clip keeps under 1% of the gradient, but each step moves the weights by about a tenth
    of their norm, and the run learns."""
    torch.manual_seed(0)
    model = mlp(hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = data()
    kept = []
    with stabscope.Recorder(model, tmp_path / "nsgd", schedule=Schedule(dense=10, every=5)) as rec:
        for _ in range(40):
            loss = (model(x) - y).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            kept.append(0.1 / float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)))
            opt.step()
            rec.step(loss=loss)
    assert np.quantile(kept, 0.9) < 1e-2  # the clip acts as hard as in the throttled run
    assert found(tmp_path / "nsgd", "clip-throttles") == []


TWO_OPTIMIZERS = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
body = torch.optim.SGD(model[0].parameters(), lr=0.1)
head = torch.optim.Adam(model[2].parameters(), lr=1e-2)
g = torch.Generator().manual_seed(1)
x, w = torch.randn(64, 6, generator=g), torch.randn(6, 3, generator=g)
start = model[0].weight.detach().clone()
for step in range(12):
    loss = (model(x) - torch.tanh(x @ w)).pow(2).mean()
    body.zero_grad()
    head.zero_grad()
    loss.backward()
    head.step()  # the slip: body.step() is never called
assert torch.equal(model[0].weight, start)
"""


def test_an_optimizer_built_and_never_stepped_is_named(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_OPTIMIZERS)
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig(online_rules=False))
    (f,) = found(run, "no-update")
    # The body's matrix (6x64 = 384 values) against the head's (64x3 = 192): 2/3 of them.
    assert f.severity == "error" and f.value == pytest.approx(384 / 576)
    assert "no optimizer that stepped holds them (SGD was built and never stepped)" in f.message
    assert f.remedy.startswith("call step() on every optimizer")
