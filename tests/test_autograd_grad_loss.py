"""A script that trains without ``backward``: each step takes ``torch.autograd.grad`` of its
loss w.r.t. the parameters and sets ``p.grad`` itself. Its loss is read from that call (the
zero-code driver sees no backward), so the rules that read the loss judge it: here its lr
grows 1.5x a step from step 20 and the loss rises ~1e6x while staying finite, which
``loss-divergence`` must call. The reference is the same script run without stabscope: its
losses, to the bit, which the recorded loss rows must equal."""

from __future__ import annotations

import json

import pytest

import stabscope
from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from stabscope.store.run_meta import load_meta
from tests.scripts.harness import run_both

SCRIPT = """
import json, sys
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
params = list(model.parameters())
g = torch.Generator().manual_seed(1)
w = torch.randn(16, 1, generator=g)
log = []
for step in range(60):
    if step >= 20:
        for group in opt.param_groups:
            group["lr"] = min(group["lr"] * 1.5, 0.1)
    x = torch.randn(64, 16, generator=g)
    loss = F.mse_loss(model(x), x @ w)
    opt.zero_grad()
    for p, grad in zip(params, torch.autograd.grad(loss, params)):
        p.grad = grad
    opt.step()
    log.append(loss.item())
json.dump(log, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_a_loop_that_takes_its_gradients_with_autograd_grad_has_its_loss_read(tmp_path):
    plain_log, profiled_log, run = run_both(tmp_path, SCRIPT, RecorderConfig(online_rules=False))
    plain, profiled = (json.loads(p.read_text()) for p in (plain_log, profiled_log))
    assert profiled == plain  # training unchanged, to the bit
    loss = stabscope.load_run(run, metrics=["loss"]).sort_values("step")
    assert loss.step.tolist() == list(range(60))
    assert loss.value.tolist() == pytest.approx(plain, rel=1e-6)
    assert max(plain[20:]) > 1e4 * min(plain[:20])  # it did diverge, finite
    (found,) = [f for f in check_run(run).findings if f.rule == "loss-divergence"]
    assert found.severity == "error"
    assert "samples_model" not in load_meta(run).doc  # gradients w.r.t. parameters: no sampler
