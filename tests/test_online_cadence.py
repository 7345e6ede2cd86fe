"""When the online rules judge a run: every row in host memory is read (from memory, next to
the parts, each row once), and a short run whose loss diverges without a NaN is stopped
within a few steps of the first step at which ``loss-divergence`` holds, computed here from
the losses as the rule's documentation defines it."""

from __future__ import annotations

import json
import sys
import warnings
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import stabscope
from stabscope import Recorder
from stabscope.cli import app
from stabscope.drivers.script import ScriptConfig
from stabscope.rules.view import RunView
from stabscope.store.memory import PART_BLOCK, Unwritten
from stabscope.store.writer import Interner
from tests.conftest import ROOT
from tests.script_training import script_training

sys.path.insert(0, str(ROOT / "tests" / "scripts"))
import diverging_finite
import diverging_late

FINITE = ROOT / "tests" / "scripts" / "diverging_finite.py"
#: How many steps after the rule first holds the run may go on: a loss check takes 5-10 ms of
#: CPU and the next waits 49 times that (``rules.online.PAUSE``), 0.25-0.5 s: at most 8-15
#: steps of the script's ~33 ms, 3 measured; 16 allows the slow end. Without the loss check
#: no run stopped.
WITHIN = 16


def noise(x: np.ndarray, w: int) -> float:
    """3 standard deviations of a difference of two medians of w losses, σ from the median
    second difference (0.6745·√6·σ for Gaussian draws)."""
    sigma = np.median(np.abs(np.diff(x, 2))) / (0.6745 * np.sqrt(6)) if len(x) > 2 else 0.0
    return 3 * np.sqrt(2) * 1.2533 * sigma / np.sqrt(w)


