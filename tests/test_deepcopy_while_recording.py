"""``copy.deepcopy(model)`` while stabscope records it: early stopping keeps the best model
that way, and an EMA teacher starts as a copy. The module's hook dicts are copied with it,
and a hook that is a bound method took the recorder along (``TypeError: cannot pickle
'_thread.lock' object`` inside the script). Now the copy's hooks do nothing: the script
runs as it does without stabscope, the copy can be called, and nothing of it is recorded."""

from __future__ import annotations

import json

import pytest

import stabscope
from tests.scripts.harness import run_both

SCRIPT = """
import copy
import json
import sys
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
w = torch.randn(8)
best, best_model = float("inf"), None
with open(sys.argv[1], "w") as log:
    for step in range(30):
        x = torch.randn(16, 8)
        loss = (model(x) - (x @ w)[:, None]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < best:
            best, best_model = loss.item(), copy.deepcopy(model)
        with torch.no_grad():
            kept = best_model(x).sum().item()  # the copy is called too
        log.write(json.dumps([loss.item(), kept]) + "\\n")
"""


@pytest.mark.slow
def test_a_deep_copy_of_the_recorded_model_trains_and_runs_as_without_stabscope(tmp_path):
    plain, profiled, run = run_both(tmp_path, SCRIPT, budget=30)
    read = [json.loads(line) for line in profiled.read_text().splitlines()]
    assert len(read) == 30 and read == [json.loads(s) for s in plain.read_text().splitlines()]
    meta = stabscope.read_meta(run)
    assert meta["status"] == "complete" and meta["steps"] == 30
    # The copy's forward passes add no rows: one loss a step, and the first layer's output
    # recorded once per recorded step (its eval phase has no rows).
    frame = stabscope.load_run(run, modules=["0"], metrics=["act_rms"])
    assert set(frame.phase.astype(str)) == {"train"}
    assert frame.groupby("step").size().max() == 1
