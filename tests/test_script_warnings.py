"""The script's own warnings under zero-code mode: raised at the script's line, as often as
without stabscope.

``mse_loss`` of an output (B, 1) against a target (B,) warns that it broadcasts, with
``stacklevel=2``: the warning names the line that called it. Under stabscope the first
step's loss calls pass through the loss trace's ``TorchFunctionMode``, and the stability
index replays them at each measurement: neither may show the warning as stabscope's, or
show it more often than the script's own calls do."""

from __future__ import annotations

import runpy
import textwrap
import warnings

import torch

from stabscope.drivers.zerocode import profile_training_script
from stabscope.drivers.zerocode.runner import as_main
from stabscope.record.config import RecorderConfig

SCRIPT = """
import torch
import torch.nn.functional as F

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(12):
    x = torch.randn(8, 4)
    y = x.sum(1)
    loss = F.mse_loss(model(x), y)  # (8, 1) against (8,): broadcast to (8, 8)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""
LINE = 11  # the mse_loss line of SCRIPT (after dedent; line 1 is empty)


def broadcast_warnings(run) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [w for w in caught if "target size" in str(w.message)]


def test_the_scripts_warning_names_its_line_as_often_as_without_stabscope(tmp_path):
    script = tmp_path / "bcast.py"
    script.write_text(textwrap.dedent(SCRIPT))

    def plain() -> None:
        with as_main(script, []):
            runpy.run_path(str(script), run_name="__main__")

    def profiled() -> None:
        config = RecorderConfig(sharpness=True)  # the index replays the loss's calls
        profile_training_script(script, [], tmp_path / "run", config, budget=12)

    without = broadcast_warnings(plain)
    assert len(without) == 12 and {(w.filename, w.lineno) for w in without} == {(str(script), LINE)}
    torch.manual_seed(0)
    under = broadcast_warnings(profiled)
    assert [(w.filename, w.lineno) for w in under] == [(w.filename, w.lineno) for w in without]


MODEL_WARNS = """
import warnings
import torch


class Warns(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)

    def forward(self, x):
        warnings.warn("the model's own warning")  # as nn.MultiheadAttention's mask warning
        return self.fc(x).squeeze(1)


torch.manual_seed(0)
model = Warns()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(12):
    x = torch.randn(8, 4)
    loss = (model(x) - x.sum(1)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_the_models_own_warning_is_not_raised_again_by_stabscopes_replays_of_it(tmp_path):
    """The probe forward and the stability index call the model again on a stored batch: a
    warning its forward raises is the script's, shown by the script's own calls, and not once
    more per replay (under an ``always`` filter, as many as without stabscope)."""
    script = tmp_path / "warns.py"
    script.write_text(textwrap.dedent(MODEL_WARNS))

    def caught(run) -> int:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run()
        return sum("the model's own warning" in str(w.message) for w in seen)

    def plain() -> None:
        with as_main(script, []):
            runpy.run_path(str(script), run_name="__main__")

    def profiled() -> None:
        config = RecorderConfig(sharpness=True)
        profile_training_script(script, [], tmp_path / "run", config, budget=12)

    assert caught(plain) == 12
    torch.manual_seed(0)
    assert caught(profiled) == 12