def diverged(losses: np.ndarray) -> bool:
    """``loss-divergence`` on the losses so far, as its docs define it (defaults): levels are
    medians over w = max(5, n // 20) losses; start the lower of the first loss and the first
    level, best the lowest level, end the last; an error when the run learned (10% of its
    start) and gave back half of it (and 20% of its best, and 3 noise deviations of the
    losses up to the best), or ends 50% above its start (and 3 noise deviations of all its
    losses above it, in log space for positive losses)."""
    x = losses[np.isfinite(losses)]
    n = len(x)
    if n < 10:
        return False
    w = max(5, n // 20)
    levels = [np.median(x[i - w : i]) for i in range(w, n + 1)]
    at = int(np.argmin(levels))
    best = levels[at]
    start, end = min(x[0], np.median(x[:w])), np.median(x[-w:])
    learned = start - best >= 0.1 * abs(start)
    rise = end - best
    floor = max(0.2 * abs(best), noise(x[: max(at + w, 2 * w)], w))
    if learned and rise >= 0.5 * (start - best) and rise >= floor:
        return True
    if end - start < 0.5 * abs(start):
        return False
    if start > 0 and (x > 0).all():
        return np.log(end / start) >= noise(np.log(x), w)
    return end - start >= noise(x, w)


def first_divergence(losses: np.ndarray) -> int | None:
    """The first step at which ``diverged`` holds on the losses up to it."""
    return next((n - 1 for n in range(1, len(losses) + 1) if diverged(losses[:n])), None)


def run_losses(run) -> np.ndarray:
    loss = stabscope.load_run(run, metrics="loss").sort_values("step")
    assert list(loss.step) == list(range(len(loss)))  # every step's loss, once
    return loss.value.to_numpy(float)


def test_the_reference_first_divergence_of_the_late_diverging_script():
    """The step test_online_verdicts relies on, from the plain training (no recorder)."""
    cfg = Namespace(**diverging_late.CONFIG)
    torch.manual_seed(0)
    net = diverging_late.model(cfg)
    opt = diverging_late.optimizer(net, cfg)
    sched = diverging_late.scheduler(opt, cfg)
    data = diverging_late.batches(cfg)
    losses = []
    for _ in range(104):
        opt.zero_grad(set_to_none=True)
        loss = diverging_late.loss(net, next(data))
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert first_divergence(np.array(losses)) == diverging_late.DIVERGES_AT


def finite_training(**config: float):
    return script_training(diverging_finite, ScriptConfig({**diverging_finite.CONFIG, **config}))


def as_read(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in one order with plain string columns, for comparing two reads."""
    frame = frame.astype({"module": str, "metric": str})
    key = ["metric", "module", "step", "call", "index"]
    return frame[[*key, "value"]].sort_values(key).reset_index(drop=True)


#: What the full check reads here: losses, the flight recorder's every-step rows (on CPU
#: read from its ring before the transfer), the scheduled rows and the lr.
READ = ("loss", "flight_act_rms", "flight_grad_absmax", "act_rms", "param_grad_norm", "lr")


@pytest.mark.parametrize("steps", [37, 62])  # the ring mid-way; after a transfer (step 50)
def test_the_online_rules_read_every_row_in_host_memory_once(tmp_path, steps):
    """Mid-run, the parts and the rows in memory hold exactly the rows of the steps so far
    that the finished run holds: none missing (no part was written for them), none twice."""
    net, step = finite_training(factor=1.0, load_ms=0.0)
    run = tmp_path / "run"
    with Recorder(net, run) as rec:
        for _ in range(steps):
            rec.step(step())
        full, losses = rec._unwritten(), rec._loss_rows()
        parts = rec.writer.parts_written
        for _ in range(20):
            rec.step(step())
    assert 1 <= parts < rec.writer.parts_written  # some rows were on disk, more came later
    assert full.rows > 0
    final = stabscope.load_run(run, metrics=list(READ), phase="train", merge_ranks=True)
    final = as_read(final[final.step < steps])
    seen = as_read(RunView.open(run, memory=full).metrics(*READ))
    pd.testing.assert_frame_equal(seen, final)
    assert set(final.metric) == set(READ)
    # The loss check reads the losses alone, from memory: no part at all.
    view = RunView.open(run, memory=losses)
    loss = final[final.metric == "loss"].reset_index(drop=True)
    pd.testing.assert_frame_equal(as_read(view.metrics("loss")), loss)
    assert view.parts.files == []


def test_a_snapshot_hides_the_later_parts_of_its_own_writer_only(tmp_path):
    names = (Interner(), Interner(), Interner())
    rank1 = Unwritten((), 1, names, next_part=PART_BLOCK + 3, block=PART_BLOCK)
    part = tmp_path.joinpath
    assert not rank1.hides(part(f"part-{PART_BLOCK + 2}.parquet"))  # on disk before it
    assert rank1.hides(part(f"part-{PART_BLOCK + 3}.parquet"))  # written after: its rows
    assert not rank1.hides(part("part-000007.parquet"))  # rank 0's
    assert not rank1.hides(part(f"part-{2 * PART_BLOCK}.parquet"))  # rank 2's
    assert not rank1.hides(part("notes.parquet"))


def stopped_run(run, steps: int, **config: float) -> dict:
    net, step = finite_training(**config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the verdict's warning: what is checked here
        with Recorder(net, run, on_error="stop") as rec:
            for _ in range(steps):
                rec.step(step())
                if rec.should_stop:
                    break
    return json.loads((run / "meta.json").read_text())


def assert_stopped_soon_after_it_diverged(run, m: dict) -> None:
    assert m["status"] == "stopped", m["online"]
    by = m["stopped_by"]
    assert by["rule"] == "loss-divergence" and m["steps"] == by["seen_at"] + 1
    first = first_divergence(run_losses(run))
    assert first is not None and first <= by["step"] <= by["seen_at"] <= first + WITHIN
    assert m["online"]["loss_checks"] >= 1


@pytest.mark.slow
def test_a_short_run_whose_loss_diverges_stops_within_a_few_steps(tmp_path):
    """80 steps of ~33 ms; the loss rises x1.2 a step from step 40 and never overflows.
    Before the loss check its losses reached the rules at the recorded steps (every 25th)
    and flight transfers (every 50th), written as a part at most every few seconds: this
    run trained to its end."""
    run = tmp_path / "run"
    m = stopped_run(run, 80)
    assert_stopped_soon_after_it_diverged(run, m)


@pytest.mark.slow
def test_profile_on_error_stop_stops_a_short_diverging_run_with_exit_1(tmp_path):
    run = tmp_path / "run"
    args = ("profile", FINITE, "--steps", 90, "--on-error", "stop", "--out", run, "-q")
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    m = json.loads((run / "meta.json").read_text())
    assert_stopped_soon_after_it_diverged(run, m)
    by = m["stopped_by"]
    assert f"stopped after step {by['seen_at']} by rule loss-divergence" in result.output


@pytest.mark.slow
def test_a_healthy_short_run_is_judged_every_few_steps_and_never_stops(tmp_path):
    run = tmp_path / "run"
    m = stopped_run(run, 60, factor=1.0, load_ms=15.0)
    assert m["status"] == "complete" and m["steps"] == 60 and "stopped_by" not in m
    assert m["online"]["findings"] == []
    assert first_divergence(run_losses(run)) is None
    # ~1 s of training: a loss check every ~0.1 s (module docstring of rules/online.py).
    assert m["online"]["loss_checks"] >= 3
