"""Training stays bit-identical under stabscope when the forward changes state the version
counters do not show, or that lives outside the buffers. The stability index runs extra
forward passes of the model (at steps 2, 4, 8), and before they were given back:

- quantization-aware training (``prepare_qat``, torch's fused fake-quantize observers): the
  fused kernel moved the observers' min/max and the scale without bumping their versions,
  and observes in eval mode too; the losses drifted from step 3 on;
- a forward that counts its calls in a plain attribute (``self.calls += 1``) to anneal a
  temperature: the extra calls annealed it faster; and one that keeps its last input
  (``self.last = x``).

The reference is the same script run without stabscope, to the bit."""

from __future__ import annotations

import json

import pytest

from stabscope.record.config import RecorderConfig
from tests.scripts.harness import classify_loop, run_both

SCRIPT = """
import json, sys, warnings
import torch
import torch.nn.functional as F
from torch import nn

KIND = {kind!r}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 4)
        self.calls = 0

    def forward(self, x):  # (B, 16) -> (B, 4)
        self.calls += 1
        self.last = x
        tau = max(0.5, 2.0 * 0.97 ** self.calls) if KIND == "counter" else 1.0
        return self.fc2(F.relu(self.fc1(x))) / tau


torch.manual_seed(0)
model = Net().train()
if KIND == "qat":
    import torch.ao.quantization as tq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that it moves to torchao
        model.qconfig = tq.get_default_qat_qconfig("fbgemm")
        tq.prepare_qat(model, inplace=True)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
g = torch.Generator().manual_seed(1)
{loop}log.append(model.calls)
json.dump(log, open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("kind", ["qat", "counter"])
def test_state_a_forward_changes_is_given_back_after_the_index_forwards(tmp_path, kind):
    config = RecorderConfig(sharpness=True)  # extra forward passes at steps 2, 4, 8
    text = SCRIPT.format(kind=kind, loop=classify_loop(16))
    plain, profiled, _ = run_both(tmp_path, text, config, budget=12)
    plain_log, profiled_log = (json.loads(p.read_text()) for p in (plain, profiled))
    assert plain_log[-1] == 12  # the script's own forward calls
    assert profiled_log == plain_log
