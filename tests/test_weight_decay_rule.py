"""Weight decay that outpaces the updates: real training under AdamW at lr·wd 0.1 per step is
an error, at 0.03 a warning, or an error where the norm has halved, each with the weights'
norm ratio measured here; a wd 0.1 twin, coupled L2 (Adam, which the rule does not judge)
and a rate below 0.01 have no finding. The
decay rate follows each optimizer's own update rule: SGD's momentum repeats it
1/(1-momentum) times, a warm-up's peak lr counts, not the lr it started at."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

import stabscope
from stabscope import Schedule
from stabscope.rules import check_run
from stabscope.rules.view import RunView
from stabscope.rules.weight_decay import at_least, decay_rates
from tests.conftest import mlp

STEPS = 30
RULE = "weight-decay-dominance"

Optimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def train(run, make: Optimizer, warmup: int = 0) -> dict[int, float]:
    """An MLP regression for STEPS steps, every step recorded. Returns the weights' total norm
    as each step's optimizer step reads them (what the parameter probe records), per step."""
    torch.manual_seed(0)
    model = mlp(hidden=32)
    opt = make(list(model.parameters()))
    ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 6, generator=g), torch.randn(6, 3, generator=g)
    y = torch.tanh(x @ w)
    norms = {}
    with stabscope.Recorder(model, run, schedule=Schedule(dense=STEPS, every=0)) as rec:
        for step in range(STEPS):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                norms[step] = math.sqrt(sum(float(p.pow(2).sum()) for p in model.parameters()))
            opt.step()
            ramp.step()
            rec.step(loss=loss)
    return norms


def found(run) -> list:
    return [f for f in check_run(run).findings if f.rule == RULE]


@pytest.mark.slow
def test_adamw_decaying_a_tenth_a_step_is_an_error_a_thirtieth_a_warning(tmp_path):
    norms = train(tmp_path / "wd10", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=10))
    (f,) = found(tmp_path / "wd10")
    assert f.severity == "error" and f.step == STEPS - 1
    assert f.value == pytest.approx(norms[STEPS - 1] / norms[0], rel=1e-5)
    assert f.value <= 0.75
    assert "AdamW param group 0 decays its weights by lr·wd = 0.01·10 = 0.1 per step" in f.message
    assert "(half-life 7 steps)" in f.message  # ln 2 / -ln(1 - 0.1) = 6.58
    assert "keeps e^-1 of what it learned 10 steps before" in f.message
    norms = train(tmp_path / "wd3", lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=10))
    (f,) = found(tmp_path / "wd3")
    assert f.severity == "warning" and 0.5 < f.value <= 0.75
    assert f.value == pytest.approx(norms[STEPS - 1] / norms[0], rel=1e-5)
    assert "lr·wd = 0.003·10 = 0.03 per step (half-life 23 steps)" in f.message
    twin = train(tmp_path / "wd01", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    assert twin[STEPS - 1] > 0.75 * twin[0]
    assert found(tmp_path / "wd01") == []


def test_from_a_fiftieth_a_step_a_norm_halved_is_an_error(tmp_path):
    """lr·wd 0.03 at lr 1e-3: the updates are smaller than at lr 3e-3 (the warning above, its
    norm at 0.58), so the decay holds the weights below half their start: an error. The
    ratio is the one measured here."""
    norms = train(tmp_path / "slow", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=30))
    assert norms[STEPS - 1] <= 0.5 * norms[0]
    (f,) = found(tmp_path / "slow")
    assert f.severity == "error" and f.threshold == 0.5  # the bound it was judged at
    assert f.value == pytest.approx(norms[STEPS - 1] / norms[0], rel=1e-5)
    assert "lr·wd = 0.001·30 = 0.03 per step" in f.message
    assert "keeps e^-1 of what it learned 33 steps before" in f.message


