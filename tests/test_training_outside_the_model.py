"""A script that trains a second model after the first (a student after its teacher): the run
records the first model, the one the script trained first, and says in a note that the other
training was not recorded: how many steps, from which step. An optimizer over the recorded
model's own parameters, even one built later, is not such a case."""

from __future__ import annotations

import json

from stabscope import RecorderConfig
from stabscope.drivers.zerocode import profile_training_script

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
    profile_training_script(script, ["same"], tmp_path / "same", config)
    meta = json.loads((tmp_path / "same" / "meta.json").read_text())
    # Its steps are the run's (the one at the hand-over, where both optimizers own the
    # model for a step, is merged into the next: StepOwners).
    assert meta["steps"] >= 49
    assert not [n for n in meta["notes"] if n.startswith("another optimizer")]
