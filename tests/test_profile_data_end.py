"""A model script whose batches(cfg) ends before --steps (a one-epoch DataLoader): the run is
as long as the data, and meta.json says why, so that `summary`, `report` and `check` of it
show it and `profile` prints it once."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stabscope.cli import app

runner = CliRunner()

# Three batches of a fixed dataset, as a DataLoader over it yields them for one epoch.
SCRIPT = """
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

def model(cfg):
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

def batches(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(3, (24,), generator=g)), batch_size=8)

def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
"""


def test_a_run_shorter_than_its_steps_keeps_why_in_meta(tmp_path):
    script = tmp_path / "one_epoch.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    res = runner.invoke(app, ["profile", str(script), "--steps", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    note = "batches(cfg) ran out after 3 of 8 steps"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["steps"] == 3 and note in meta["notes"]
    assert res.stderr.count(note) == 1  # the summary's notes, not a second copy
    summary = runner.invoke(app, ["summary", str(out)])
    assert note in summary.stderr
