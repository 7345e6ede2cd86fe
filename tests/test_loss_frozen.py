"""Rule ``loss-frozen`` on real training: a DPO step whose reference model is the policy
itself. The log-ratio differences are exactly 0, so the loss is −log σ(0) = ln 2 at every
step (the reference: ``math.log(2)``), while the gradient of the policy against its own
detached copy still moves the weights (the script checks they moved). With the reference a
frozen copy, as DPO builds it, the loss moves and nothing is found; a hinge loss at its floor
(exactly 0 while weight decay moves the weights) is not frozen either."""

from __future__ import annotations

import json
import math

import pytest

from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from tests.scripts.harness import run_both

DPO = """
import copy, json, sys
import torch
import torch.nn.functional as F
from torch import nn

KIND = {kind!r}
torch.manual_seed(0)
policy = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 5))
reference = policy if KIND == "same" else copy.deepcopy(policy).requires_grad_(False)
opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.1)
g = torch.Generator().manual_seed(1)
start = [p.detach().clone() for p in policy.parameters()]
losses = []


def logp(model, x, y):
    return model(x).log_softmax(-1).gather(1, y[:, None]).squeeze(1)


for step in range(30):
    x = torch.randn(64, 8, generator=g)
    chosen, rejected = x[:, :5].argmax(1), x[:, :5].argmin(1)
    if KIND == "hinge":  # a margin loss already met by a wide margin: exactly 0
        margin = logp(policy, x, chosen) - logp(policy, x, rejected)
        loss = F.relu(-100.0 - margin).mean()
    else:
        with torch.no_grad():
            ref = logp(reference, x, chosen) - logp(reference, x, rejected)
        pol = logp(policy, x, chosen) - logp(policy, x, rejected)
        loss = -F.logsigmoid(0.5 * (pol - ref)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
moved = any(not torch.equal(a, b) for a, b in zip(start, policy.parameters()))
json.dump({{"losses": losses, "moved": moved}}, open(sys.argv[1], "w"))
"""


def frozen(tmp_path, kind: str) -> tuple[list, dict]:
    _, log, run = run_both(tmp_path, DPO.format(kind=kind), RecorderConfig())
    found = [f for f in check_run(run).findings if f.rule == "loss-frozen"]
    return found, json.loads(log.read_text())


@pytest.mark.slow
def test_a_reference_that_is_the_policy_freezes_the_loss_at_ln_2(tmp_path):
    found, seen = frozen(tmp_path, "same")
    assert seen["moved"] and len(set(seen["losses"])) == 1
    assert seen["losses"][0] == pytest.approx(math.log(2), abs=1e-7)
    (f,) = found
    assert f.severity == "error" and f.value == len(seen["losses"])
    assert f"the loss is {seen['losses'][0]:.7g} at every one of its 30 steps" in f.message


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["copy", "hinge"])
def test_a_frozen_copy_or_a_loss_at_its_floor_is_not_frozen(tmp_path, kind):
    found, seen = frozen(tmp_path, kind)
    assert seen["moved"] and found == []
    if kind == "hinge":
        assert set(seen["losses"]) == {0.0}
    else:
        assert len(set(seen["losses"])) > 1


def test_a_bfloat16_loss_needs_a_longer_streak(tmp_path):
    """A loss computed in bfloat16 moves in steps of 0.4%: 30 equal values of it, with the
    weights moving, may be a slow fine-tune; 200 may not."""
    import torch

    from tests.rule_runs import write

    value = float(torch.tensor(math.log(2)).bfloat16().float())  # 0.69140625

    def judged(name: str, steps: int) -> list:
        rows = [(s, "__run__", "loss", -1, value) for s in range(steps)]
        rows += [(s, "0.weight", "update_norm", -1, 1e-3) for s in range(0, steps, 10)]
        found = check_run(write(tmp_path / name, rows)).findings
        return [f for f in found if f.rule == "loss-frozen"]

    assert judged("short", 30) == []
    (f,) = judged("long", 200)
    assert f.value == 200
