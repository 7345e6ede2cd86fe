"""A pretraining and a fine-tune in one script (``tests/scripts/two_phases.py``): the fine-tune's
optimizer, over a fresh head, takes over from the pretraining's. The run records both and
says where the last phase began (meta.json ``phases``); the rules judge that phase alone. The
references are the script's own printed losses and the phase boundary it was written with:
judged whole, its healthy fine-tune read as a loss that fell to 0.015 and rose back to 0.77,
a divergence."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import stabscope
from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from stabscope.rules.view import RunView
from stabscope.store import RUN_MODULE
from stabscope.store.run_meta import load_meta
from tests.scripts.harness import run_both

SCRIPT = Path(__file__).parent / "scripts" / "two_phases.py"


def profile(tmp_path, capfd, *args: str):
    run = tmp_path / "run"
    profile_training_script(SCRIPT, list(args), run, RecorderConfig(online_rules=False))
    printed = [float(v) for v in re.findall(r"^step \d+ loss (\S+)$", capfd.readouterr().out, re.M)]
    return run, np.array(printed)


@pytest.mark.parametrize("keep", [False, True])
def test_a_fine_tune_after_a_pretraining_is_judged_from_its_first_step(tmp_path, capfd, keep):
    """Deleted, or kept alive and silent: the first optimizer's phase ends where the new
    one's first step is, step 60."""
    run, printed = profile(tmp_path, capfd, *(["--keep"] if keep else []))
    meta = load_meta(run)
    assert meta.doc["phases"] == [{"step": 0}, {"step": 60, "optimizers": ["Adam"]}]
    assert meta.phase_start == 60
    assert any("a new training phase began at step 60" in n for n in meta.notes)
    loss = RunView.open(run).metrics("loss")
    loss = loss[loss.module == RUN_MODULE].sort_values("step")
    assert loss.step.tolist() == list(range(60, 120))
    np.testing.assert_allclose(loss.value.to_numpy(float), printed[60:], rtol=1e-6)
    rules = {f.rule for f in check_run(run).findings}
    assert "loss-divergence" not in rules and "loss-spike" not in rules


def test_an_optimizer_rebuilt_over_the_same_parameters_continues_the_phase(tmp_path, capfd):
    run, printed = profile(tmp_path, capfd, "--same")
    meta = load_meta(run)
    assert "phases" not in meta.doc and meta.phase_start is None
    loss = RunView.open(run).metrics("loss")
    assert sorted(loss[loss.module == RUN_MODULE].step) == list(range(120))
    assert len(printed) == 120


NEW_HEAD = """
import json, sys
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Sequential(nn.Linear(16, 64), nn.ReLU()), nn.Linear(64, 4))
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
g = torch.Generator().manual_seed(1)
log = []
for step in range(30):  # pretraining: 4 classes
    x = torch.randn(32, 16, generator=g)
    loss = F.cross_entropy(model(x), x[:, :4].argmax(1))
    opt.zero_grad(); loss.backward(); opt.step()
    log.append(loss.item())
del opt
model[0].requires_grad_(False)  # the body frozen, its last gradients left in place
model[1] = nn.Linear(64, 2)  # a new head in the old one's place, a new optimizer over it
opt = torch.optim.SGD(model[1].parameters(), lr=0.05, momentum=0.9)
for step in range(30):  # fine-tune: 2 classes
    x = torch.randn(32, 16, generator=g)
    loss = F.cross_entropy(model(x), (x[:, 5] > 0).long())
    opt.zero_grad(); loss.backward(); opt.step()
    log.append(loss.item())
json.dump(log, open(sys.argv[1], "w"))
"""


def test_a_head_replaced_under_a_new_optimizer_is_no_longer_read(tmp_path):
    """The fine-tune's SGD holds only the new head, none of the parameters recording began
    with: it is the model's optimizer all the same (its lr recorded every step), the old
    head's rows stop where it left, and the frozen body's stale gradients are no parameter
    that an optimizer fails to hold."""
    plain, profiled, run = run_both(tmp_path, NEW_HEAD, RecorderConfig(online_rules=False))
    assert json.loads(profiled.read_text()) == json.loads(plain.read_text())
    lr = stabscope.load_run(run, metrics=["lr"]).groupby("step").value.max()
    assert list(lr.index) == list(range(60))
    assert lr.loc[29] == pytest.approx(2e-3) and lr.loc[30:].to_numpy() == pytest.approx(0.05)
    meta = load_meta(run)
    left = {p["name"]: p.get("left_at") for p in meta.parameters}
    assert left["1.weight"] == left["1.bias"] == 30
    head = stabscope.load_run(run, metrics=["param_norm"])
    assert head[head.module.astype(str) == "1.weight"].step.max() < 30
    body = {p["name"]: p for p in meta.parameters if p["name"].startswith("0.")}
    assert not any(p["trainable"] for p in body.values())
    errors = [f.rule for f in check_run(run).findings if f.severity == "error"]
    assert errors == []
