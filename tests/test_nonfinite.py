"""NaN/Inf inside the model are data: recorded, with the first module in forward and in
backward order, and the recorder keeps going."""

from __future__ import annotations

import math

import torch
from torch import nn

import stabscope
from stabscope import Schedule


class PoisonGrad(torch.autograd.Function):
    """Identity forward; backward returns NaN (a module whose backward blows up)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class Poison(nn.Module):
    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def forward(self, x):
        if self.where == "forward":
            return x * torch.where(torch.arange(x.shape[-1]) == 1, float("inf"), 1.0)
        return PoisonGrad.apply(x)


def model_with(where: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 4), nn.Tanh(), Poison(where), nn.Linear(4, 4), nn.Linear(4, 2)
    )


def run(model, run_dir, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=steps, every=0)) as rec:
        for _ in range(steps):
            loss = model(torch.randn(3, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return stabscope.read_meta(run_dir), stabscope.load_run(run_dir)


def test_first_nonfinite_in_forward_order(run_dir):
    meta, df = run(model_with("forward"), run_dir)
    first = meta["first_nonfinite"]["forward"]
    assert (first["module"], first["step"]) == ("2", 0)
    flags = df[(df.metric == "act_nonfinite") & (df.step == 0)].set_index("module").value
    assert flags["0"] == 0 and flags["1"] == 0 and flags["2"] == 1 and flags["3"] == 1
    # The loss is non-finite from the first step and is recorded as such, not dropped.
    loss = df[df.metric == "loss"].sort_values("step").value
    assert len(loss) == 3 and not math.isfinite(loss.iloc[0])
    assert meta["status"] == "complete"


def test_first_nonfinite_in_backward_order(run_dir):
    meta, df = run(model_with("backward"), run_dir, steps=1)
    assert "forward" not in meta["first_nonfinite"]
    first = meta["first_nonfinite"]["backward"]
    # Backward visits 4, 3, 2 (finite: the poison acts on the gradient flowing *into* its
    # input), then 1 where the NaN first arrives.
    assert (first["module"], first["step"]) == ("1", 0)
    flags = df[df.metric == "grad_nonfinite"].set_index("module").value
    assert flags["4"] == 0 and flags["3"] == 0 and flags["2"] == 0 and flags["1"] == 1
    marker = df[df.metric == "first_nonfinite_backward"]
    assert marker.module.astype(str).tolist() == ["1"]
