"""``check``'s table names the rules skipped for metrics the run did not record in one line,
the same rules ``--format json`` gives with that reason (a real cheap-preset run)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import stabscope
from tests.test_cli import invoke


@pytest.mark.slow
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


class Block(nn.Module):
    """x + mlp(ln(x)): a Pre-LN residual block without attention."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


class ResidualMLP(nn.Module):
    """Two residual blocks and no attention."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _skipped_of(net: nn.Module, run) -> tuple[dict[str, str], str]:
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with stabscope.Recorder(net, run) as rec:  # the standard preset: structure probes on
        for _ in range(12):
            x = torch.randn(16, 6, 8)
            loss = (net(x) - x[..., :1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
    skipped = json.loads(invoke("check", run, "--format", "json").stdout)["skipped"]
    return skipped, invoke("check", run).output


ATTENTION_RULES = {"attention-logit-growth", "attention-entropy-collapse"}


@pytest.mark.slow
def test_rules_a_model_without_blocks_cannot_feed_are_not_called_unrecorded(tmp_path):
    torch.manual_seed(0)
    skipped, table = _skipped_of(
        nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)), tmp_path / "mlp"
    )
    moot = {r for r, why in skipped.items() if why.startswith("does not apply: ")}
    # Attention, residual dependency and token correlation are measured on residual blocks.
    assert moot == ATTENTION_RULES | {"residual-dependency", "rank-collapse"}
    assert all("no residual blocks" in skipped[r] for r in moot)
    (line,) = [line for line in table.splitlines() if "not applicable" in line]
    assert set(re.search(r"model: (.*) \(--format", line).group(1).split(", ")) == moot
    unrecorded = [line for line in table.splitlines() if "did not record" in line]
    assert not any(rule in line for rule in moot for line in unrecorded)


@pytest.mark.slow
def test_attention_rules_do_not_apply_to_blocks_without_attention(tmp_path):
    torch.manual_seed(0)
    skipped, _ = _skipped_of(ResidualMLP(), tmp_path / "resmlp")
    assert {r for r, why in skipped.items() if "no attention was found" in why} == ATTENTION_RULES
    # The blocks were found, so their residual statistics ran.
    assert "residual-dependency" not in skipped and "rank-collapse" not in skipped
