"""A script that computes its gradients with ``torch.func`` (per-sample gradients of a
DP-SGD step: ``vmap(grad(loss))`` through ``functional_call``, clipped per sample, noised,
then set as ``.grad`` for ``optimizer.step()``). Inside the transforms a module's output is a
wrapper with no storage: stabscope's hooks skip such calls instead of failing on them. The
reference is the same script run without stabscope: its losses, and the gradient norm of
each step it logged, which the recorded ``param_grad_norm`` must equal."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import stabscope
from stabscope.record.config import RecorderConfig
from stabscope.store.run_meta import load_meta
from tests.scripts.harness import run_both

SCRIPT = """
import json, sys
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)


def loss_of(params, x, y):
    return F.cross_entropy(functional_call(model, params, (x[None],)), y[None])


per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))
data, noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
log = []
for step in range(12):
    x = torch.randn(16, 6, generator=data)
    y = (x[:, :3]).argmax(1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = per_sample(params, x, y)  # each (16, *shape)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    scale = (1.0 / (norms + 1e-6)).clamp(max=1.0)  # per-sample clip at norm 1
    for k, p in model.named_parameters():
        clipped = (grads[k] * scale.view(-1, *[1] * (grads[k].dim() - 1))).sum(0)
        p.grad = (clipped + 0.5 * torch.randn(clipped.shape, generator=noise)) / len(x)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    log.append({"loss": loss, "grad_norm": norm})
json.dump(log, open(sys.argv[1], "w"))
"""


def test_per_sample_gradients_through_torch_func_are_recorded_without_a_fault(tmp_path):
    plain_log, profiled_log, run = run_both(tmp_path, SCRIPT, RecorderConfig(online_rules=False))
    plain, profiled = (json.loads(p.read_text()) for p in (plain_log, profiled_log))
    assert profiled == plain  # to the bit: losses and gradient norms
    meta = load_meta(run)
    assert meta.tool_error is None and meta.steps == len(plain)
    df = stabscope.load_run(run, metrics=["param_grad_norm"])
    by_step = df.groupby("step").value.apply(lambda v: math.sqrt((v.astype(float) ** 2).sum()))
    assert set(by_step.index) >= set(range(1, 10))  # the dense schedule (step 0 begins unseen)
    for step, value in by_step.items():
        assert value == pytest.approx(plain[int(step)]["grad_norm"], rel=1e-5)
    # The model's one call outside the transforms (the no_grad loss) has its statistics.
    acts = stabscope.load_run(run, metrics=["act_rms"])
    assert isinstance(acts, pd.DataFrame) and set(acts.module.astype(str)) >= {"0", "2"}
