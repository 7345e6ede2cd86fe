"""The optimizer and scheduler a model script builds are stepped as a training loop would
step them: ReduceLROnPlateau with the step's loss (its `step` takes the metric it watches),
and an error raised inside either is the script's, one `error:` and one `hint:` line with
exit 2 and the run kept as `failed`, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app

runner = CliRunner()

HEAD = """
import torch
import torch.nn.functional as F

def model(cfg):
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

def batches(cfg):
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(16, 4, generator=g)
        yield x, (x[:, 0] > 0).long()

def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
"""

PLATEAU = (
    HEAD
    + """
def optimizer(model, cfg):
    return torch.optim.SGD(model.parameters(), lr=0.5)

def scheduler(opt, cfg):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
"""
)

BROKEN_OPTIMIZER = (
    HEAD
    + """
class Broken(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("clip norm must be positive")

def optimizer(model, cfg):
    return Broken(model.parameters(), lr=0.1)
"""
)


def profile(tmp_path, text: str, steps: int):
    script = tmp_path / "script.py"
    script.write_text(text)
    out = tmp_path / "run"
    res = runner.invoke(app, ["profile", str(script), "--steps", str(steps), "--out", str(out)])
    return res, out


def test_reduce_lr_on_plateau_is_stepped_with_the_loss(tmp_path):
    res, out = profile(tmp_path, PLATEAU, 24)
    assert res.exit_code == 0, res.output
    df = stabscope.load_run(out, metrics=["loss", "lr"])
    loss, lr = (
        df[df.metric == m].sort_values("step").value.to_numpy(float) for m in ("loss", "lr")
    )
    # Reference: torch's own ReduceLROnPlateau fed the recorded losses; the lr recorded at a
    # step is the one that step used (before its scheduler step).
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    used = []
    for value in loss:
        used.append(opt.param_groups[0]["lr"])
        ref.step(float(value))
    assert len(lr) == 24 and np.allclose(lr, used, rtol=1e-6)
    assert lr[-1] < lr[0]  # the loss of a 0.5-lr SGD run plateaus: the lr did drop


def test_an_optimizer_that_raises_is_one_error_line_and_a_failed_run(tmp_path):
    res, out = profile(tmp_path, BROKEN_OPTIMIZER, 5)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback" not in res.output
    error = next(line for line in lines if line.startswith("error:"))
    assert "raised RuntimeError at script.py:" in error
    assert "stepping the optimizer at step 0" in error and "clip norm must be positive" in error
    assert any(line.startswith("hint:") for line in lines)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"]["type"] == "ScriptError"
