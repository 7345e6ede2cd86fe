"""``loss-broadcast`` on real training scripts: ``mse_loss`` of an output (B, 1) against
targets (B,) compares every output with every target ((B, B), PyTorch's broadcasting), an
error from the first step, also under bf16 autocast (which copies the output) and for a
model script; matching shapes and a one-sided broadcast (every output against one target
vector) are not reported."""

from __future__ import annotations

import textwrap
import warnings

import pytest

import stabscope
from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from tests.test_cli import invoke

B = 12

SCRIPT = """
import sys
import torch
import torch.nn.functional as F

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
shape, amp = sys.argv[1], sys.argv[2] == "amp"
for step in range(8):
    x = torch.randn(B, 4)
    y = x.sum(1)  # (B,)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(x)  # (B, 1)
        if shape == "bug":
            loss = F.mse_loss(out, y)  # (B, 1) against (B,): (B, B)
        elif shape == "same":
            loss = F.mse_loss(out.squeeze(-1), y)
        else:  # every output against one target vector, (B, 3) against (3,)
            wide = torch.cat([out, 2 * out, out.square()], dim=1)  # (B, 3)
            loss = F.mse_loss(wide, torch.tensor([1.0, 2.0, 3.0]))
    opt.zero_grad()
    loss.backward()
    opt.step()
""".replace("B, ", f"{B}, ").replace("(B,", f"({B},")


def profile(tmp_path, *args: str):
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent(SCRIPT))
    run = tmp_path / "-".join(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the script's own broadcast warning
        profile_training_script(script, list(args), run, RecorderConfig(), budget=8)
    return run


@pytest.mark.parametrize("amp", ["fp32", "amp"])
def test_an_output_against_targets_of_another_shape_is_an_error_from_step_0(tmp_path, amp):
    run = profile(tmp_path, "bug", amp)
    # Output (B, 1) repeated along dim 1, targets (B,) along dim 0 of the (B, B) compared.
    expected = {"function": "mse_loss", "shape": [B, B], "output_dims": [1], "target_dims": [0]}
    assert stabscope.read_meta(run)["loss_broadcast"] == expected
    (found,) = [f for f in check_run(run, until=1).findings if f.rule == "loss-broadcast"]
    assert found.severity == "error" and f"broadcast to {B}x{B}" in found.message


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["same", "one-sided"])
def test_matching_shapes_and_a_one_sided_broadcast_are_not_reported(tmp_path, shape):
    run = profile(tmp_path, shape, "fp32")
    assert "loss_broadcast" not in stabscope.read_meta(run)
    assert [f for f in check_run(run).findings if f.rule == "loss-broadcast"] == []


MODEL_SCRIPT = """
import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {"batch_size": 8}


def model(cfg):
    return nn.Linear(3, 1)


def batches(cfg):
    while True:
        x = torch.randn(cfg.batch_size, 3)
        yield x, x.sum(1)


def loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)
"""


@pytest.mark.slow
def test_a_model_scripts_loss_is_read_before_its_backward(tmp_path):
    script = tmp_path / "reg.py"
    script.write_text(MODEL_SCRIPT)
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = invoke("profile", script, "--steps", 3, "--out", run, "-q")
    assert result.exit_code == 0, result.output
    assert stabscope.read_meta(run)["loss_broadcast"]["shape"] == [8, 8]
    assert invoke("check", run).exit_code == 1
