"""Rule ``loss-divergence`` on real training: an MLP regression under Adam whose learning
rate jumps x300 at step 60 gives back most of what it had learned (an error); the same run
without the jump, and one with a corrupt batch at step 60 (a loss spike that recovers), give
no finding. The levels are recomputed here from the recorded losses with numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import stabscope
from bench import divergence_noise
from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.rules import check_run

STEPS = 120


def train(run_dir, lrs: dict[int, float], bad_batch: int | None = None) -> None:
    """120 steps at lr 1e-2; ``lrs``: step -> the lr from that step on; at ``bad_batch`` the
    targets are x20."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = (2 * x[:, :4]).sin()  # (64, 4)
    config = RecorderConfig(preset="cheap", schedule=Schedule(5, 50), online_rules=False)
    with Recorder(net, run_dir, config) as rec:
        for step in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = lrs.get(step, group["lr"])
            loss = (net(x) - (20 * y if step == bad_batch else y)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)


def given_back(run_dir) -> float:
    """(end - best) / (start - best) of the medians over w = max(5, n // 20) losses."""
    loss = stabscope.load_run(run_dir, metrics=["loss"]).sort_values("step")
    v = loss.value.to_numpy(float)
    w = max(5, len(v) // 20)
    medians = [np.median(v[i : i + w]) for i in range(len(v) - w + 1)]
    start, best, end = np.median(v[:w]), min(medians), np.median(v[-w:])
    return (end - best) / (start - best)


def found(run_dir) -> list:
    return [f for f in check_run(run_dir).findings if f.rule == "loss-divergence"]


@pytest.mark.slow
def test_a_run_that_gives_back_what_it_learned_is_an_error(tmp_path):
    jumped, healthy, spiked = tmp_path / "jump", tmp_path / "ok", tmp_path / "spike"
    train(jumped, {60: 3.0})
    train(healthy, {})
    train(spiked, {}, bad_batch=60)
    back = given_back(jumped)
    assert back > 0.5
    (f,) = found(jumped)
    assert (f.severity, f.step, f.threshold) == ("error", STEPS - 1, 0.5)
    assert f.value == pytest.approx(back, rel=1e-5)
    assert f"gave back {back:.0%}" in f.message
    # Learning without the jump keeps its gains; a spike that recovers moves no median far.
    assert given_back(healthy) < 0.05 and found(healthy) == []
    spike = stabscope.load_run(spiked, metrics=["loss"]).set_index("step").value
    assert spike[60] > 10 * spike[59]  # the corrupt batch's loss
    assert given_back(spiked) < 0.5 and found(spiked) == []


@pytest.mark.slow
def test_a_run_that_ends_worse_than_it_started_is_an_error(tmp_path):
    """lr 100 from the first step: Adam's steps of ~100 throw the weights around and the loss
    ends ~4x above its start (finite); the healthy twin of the first test ends far below."""
    run = tmp_path / "at-once"
    train(run, {0: 100.0})
    loss = stabscope.load_run(run, metrics=["loss"]).sort_values("step").value.to_numpy(float)
    start, end = loss[0], np.median(loss[-6:])  # w = max(5, 120 // 20) = 6
    assert end > 1.5 * start
    (f,) = found(run)
    assert f.severity == "error" and f.threshold == 0.5
    assert f.value == pytest.approx((end - start) / start, rel=1e-5)
    assert "worse than it started" in f.message


@pytest.mark.slow
def test_ten_losses_are_enough_for_a_run_that_blew_up(tmp_path):
    """lr 100 from the first step, seen through its first 12 steps (an early check, or a
    compiled run whose probes are blind): the medians of its first and last 5 losses share
    no loss, and the end sits far above the start (an error); through 9 steps, too few."""
    run = tmp_path / "at-once"
    train(run, {0: 100.0})
    loss = stabscope.load_run(run, metrics=["loss"]).sort_values("step").value.to_numpy(float)
    start = min(loss[0], np.median(loss[:5]))
    end = np.median(loss[7:12])  # the last 5 of the first 12
    assert end > 1.5 * start
    early = [f for f in check_run(run, until=12).findings if f.rule == "loss-divergence"]
    assert [(f.severity, f.step) for f in early] == [("error", 11)]
    assert early[0].value == pytest.approx((end - start) / start, rel=1e-5)
    assert not [f for f in check_run(run, until=9).findings if f.rule == "loss-divergence"]


def noisy_regression(run_dir, steps: int = 200) -> np.ndarray:
    """SGD (lr 0.01, momentum 0.9) on batches of 4 from targets with noise of sd 1: a healthy
    run whose level stays put while its per-batch loss wobbles (coefficient of variation
    ~0.7, a chi-square of 4 draws). Its losses by step."""
    divergence_noise.train(run_dir, 1, 0.01, steps, data_seed=101, schedule=Schedule(5, 50))
    return stabscope.load_run(run_dir, metrics=["loss"]).sort_values("step").value.to_numpy(float)


def noise_floor(v: np.ndarray, w: int) -> float:
    """3 standard deviations of a difference of two medians of w losses, σ from the median
    second difference (0.6745·√6·σ for Gaussian draws)."""
    sigma = np.median(np.abs(np.diff(v, 2))) / (0.6745 * np.sqrt(6))
    return 3 * np.sqrt(2) * 1.2533 * sigma / np.sqrt(w)


def test_a_rise_within_the_losses_own_noise_is_no_divergence(tmp_path):
    """Through its first 20 steps the levels (medians of 5) fall and rise back by more than
    half, and end 50% above the first loss: each proportional test alone would call it a
    divergence. The rise is under 3 standard deviations of the noise (read up to the best
    level), the end under 3 of them above the start in log space (read from all losses):
    no finding, then or at the end of the run, whose level stays where it began."""
    run = tmp_path / "noisy"
    v = noisy_regression(run)
    assert v[-50:].mean() < 1.1 * v[:50].mean()  # healthy: the level holds
    x, w = v[:20], 5
    medians = np.array([np.median(x[i - w : i]) for i in range(w, len(x) + 1)])
    start, end = min(x[0], np.median(x[:w])), np.median(x[-w:])
    at = int(medians.argmin())
    best = medians[at]
    gave_back = start - best >= 0.1 * start and end - best >= max(0.5 * (start - best), 0.2 * best)
    assert gave_back or end >= 1.5 * start  # a proportional test holds
    assert end - best < noise_floor(x[: max(at + w, 2 * w)], w)
    assert np.log(end / start) < noise_floor(np.log(x), w)
    early = [f for f in check_run(run, until=20).findings if f.rule == "loss-divergence"]
    assert early == [] and found(run) == []


@pytest.mark.slow
def test_a_noisy_healthy_run_is_never_called_diverged_while_it_trains(tmp_path):
    """The online checks judge the losses written so far. The same healthy run, judged after
    every 5th step: its best level is the lowest of many noisy medians, and its batch losses
    are skewed far right (a few at 4-5x the level), so a window of five can sit at 3x a lucky
    best with nothing wrong. Read in log space, with the lowest of k levels' own bias, no cut
    calls it diverged (with σ in linear units from the losses before the best and no such
    bias, 3 of these 39 cuts did, and 19 of 191 judged after every step)."""
    run = tmp_path / "noisy"
    v = noisy_regression(run)
    w = 5
    medians = [np.median(v[i : i + w]) for i in range(0, 60, w)]
    assert max(medians) > 3 * min(medians)  # the windows swing, though the level holds
    cuts = range(10, 201, 5)
    assert [n for n in cuts if found_until(run, n)] == []


def found_until(run_dir, until: int) -> list:
    return [f for f in check_run(run_dir, until=until).findings if f.rule == "loss-divergence"]


def test_a_loss_at_exactly_zero_is_judged_without_raising(tmp_path):
    """A consistency loss between a model and its own copy is 0 at every step: it neither
    learned nor gave anything back, and the rule must not divide by what it gained (the
    gate fails when a rule raises)."""
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Recorder(net, tmp_path / "zero", RecorderConfig(online_rules=False)) as rec:
        for _ in range(20):
            out = net(torch.randn(8, 4))
            loss = (out - out).pow(2).mean()  # exactly 0, with a graph
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    assert set(stabscope.load_run(tmp_path / "zero", metrics=["loss"]).value) == {0.0}
    result = check_run(tmp_path / "zero")
    assert "loss-divergence" not in result.failed and found(tmp_path / "zero") == []


def test_a_loss_that_hovers_about_zero_is_a_surrogate_not_a_divergence(tmp_path):
    """A loss centred on zero (a policy gradient's -log pi(a)*A over centred advantages)
    that dips and rises as its entropy bonus does: it changes sign at a third of its steps,
    so its rise is a warning. The same losses 1.0 higher change sign nowhere: an error. The
    share of sign changes is counted here by hand."""
    from stabscope.rules.loss_divergence import sign_changes
    from tests.rule_runs import write

    rng = np.random.default_rng(0)
    trend = np.concatenate([np.linspace(0.0, -0.03, 50), np.linspace(-0.03, 0.04, 150)])
    losses = trend + 0.02 * rng.standard_normal(200)
    share = np.mean(np.sign(losses[1:]) != np.sign(losses[:-1]))
    assert 0.1 < share == pytest.approx(sign_changes(pd.Series(losses)))

    def judged(name: str, values: np.ndarray) -> list:
        rows = [(s, "__run__", "loss", -1, float(v)) for s, v in enumerate(values)]
        found = check_run(write(tmp_path / name, rows)).findings
        return [f for f in found if f.rule == "loss-divergence"]

    (f,) = judged("centred", losses)
    assert f.severity == "warning" and f"changes sign at {share:.0%}" in f.message
    (g,) = judged("shifted", losses + 0.06)
    assert g.severity == "error"
