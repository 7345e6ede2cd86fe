"""``check``'s table names the rules skipped for metrics the run did not record in one line,
the same rules ``--format json`` gives with that reason (a real cheap-preset run)."""

from __future__ import annotations

import json
import re

import torch
from torch import nn

import stabscope
from tests.test_cli import invoke


def test_rules_skipped_for_unrecorded_metrics_are_one_line(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    run = tmp_path / "run"
    with stabscope.Recorder(net, run, preset="cheap") as rec:
        for _ in range(12):
            x = torch.randn(16, 4)
            loss = (net(x) - x[:, :1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    table = invoke("check", run)
    lines = [line for line in table.output.splitlines() if "did not record" in line]
    assert len(lines) == 1
    listed = re.search(r"did not record: (.*) \(--format", lines[0]).group(1).split(", ")
    skipped = json.loads(invoke("check", run, "--format", "json").stdout)["skipped"]
    unrecorded = [rule for rule, why in skipped.items() if why.startswith("not recorded: ")]
    assert unrecorded and listed == unrecorded
    assert f"skipped {len(unrecorded)} rules" in lines[0]