@pytest.mark.slow
def test_coupled_l2_and_a_small_rate_are_not_judged(tmp_path):
    # Adam's coupled L2 at wd 10 shrinks the weights too, through the normalised gradient;
    # the rule reads only decays that multiply the weights.
    norms = train(tmp_path / "adam", lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=10))
    assert norms[STEPS - 1] < 0.75 * norms[0]
    assert decay_rates(RunView.open(tmp_path / "adam")) == []
    assert found(tmp_path / "adam") == []
    # lr·wd = 3e-3 per step, under the 0.01 threshold: the norm shrinks, nothing is said.
    train(tmp_path / "small", lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=1.0))
    (rate,) = decay_rates(RunView.open(tmp_path / "small"))
    assert rate.rate == pytest.approx(3e-3)
    assert found(tmp_path / "small") == []


@pytest.mark.slow
def test_the_rate_follows_each_optimizers_update_rule(tmp_path):
    # SGD: the decay term passes through the momentum buffer, 1/(1 - 0.9) = 10 times.
    sgd = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.02)  # noqa: E731
    train(tmp_path / "sgd", sgd)
    (rate,) = decay_rates(RunView.open(tmp_path / "sgd"))
    assert rate.rate == pytest.approx(0.05 * 0.02 / (1 - 0.9))
    assert rate.formula == "lr·wd·(1 - dampening)/(1 - momentum) = 0.05·0.02·10 = 0.01"
    # Adam with decoupled_weight_decay is AdamW's rule: lr·wd.
    decoupled = lambda p: torch.optim.Adam(  # noqa: E731
        p, lr=3e-3, weight_decay=10, decoupled_weight_decay=True
    )
    norms = train(tmp_path / "decoupled", decoupled)
    (rate,) = decay_rates(RunView.open(tmp_path / "decoupled"))
    assert rate.rate == pytest.approx(0.03)
    (f,) = found(tmp_path / "decoupled")
    assert f.value == pytest.approx(norms[STEPS - 1] / norms[0], rel=1e-5)
    assert f.message.startswith("Adam (decoupled_weight_decay) param group 0")
    # A 10-step warm-up from lr/10: meta.json keeps the first lr (3e-4), the rule the peak.
    adamw = lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=10)  # noqa: E731
    train(tmp_path / "warmup", adamw, warmup=10)
    view = RunView.open(tmp_path / "warmup")
    assert view.meta.optimizers[0]["groups"][0]["lr"] == pytest.approx(3e-4)
    (rate,) = decay_rates(view)
    assert rate.lr == pytest.approx(3e-3) and rate.rate == pytest.approx(0.03)


def test_each_group_is_read_at_its_own_recorded_lr(tmp_path):
    """Two groups of one AdamW: the lr rows are numbered by group, and each rate is that
    group's lr times its own weight decay."""

    def grouped(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        matrices = [p for p in params if p.ndim >= 2]
        vectors = [p for p in params if p.ndim < 2]
        return torch.optim.AdamW(
            [
                {"params": vectors, "lr": 1e-3, "weight_decay": 1.0},
                {"params": matrices, "lr": 1e-2, "weight_decay": 10.0},
            ]
        )

    train(tmp_path / "groups", grouped)
    rates = decay_rates(RunView.open(tmp_path / "groups"))
    assert [(r.group, r.optimizer) for r in rates] == [(0, "AdamW"), (1, "AdamW")]
    assert [r.rate for r in rates] == pytest.approx([1e-3, 0.1], rel=1e-6)
    (f,) = found(tmp_path / "groups")
    assert "AdamW param group 1 decays its weights by lr·wd = 0.01·10" in f.message


def test_a_rate_at_a_threshold_counts_though_its_lr_was_stored_as_float32():
    lr32 = float(np.float32(0.01))  # how the lr rows hold lr 0.01: 0.009999999776
    assert lr32 * 1.0 < 0.01 and at_least(lr32 * 1.0, 0.01) and at_least(lr32 * 10, 0.1)
    assert not at_least(0.0099, 0.01)  # a rate 1% under is under
