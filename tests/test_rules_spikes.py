"""The loss-spike and grad-norm-spike rules on real recorded runs of the sample GPT: a healthy
run gives no finding; the same run with one corrupt batch (uniform random tokens) gives both,
at that step. The script clips at max_norm 1, as nanoGPT does: the gradient spike is seen only
before the clip, and the message says so; without the clip it speaks of no clipping. Plus the
z-score itself against a direct computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import stabscope
from stabscope.drivers.script import ScriptConfig
from stabscope.rules import check_run
from stabscope.rules.spikes import DEFAULTS, LOSS_SPIKE, _finding, spikes

STEPS, CORRUPT = 200, 150


def record(run_dir, corrupt_at: int | None, clip: bool = True) -> None:
    import gpt

    cfg = ScriptConfig(gpt.CONFIG | {"depth": 2, "width": 32, "seq_len": 16, "batch_size": 8})
    torch.manual_seed(0)
    model, data = gpt.model(cfg), gpt.batches(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = stabscope.Schedule(dense=2, every=50)
    with stabscope.Recorder(model, run_dir, preset="cheap", schedule=schedule) as rec:
        for step in range(STEPS):
            batch = next(data)
            if step == corrupt_at:
                batch = torch.randint(cfg.vocab, batch.shape, generator=torch.Generator())
            loss = gpt.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            rec.step(loss)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spikes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    try:
        record(root / "healthy", None)
        record(root / "spiked", CORRUPT)
        record(root / "unclipped", CORRUPT, clip=False)
    finally:
        torch.set_num_threads(threads)
    return root / "healthy", root / "spiked", root / "unclipped"


def spike_findings(run_dir) -> dict[str, stabscope.Finding]:
    found = check_run(run_dir).findings
    return {f.rule: f for f in found if f.rule in ("loss-spike", "grad-norm-spike")}


@pytest.mark.slow
def test_a_healthy_run_has_no_spike(runs):
    assert spike_findings(runs[0]) == {}


@pytest.mark.slow
def test_one_corrupt_batch_is_a_loss_and_a_gradient_spike_at_its_step(runs):
    found = spike_findings(runs[1])
    assert set(found) == {"loss-spike", "grad-norm-spike"}
    assert found["loss-spike"].step == found["grad-norm-spike"].step == CORRUPT
    assert found["grad-norm-spike"].value > DEFAULTS["z"]
    # The clip hides it from what the optimizer received.
    clipped = stabscope.load_run(runs[1], metrics=["grad_norm_clipped"]).value
    assert clipped.max() <= 1.0 + 1e-5
    assert "the gradient norm before clipping" in found["grad-norm-spike"].message


@pytest.mark.slow
def test_a_spike_in_a_run_without_a_clip_is_not_said_to_be_before_clipping(runs):
    found = spike_findings(runs[2])["grad-norm-spike"]
    assert found.step == CORRUPT
    assert stabscope.load_run(runs[2], metrics=["grad_norm_clipped"]).empty
    assert "clipping" not in found.message
    assert found.message.startswith("the gradient norm ")


def test_z_score_against_a_direct_computation():
    rng = np.random.default_rng(0)
    values = 3.0 + 0.1 * rng.standard_normal(300)
    values[[40, 250]] += [0.3, 2.0]  # z ~3 (noise) and z ~20 (a spike)
    values[230] = np.nan  # left out of every window
    series = pd.Series(values, index=np.arange(300) * 2)  # steps need not be consecutive
    found = spikes(series, {**DEFAULTS, "min_rise": 0.1})
    assert found.step.tolist() == [500]
    before = values[:250]
    finite = before[np.isfinite(before)][-int(DEFAULTS["window"]) :]
    z = (values[250] - finite.mean()) / finite.std()
    assert found.z.iloc[0] == pytest.approx(z, rel=1e-9)
    # A rise below min_rise is not a spike, however large z is.
    assert spikes(series, {**DEFAULTS, "min_rise": 1.0}).empty


def test_a_flat_window_then_a_jump_is_a_spike():
    series = pd.Series([2.0] * 30 + [2.5])
    found = spikes(series, {**DEFAULTS, "min_rise": 0.1})
    assert found.step.tolist() == [30] and found.z.iloc[0] == np.inf


def test_an_early_spike_names_the_steps_its_window_held():
    """At step 29 a window of 64 holds the 29 values before it: the z-score and the message
    read those, not 64."""
    rng = np.random.default_rng(1)
    values = 3.0 + 0.1 * rng.standard_normal(60)
    values[29] += 2.0
    found = spikes(pd.Series(values), {**DEFAULTS, "min_rise": 0.1})
    assert found.step.tolist() == [29] and found.seen.iloc[0] == 29
    z = (values[29] - values[:29].mean()) / values[:29].std()
    assert found.z.iloc[0] == pytest.approx(z, rel=1e-9)
    message = _finding(LOSS_SPIKE, "the loss", found, {**DEFAULTS, "min_rise": 0.1}, "").message
    assert "the previous 29 steps" in message


def test_log_z_score_against_a_direct_computation():
    """Over logarithms: z is the log value's distance from the window's mean log in their
    std, ``mean`` the geometric mean; a zero norm is left out of every window. Over a window
    whose values spread ±12% about their mean, a 1.86x blip is 7.4 raw deviations and 5.4 log
    ones (ln 1.86 against the log spread): a spike on raw values only."""
    rng = np.random.default_rng(2)
    values = 0.4 * np.exp(0.3 * rng.standard_normal(200))  # log-normal noise, σ = 0.3
    values[120] = 0.0
    values[150] = 0.4 * 20.0  # 20x the scale: ln 20 / 0.3 ≈ 10 deviations
    series = pd.Series(values)
    p = {**DEFAULTS, "min_rise": 0.5, "log": 1.0}
    found = spikes(series, p)
    assert found.step.tolist() == [150]
    window = np.log(values[:150][values[:150] > 0][-int(DEFAULTS["window"]) :])
    z = (np.log(values[150]) - window.mean()) / window.std()
    assert found.z.iloc[0] == pytest.approx(z, rel=1e-9)
    assert found["mean"].iloc[0] == pytest.approx(np.exp(window.mean()), rel=1e-9)
    blip = pd.Series([0.38, 0.48] * 32 + [0.80])  # mean 0.43, std 0.05
    raw = spikes(blip, {**p, "log": 0.0})
    assert raw.step.tolist() == [64] and raw.z.iloc[0] == pytest.approx(0.37 / 0.05, rel=1e-9)
    logs = np.log([0.38, 0.48])
    assert (np.log(0.80) - logs.mean()) / logs.std() < DEFAULTS["z"] < raw.z.iloc[0]
    assert spikes(blip, p).empty


def test_a_spike_above_a_negative_mean_is_said_as_a_difference():
    """A loss below zero (a flow's NLL) that jumps to above it: the ratio to a negative mean
    (-2x) would read as a fall; the message gives the rise itself."""
    values = [-0.02, -0.018] * 32 + [0.036]
    found = spikes(pd.Series(values), {**DEFAULTS, "min_rise": 0.1})
    assert found.step.tolist() == [64]
    message = _finding(LOSS_SPIKE, "loss", found, {**DEFAULTS, "min_rise": 0.1}, "").message
    assert f"({0.036 - np.mean(values[:64]):+.3g})" in message and "x)" not in message
