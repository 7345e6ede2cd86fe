"""A model changed while it trains (a block replaced and one appended, the optimizer rebuilt,
as progressive stacking does): the parameters that left are not read again, meta.json marks
them and says what changed, the rules do not judge the stale ones, and the parameters that
stayed are still measured right (against their own tensors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabscope
from stabscope import Schedule
from stabscope.rules import check_run

STEPS, CHANGE = 12, 6


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        return x + self.fc(self.ln(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


@pytest.mark.parametrize("append", [True, False], ids=["replaced-and-appended", "same-shape"])
def test_a_replaced_block_is_not_read_after_it_left(run_dir, append):
    """Also a block replaced by one of the same shape and the optimizer rebuilt for it, where
    the owned optimizers hold as many parameters as before."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    old_fc = model.blocks[1].fc.weight
    kept_norms = {}
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=STEPS, every=0)) as rec:
        for step in range(STEPS):
            if step == CHANGE:
                model.blocks[1] = Block()
                if append:
                    model.blocks.append(Block())
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x = torch.randn(8, 4)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            kept_norms[step] = model.blocks[0].fc.weight.detach().double().norm().item()
            opt.step()
            rec.step(loss)
    assert old_fc.grad is not None  # its last gradient stays: reading it would be stale

    meta = stabscope.read_meta(run_dir)
    (note,) = [n for n in meta["notes"] if n.startswith("the model changed")]
    assert f"before step {CHANGE}: 4 parameters (blocks.1.ln.weight" in note
    joined = 8 if append else 4
    assert f"{joined} parameters (blocks.1.ln.weight" in note and "joined it" in note
    left = {p["name"]: p["left_at"] for p in meta["parameters"] if "left_at" in p}
    assert left == {
        f"blocks.1.{n}": CHANGE for n in ("ln.weight", "ln.bias", "fc.weight", "fc.bias")
    }

    df = stabscope.load_run(run_dir, metrics=["param_norm", "param_grad_norm"])
    gone = df[df.module == "blocks.1.fc.weight"]
    assert sorted(gone.step.unique()) == list(range(CHANGE))
    stayed = df[(df.module == "blocks.0.fc.weight") & (df.metric == "param_norm")]
    assert sorted(stayed.step) == list(range(STEPS))
    for step, value in zip(stayed.step, stayed.value):
        assert abs(value - kept_norms[step]) <= 1e-6 * kept_norms[step]
    # Block rows only where an optimizer stepped the block's recorded parameters.
    blocks = stabscope.load_run(run_dir, modules=["blocks.1"], metrics=["block_update_norm"])
    assert blocks.step.max() < CHANGE
    assert not [f for f in check_run(run_dir).findings if f.rule == "no-update"]


def test_parameters_that_joined_with_none_leaving_are_named_once(run_dir):
    """A block appended and the optimizer rebuilt for it (adapters put into a model, a head
    added): nothing left, and the 4 parameters that joined are named, once, even where the
    optimizer is rebuilt again over the same model."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=STEPS, every=0)) as rec:
        for step in range(STEPS):
            if step == CHANGE:
                model.blocks.append(Block())
            if step in (CHANGE, CHANGE + 3):
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x = torch.randn(8, 4)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    meta = stabscope.read_meta(run_dir)
    notes = [n for n in meta["notes"] if n.startswith("the model changed")]
    assert notes == [
        f"the model changed before step {CHANGE}: 4 parameters (blocks.2.ln.weight, "
        "blocks.2.ln.bias, blocks.2.fc.weight and 1 more) joined it and are not recorded (a "
        "Recorder records the model it was created for: create one for the changed model to "
        "record it whole)"
    ]
    assert not [p for p in meta["parameters"] if "left_at" in p]
