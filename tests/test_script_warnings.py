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
