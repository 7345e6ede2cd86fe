"""``log_to="trainer"`` under a real transformers ``Trainer`` (CPU, a tiny GPT-2 built from a
config, no downloads): the live series go where ``report_to`` logs. TensorBoard: an event file
of stabscope's own in the directory the Trainer's TensorBoardCallback writes to, read back with
TensorBoard's reader; W&B (offline): the WandbCallback's run, read back from its ``.wandb``
file. Both equal the run table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import Trainer, TrainingArguments

import stabscope
from stabscope.integrations.hf import StabscopeCallback
from tests.test_integrations_hf import dataset, tiny_gpt2
from tests.test_live import assert_wandb_rows_are_the_table, live_expected

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

STEPS = 6


def train_reporting(tmp_path: Path, report_to: list[str]) -> Path:
    """Train the tiny GPT-2 for STEPS steps with ``report_to``; the run directory."""
    run = tmp_path / "run"
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    schedule = stabscope.Schedule(dense=3, every=2)
    callback = StabscopeCallback(run, schedule=schedule, log_to="trainer")
    Trainer(model=tiny_gpt2(), args=args, train_dataset=dataset(), callbacks=[callback]).train()
    assert stabscope.read_meta(run)["status"] == "complete"
    return run


def run_table(run: Path):
    frame = stabscope.load_run(run, phase="train")
    return frame[frame.call == 0].astype({"module": str, "metric": str})


@pytest.mark.slow
def test_hf_tensorboard_gets_the_live_series_next_to_the_trainers(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    run = train_reporting(tmp_path, ["tensorboard"])
    # The Trainer's default logging directory (output_dir/runs/DATE_HOST): one directory,
    # holding the Trainer's event file and stabscope's.
    (logdir,) = (tmp_path / "trainer" / "runs").iterdir()
    assert len(list(logdir.glob("events.out.tfevents.*.stabscope"))) == 1
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "train/loss" in tags  # the Trainer's own
    ours = {t for t in tags if t.startswith("stabscope/")}
    assert {"stabscope/loss", "stabscope/lr", "stabscope/act_rms/transformer.h.1"} <= ours
    frame = run_table(run)
    for tag in sorted(ours):
        events = acc.Scalars(tag)
        want_steps, want = live_expected(frame, tag.removeprefix("stabscope/"))
        assert [e.step for e in events] == want_steps, tag
        np.testing.assert_allclose([e.value for e in events], want, rtol=2e-6, err_msg=tag)
    assert [e.step for e in acc.Scalars("stabscope/loss")] == list(range(STEPS))


@pytest.mark.slow
def test_hf_tensorboard_logging_dir_from_the_environment(tmp_path: Path, monkeypatch):
    """TENSORBOARD_LOGGING_DIR, the Trainer's override of its logging directory."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    run = train_reporting(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    loss = acc.Scalars("stabscope/loss")
    want_steps, want = live_expected(run_table(run), "loss")
    assert [e.step for e in loss] == want_steps == list(range(STEPS))
    np.testing.assert_allclose([e.value for e in loss], want, rtol=2e-6)
    assert "train/loss" in acc.Tags()["scalars"]


@pytest.mark.slow
def test_hf_wandb_gets_the_live_series_in_the_trainers_run(tmp_path: Path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from tests.wandb_records import history, offline_run

    for key, value in (("MODE", "offline"), ("DIR", str(tmp_path)), ("SILENT", "true")):
        monkeypatch.setenv(f"WANDB_{key}", value)
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    wandb.teardown()  # wandb keeps its settings (the directory) in a process-wide singleton
    try:
        run = train_reporting(tmp_path, ["wandb"])
        wandb.finish()  # the WandbCallback leaves its run open
        rows = history(offline_run(tmp_path))  # one .wandb file: the Trainer's run, shared
    finally:
        wandb.teardown()
    assert any("train/loss" in r for r in rows)  # the Trainer's own
    logged = {k for r in rows for k in r if k.startswith("stabscope/")} - {"stabscope/step"}
    assert {"stabscope/loss", "stabscope/act_rms/transformer.h.1"} <= logged
    frame = run_table(run)
    assert_wandb_rows_are_the_table(rows, frame, logged)
