"""Optimizers that join or sit beside the recorded model.

- A second model trained after the first (a student after its teacher): the run records the
  first, and a note says the other training was not recorded (how many steps, from when).
- A second optimizer over the recorded model's own parameters, or over adapters put into
  its modules later (LoRA), trains the model: its steps are the run's.
- An optimizer built and never stepped (over weights frozen since) holds no step open: each
  step's recorded loss is the script's own loss of that step."""

from __future__ import annotations

import json

import pytest

import stabscope
from stabscope import RecorderConfig
from stabscope.drivers.zerocode import profile_training_script
from stabscope.rules import check_run

TWO_PHASES = """
import sys
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
opt = torch.optim.Adam(teacher.parameters(), 1e-2)
for step in range(30):
    x = torch.randn(32, 4)
    loss = F.cross_entropy(teacher(x), (x[:, 0] > 0).long())
    opt.zero_grad(); loss.backward(); opt.step()
if sys.argv[1] == "student":
    second = torch.optim.SGD(student.parameters(), 0.1)
    for step in range(20):
        x = torch.randn(32, 4)
        with torch.no_grad():
            target = teacher(x).softmax(1)
        loss = F.kl_div(student(x).log_softmax(1), target, reduction="batchmean")
        second.zero_grad(); loss.backward(); second.step()
else:  # a second optimizer over the same model: its steps are the run's
    second = torch.optim.SGD(teacher.parameters(), 0.01)
    for step in range(20):
        x = torch.randn(32, 4)
        loss = F.cross_entropy(teacher(x), (x[:, 0] > 0).long())
        second.zero_grad(); loss.backward(); second.step()
"""


def test_a_second_model_trained_after_the_first_is_named_in_a_note(tmp_path):
    script = tmp_path / "phases.py"
    script.write_text(TWO_PHASES)
    config = RecorderConfig(online_rules=False)
    profile_training_script(script, ["student"], tmp_path / "student", config)
    meta = json.loads((tmp_path / "student" / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["steps"] == 30
    (note,) = [n for n in meta["notes"] if n.startswith("another optimizer")]
    assert "(SGD) stepped 20 times from step 30" in note and "not recorded" in note
    assert meta["unrecorded_training"] == [{"optimizer": "SGD", "steps": 20, "from_step": 30}]
    # The gate says so too: the verdict is on the teacher's training alone.
    (said,) = [f for f in check_run(tmp_path / "student").findings if f.rule == "run-status"]
    assert said.severity == "warning" and "stepped 20 times from step 30" in said.message
    profile_training_script(script, ["same"], tmp_path / "same", config)
    meta = json.loads((tmp_path / "same" / "meta.json").read_text())
    # Its steps are the run's (the one at the hand-over, where both optimizers own the
    # model for a step, is merged into the next: StepOwners).
    assert meta["steps"] >= 49
    assert not [n for n in meta["notes"] if n.startswith("another optimizer")]
    assert "unrecorded_training" not in meta


LORA = """
import sys
import torch
import torch.nn.functional as F
from torch import nn

class Adapted(nn.Module):
    def __init__(self, base, rank=2):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(0.1 * torch.randn(rank, base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.a.T @ self.b.T

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
pretrain = torch.optim.Adam(model.parameters(), 1e-2)
steps = int(sys.argv[2])
g = torch.Generator().manual_seed(1)
for step in range(steps):
    if sys.argv[1] == "idle" and step == 0:
        model.requires_grad_(False)  # fine-tune only the adapters; pretrain never steps
        model[0], model[2] = Adapted(model[0]), Adapted(model[2])
        tune = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-2)
    if sys.argv[1] == "lora" and step == steps // 2:
        with torch.no_grad():
            model(torch.randn(4, 6))  # a look at the base model first
        model.requires_grad_(False)
        model[0], model[2] = Adapted(model[0]), Adapted(model[2])
        tune = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-2)
    x = torch.randn(32, 6, generator=g)
    loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
    opt = pretrain if sys.argv[1] == "lora" and step < steps // 2 else tune
    opt.zero_grad(); loss.backward(); opt.step()
    print("LOSS", step, repr(loss.item()))
"""


def _script_losses(out: str) -> list[float]:
    return [float(line.split()[2]) for line in out.splitlines() if line.startswith("LOSS")]


def test_adapters_and_an_idle_optimizer_keep_every_step(tmp_path, capfd):
    """LoRA half-way (after a no_grad look at the base model): all 40 steps recorded, each
    with the script's loss; adapters from the start beside an optimizer that never steps:
    the same (this merged each step with the next before, one step short)."""
    script = tmp_path / "lora.py"
    script.write_text(LORA)
    config = RecorderConfig(online_rules=False)
    for case in ("lora", "idle"):
        run = tmp_path / case
        capfd.readouterr()
        profile_training_script(script, [case, "40"], run, config)
        printed = _script_losses(capfd.readouterr().out)
        meta = json.loads((run / "meta.json").read_text())
        assert meta["steps"] == 40 and len(printed) == 40, case
        recorded = stabscope.load_run(run, metrics=["loss"]).sort_values("step")
        assert recorded.value.tolist() == pytest.approx(printed, rel=1e-6), case
        assert "players" not in meta
        assert not [n for n in meta["notes"] if n.startswith("another optimizer")]
