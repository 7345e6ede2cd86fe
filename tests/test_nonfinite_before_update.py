"""``nonfinite`` before any optimizer step: the weights are the init's, so the learning rate
cannot have made the NaN, and the finding's remedy points at the forward's arithmetic
instead of "lower the learning rate". A NaN the same model makes after updates keeps the
learning-rate advice. The reference is torch itself: the module that makes the NaN is
called on its own input outside the recorder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.rules import check_run
from stabscope.store.run_meta import load_meta

STEPS = 4
WIDTH = 8


class LogBranch(nn.Module):
    """log of a linear map: NaN wherever the map is negative, from the first forward on."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.proj(x))


class Block(nn.Module):
    def __init__(self, poisoned: bool) -> None:
        super().__init__()
        self.branch = LogBranch() if poisoned else nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Block(False), Block(True), Block(False), nn.Linear(WIDTH, 4))


def train(run_dir, poison_from: int) -> tuple[nn.Module, torch.Tensor]:
    """The poisoned branch's log is taken from step ``poison_from`` on (an abs before it)."""
    net = model()
    branch = net[1].branch
    honest = branch.forward
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(16, WIDTH), torch.randint(0, 4, (16,))
    config = RecorderConfig(schedule=Schedule(STEPS, 0), online_rules=False)
    with Recorder(net, run_dir, config) as rec:
        for step in range(STEPS):
            branch.forward = (
                honest if step >= poison_from else lambda h: torch.log(branch.proj(h).abs() + 1)
            )
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    return net, x


def nonfinite(run_dir):
    (f,) = [f for f in check_run(run_dir).findings if f.rule == "nonfinite"]
    return f


def test_a_nan_of_the_first_forward_is_not_blamed_on_the_learning_rate(tmp_path):
    net, x = train(tmp_path / "first", poison_from=0)
    # The reference: torch's log of the branch's own linear map, on the stream going in.
    with torch.no_grad():
        assert torch.isnan(torch.log(net[1].branch.proj(net[0](x)))).any()
    f = nonfinite(tmp_path / "first")
    assert f.step == 0 and f.module.startswith("1.branch")
    assert "no optimizer step had run yet" in f.remedy
    assert "lower the learning rate" not in f.remedy
    # float32 throughout: loss scaling's paper does not explain it.
    assert f.citation == ""


def test_the_same_nan_after_updates_keeps_the_learning_rate_advice(tmp_path):
    train(tmp_path / "later", poison_from=2)
    f = nonfinite(tmp_path / "later")
    assert f.step == 2 and f.module.startswith("1.branch")
    assert "lower the learning rate" in f.remedy
    assert "no optimizer step had run yet" not in f.remedy


def test_blocks_missed_in_a_forward_that_goes_non_finite_are_said_to_be(tmp_path):
    train(tmp_path / "first", poison_from=0)
    notes = load_meta(tmp_path / "first").doc["structure"]["notes"]
    # Block 0 sits before the NaN and is found; blocks 1 and 2 hold it and are not.
    assert [b["name"] for b in load_meta(tmp_path / "first").doc["structure"]["blocks"]] == ["0"]
    (note,) = [n for n in notes if "not treated as blocks" in n]
    assert "went non-finite, first in the output of 1.branch" in note
