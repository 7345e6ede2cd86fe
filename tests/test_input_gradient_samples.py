"""An energy-based model trained by contrastive divergence draws its negatives by Langevin
steps on inputs along its own input gradient (``torch.autograd.grad`` w.r.t. the chains),
and trains E(data) − E(samples): a loss against its own sampler, which falls while the
model outruns the sampler and returns toward 0 as the sampler catches up. The script's own
held-out NLL (exp(−E)/Z, Z summed on a grid) is the reference: it falls throughout while the
loss gives back most of its fall, and ``loss-divergence`` says why that is not an error.
Gradients w.r.t. inputs that train through them (a gradient penalty, ``create_graph``) or
taken once for a look are no sampler."""

from __future__ import annotations

import json
import statistics

import pytest

from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from stabscope.store.run_meta import load_meta
from tests.scripts.harness import run_both

EBM = """
import json, math, sys
import torch
from torch import nn

torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
energy = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
opt = torch.optim.Adam(energy.parameters(), lr=3e-3, betas=(0.5, 0.999))
angles = torch.arange(8) * (2 * math.pi / 8)
means = 2 * torch.stack([angles.cos(), angles.sin()], 1)  # (8, 2): a ring of 8 Gaussians


def data(n):
    return means[torch.randint(0, 8, (n,), generator=g)] + 0.2 * torch.randn(n, 2, generator=g)


buffer = torch.rand(1024, 2, generator=g) * 6 - 3  # (1024, 2) persistent chains
axis = torch.linspace(-4, 4, 60)
grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # (3600, 2)
test = data(1000)
log = []
for step in range(250):
    idx = torch.randint(0, 1024, (64,), generator=g)
    x = buffer[idx].clone()
    fresh = torch.rand(64, generator=g) < 0.05
    x[fresh] = torch.rand(int(fresh.sum()), 2, generator=g) * 6 - 3
    for _ in range(10):  # Langevin: x <- x - (eps^2 / 2) dE/dx + eps * noise, eps = 0.1
        x.requires_grad_(True)
        (gx,) = torch.autograd.grad(energy(x).sum(), x)
        x = (x - 0.005 * gx + 0.1 * torch.randn(x.shape, generator=g)).detach()
    buffer[idx] = x
    pos, neg = energy(data(64)), energy(x)
    loss = pos.mean() - neg.mean() + 0.1 * (pos.pow(2).mean() + neg.pow(2).mean())
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():  # held-out NLL under exp(-E) / Z, Z summed over the grid's cells
        log_z = torch.logsumexp(-energy(grid).squeeze(1), 0) + 2 * math.log(8 / 59)
        nll = energy(test).mean() + log_z
    log.append([loss.item(), nll.item()])
json.dump(log, open(sys.argv[1], "w"))
"""

PENALTY = """
import json, sys
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
w = torch.randn(8, 1, generator=g)
log = []
for step in range(30):
    x = torch.randn(64, 8, generator=g).requires_grad_(True)
    out = model(x)
    # An input-gradient penalty trains through the gradient (create_graph): no sampler.
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    loss = F.mse_loss(out, x.detach() @ w) + 0.1 * gx.pow(2).sum(1).mean()
    if step == 10:  # one look at a saliency map, for a log: no sampler either
        probe = torch.randn(4, 8, generator=g).requires_grad_(True)
        torch.autograd.grad(model(probe).sum(), probe)
    # Inputs given as a generator, which torch accepts: it must reach torch unread.
    torch.autograd.grad(model(x).sum(), (p for p in model.parameters()))
    opt.zero_grad()
    loss.backward()
    opt.step()
    log.append(loss.item())
json.dump(log, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_an_energy_models_contrastive_loss_is_not_a_divergence(tmp_path):
    plain_log, profiled_log, run = run_both(tmp_path, EBM, RecorderConfig())
    log = json.loads(profiled_log.read_text())
    assert log == json.loads(plain_log.read_text())  # training unchanged, to the bit
    cd, nll = zip(*log)
    assert nll[-1] < nll[0] - 1.0 and min(nll[200:]) <= min(nll[:200])  # it kept learning
    levels = [statistics.median(cd[i : i + 12]) for i in range(0, len(cd) - 11, 12)]
    start, best, end = levels[0], min(levels), levels[-1]
    assert end - best > 0.5 * (start - best) > 0.1  # while its loss gave back over half its fall
    assert load_meta(run).doc["samples_model"] == {"function": "autograd.grad", "step": 0}
    (found,) = [f for f in check_run(run).findings if f.rule == "loss-divergence"]
    assert found.severity == "warning" and "input gradient" in found.message
    live = load_meta(run).doc["online"]["findings"]  # the verdicts while it trained
    assert not [e for e in live if e["rule"] == "loss-divergence" and e["severity"] == "error"]


def test_an_input_gradient_trained_through_or_taken_once_is_no_sampler(tmp_path):
    plain_log, profiled_log, run = run_both(tmp_path, PENALTY, RecorderConfig(online_rules=False))
    assert json.loads(profiled_log.read_text()) == json.loads(plain_log.read_text())
    assert "samples_model" not in load_meta(run).doc
