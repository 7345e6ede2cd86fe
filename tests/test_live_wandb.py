"""W&B, offline (no network here): the live series and findings in the run's own ``.wandb``
file, read back (tests/wandb_records.py), equal the run table; a W&B run finished under a
training run warns once and every Parquet row is still written."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stabscope.errors import StabscopeWarning
from stabscope.store import count_rows, load_meta, load_run
from tests.test_live import assert_wandb_rows_are_the_table, train_gpt
from tests.wandb_records import alerts, history, offline_run

wandb = pytest.importorskip("wandb")


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    wandb.teardown()  # wandb keeps its settings (the directory) in a process-wide singleton
    yield tmp_path
    wandb.teardown()


@pytest.mark.slow
def test_wandb_live_series_and_alerts_equal_the_run_table(wandb_dir: Path):
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StabscopeWarning)
        train_gpt(
            wandb_dir / "run", log_to="wandb:stabscope-test", on_finding=seen.append, nan_at=6
        )
    rows = history(offline_run(wandb_dir))
    frame = load_run(wandb_dir / "run", phase="train")
    frame = frame[frame.call == 0].astype({"module": str, "metric": str})
    logged = {k for row in rows for k in row if k.startswith("stabscope/")} - {"stabscope/step"}
    assert {"stabscope/loss", "stabscope/act_rms/blocks.1"} <= logged
    steps = [row["stabscope/step"] for row in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # in order, once each
    assert_wandb_rows_are_the_table(rows, frame, logged)
    found = alerts(offline_run(wandb_dir))
    assert seen and len(found) == len(seen)
    assert seen[0].rule in found[0].title and seen[0].message in found[0].text
    assert found[0].level == ("ERROR" if seen[0].severity == "error" else "WARN")


@pytest.mark.slow
def test_a_wandb_run_finished_mid_run_warns_once_and_loses_no_row(wandb_dir: Path):
    import torch

    import stabscope
    from tests.conftest import sample_gpt

    model, forward = sample_gpt("post", depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = stabscope.RecorderConfig(schedule=stabscope.Schedule(3, 5), flight_every=4)
    user_run = wandb.init(project="user")  # the user's own run: stabscope logs into it
    with (
        pytest.warns(StabscopeWarning, match="live logging to wandb") as caught,
        stabscope.Recorder(model, wandb_dir / "run", cfg, log_to="wandb") as rec,
    ):
        for step in range(12):
            if step == 6:
                user_run.finish()  # the dashboard goes away under the training run
            loss = forward(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    assert sum("live logging" in str(w.message) for w in caught) == 1
    meta = load_meta(wandb_dir / "run")
    assert meta["status"] == "complete" and meta["steps"] == 12
    loss = load_run(wandb_dir / "run", metrics=["loss"])
    assert sorted(loss.step) == list(range(12))
    assert meta["rows"] == count_rows(wandb_dir / "run")
    rows = history(offline_run(wandb_dir))
    sent = [r["stabscope/step"] for r in rows if "stabscope/loss" in r]
    assert sent == list(range(len(sent))) and 3 <= len(sent) <= 6  # until the run finished


def test_export_to_wandb_writes_the_curated_series_and_findings(wandb_dir: Path):
    from typer.testing import CliRunner

    from stabscope.cli import app
    from stabscope.export.series import select
    from tests.report_runs import FINDINGS, write_run

    run = write_run(wandb_dir / "r", layers=3, steps=range(4), findings=FINDINGS)
    res = CliRunner().invoke(app, ["export", str(run), "--to", "wandb", "-o", str(wandb_dir)])
    assert res.exit_code == 0, res.output
    path = offline_run(wandb_dir)
    assert str(path.parent) in res.stderr and "wandb sync" in res.stderr
    rows = history(path)
    for series in select(str(run), load_meta(run)).series:
        got = [(r["_step"], r[series.tag]) for r in rows if series.tag in r]
        assert [s for s, _ in got] == series.steps.tolist(), series.tag
        values = np.array([math.nan if v == "NaN" else v for _, v in got], np.float64)
        np.testing.assert_allclose(values, series.values, rtol=1e-6, err_msg=series.tag)
    assert len(alerts(path)) == len(FINDINGS)


@pytest.mark.slow
@pytest.mark.parametrize("blocked", ["torch", "wandb"])
def test_export_to_wandb_needs_no_torch_and_says_how_without_wandb(wandb_dir: Path, blocked):
    import json

    from tests.report_runs import FINDINGS, write_run
    from tests.test_export import EXPORT_BLOCKED
    from tests.test_import_guards import run_blocked

    run = write_run(wandb_dir / "r", layers=2, steps=range(2), findings=FINDINGS)
    out = json.loads(run_blocked(blocked, EXPORT_BLOCKED, str(run), str(wandb_dir / "o"), "wandb"))
    assert out["torch"] is False
    if blocked == "torch":
        assert out["code"] == 0, out["stderr"]
        assert history(offline_run(wandb_dir / "o"))
    else:
        lines = out["stderr"].strip().splitlines()
        assert out["code"] == 2 and lines == [
            "error: wandb is not installed",
            "hint: pip install 'stabscope[wandb]' (or pip install wandb)",
        ]


PROFILE_BLOCKED = """
import json, sys
from typer.testing import CliRunner
from stabscope.cli import app
res = CliRunner().invoke(app, ["profile", sys.argv[1], "--steps", "2", "--out", sys.argv[2],
                               "--log-to", sys.argv[3]])
print(json.dumps({"code": res.exit_code, "stderr": res.stderr}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, blocked, line",
    [
        ("tensorbord:tb", "nothing", "error: unknown --log-to target 'tensorbord:tb'"),
        ("wandb", "wandb", "error: wandb is not installed"),
        ("tensorboard:tb", "tensorboard", "error: tensorboard is not installed"),
    ],
)
def test_profile_log_to_bad_target_or_missing_extra_is_one_line_and_exit_2(
    tmp_path: Path, target, blocked, line
):
    import json

    from tests.conftest import ROOT
    from tests.test_import_guards import run_blocked

    script = ROOT / "sample_models" / "mlp.py"
    out = json.loads(
        run_blocked(blocked, PROFILE_BLOCKED, str(script), str(tmp_path / "run"), target)
    )
    lines = out["stderr"].strip().splitlines()
    assert out["code"] == 2 and lines[0] == line and lines[1].startswith("hint: ")
    assert "pip install" in lines[1] or "tensorboard:DIR" in lines[1]
    assert not (tmp_path / "run").exists()
