"""``loss-divergence`` read against the constant prediction's loss of each step's own targets
(``loss_constant``). A regression whose targets' scale grows 6x after it has learned (a value
network's bootstrapped targets grow so) raises its loss in proportion: over its bar it did not
rise, a warning. The same regression whose learning rate jumps x1000 un-learns against the
same bar: an error. Each verdict is also computed here from the recorded rows with the rule's
own reading (``divergence``), on the loss and on loss / bar."""

from __future__ import annotations

import pytest

import stabscope
from stabscope import RecorderConfig
from stabscope.drivers.zerocode import profile_training_script
from stabscope.rules import check_run
from stabscope.rules.loss_divergence import LOSS_DIVERGENCE, divergence
from stabscope.store import RUN_MODULE

SCRIPT = """
import sys
import time
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
g = torch.Generator().manual_seed(1)
w = torch.tensor([1.0, -2.0, 0.5, 1.5])
for step in range(240):
    scale = 1.0 + 5.0 * min(max(step - 80, 0) / 80, 1.0) if sys.argv[1] == "grow" else 1.0
    if sys.argv[1] == "jump" and step == 120:
        for group in opt.param_groups:
            group["lr"] *= 1000
    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)  # a data loader's wait
    x = torch.randn(64, 4, generator=g)
    y = scale * (torch.sin(x @ w) + 0.3 * torch.randn(64, generator=g))
    loss = F.mse_loss(net(x).squeeze(1), y)
    opt.zero_grad(); loss.backward(); opt.step()
"""


def series(run, metric):
    df = stabscope.load_run(run, modules=[RUN_MODULE], metrics=[metric])
    return df.groupby("step").value.mean().sort_index()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["grow", "jump"])
def test_a_loss_that_grows_with_its_targets_is_a_warning(tmp_path, case):
    script = tmp_path / "targets.py"
    script.write_text(SCRIPT)
    run = tmp_path / case
    profile_training_script(script, [case], run, RecorderConfig(online_rules=False), budget=240)
    (found,) = [f for f in check_run(run).findings if f.rule == "loss-divergence"]
    loss, bar = series(run, "loss"), series(run, "loss_constant")
    params = LOSS_DIVERGENCE.defaults
    assert divergence(loss, params) is not None  # the loss itself reads as diverged
    relative = divergence(loss / bar, params)
    if case == "grow":
        assert relative is None and found.severity == "warning"
        assert "targets' spread grew" in found.message
        assert bar.iloc[-20:].median() > 20 * bar.iloc[40:60].median()
    else:
        assert relative is not None and found.severity == "error"


@pytest.mark.slow
def test_while_it_trains_targets_that_grow_do_not_stop_the_run(tmp_path):
    """The same growing targets judged while the run trains, under ``--on-error stop``, 10 ms
    a step so that the loss checks run through the rise: each check reads every step's bar
    beside its loss (those synced and those still in host memory), and none stops it."""
    script = tmp_path / "targets.py"
    script.write_text(SCRIPT)
    run = tmp_path / "grow"
    profile_training_script(
        script, ["grow", "0.01"], run, RecorderConfig(), budget=240, on_error="stop"
    )
    meta = stabscope.read_meta(run)
    assert meta["status"] == "complete" and meta["steps"] == 240
    assert meta["online"]["loss_checks"] >= 2
    live = [f["rule"] for f in meta["online"].get("findings", [])]
    assert "loss-divergence" not in live
