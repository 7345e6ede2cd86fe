"""``gradient-growth`` on a ConvNeXt-like net. Its blocks are found (a channels-last MLP
scaled by LayerScale and permuted back onto the stream), so the trend is read over the blocks
of one stage, of one width, not across stages whose widths differ. Where its branches cannot
be verified (a shift after the MLP that no module's output equals, in any layout) it is a
plain stack of stages, and the input side is read too: gradients that vanish toward the input
reach the parameters before the first layer (a stem, an embedding) smaller still. Its first
stage is scaled down by LayerScale and its second opens with a downsampling convolution
outside any branch, so the last-over-first stage ratio is past the rule's threshold at init
while the stem has the largest gradient of all: no finding either way. A deep sigmoid stack
behind a stem keeps its finding. The references are the models' own gradients after the first
backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.rules import check_run
from stabscope.rules.depth import GRAD_GROWTH
from stabscope.store.run_meta import load_meta


class ConvUnit(nn.Module):
    """Depthwise conv, then a channels-last MLP scaled by γ (LayerScale), added back in the
    channels-first layout: no module's output is the added term in the stream's layout."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(0.1 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(F.gelu(self.up(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ShiftedUnit(ConvUnit):
    """The same unit, its added term shifted by one column: no residual add is verified."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(F.gelu(self.up(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return x + torch.roll((self.gamma * h).permute(0, 3, 1, 2), 1, dims=-1)


class ChannelNorm(nn.LayerNorm):
    """A LayerNorm over the channels of a (B, C, H, W) map, as ConvNeXt's stem has."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TwoStages(nn.Module):
    def __init__(self, unit: type[ConvUnit] = ConvUnit) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 2, 2), ChannelNorm(16))
        self.stages = nn.ModuleList(
            [
                nn.Sequential(unit(16), unit(16)),
                nn.Sequential(nn.Conv2d(16, 32, 2, 2), unit(32), unit(32)),
            ]
        )
        self.head = nn.Linear(32, 4)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((-2, -1)))


class SigmoidStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(8, 32)
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(10)])
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return self.head(x)


def norm(module: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.parameters()))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, run) -> dict[str, float]:
    """Three recorded steps; the step-0 gradient norms of the stem, first and last layer."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = RecorderConfig(schedule=Schedule(3, 0), online_rules=False)
    first: dict[str, float] = {}
    stack = model.stages if isinstance(model, TwoStages) else model.layers
    with Recorder(model, run, config) as rec:
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if not first:
                first = {"stem": norm(model.stem), "first": norm(stack[0]), "last": norm(stack[-1])}
            opt.step()
            rec.step(loss)
    return first


def growth(run) -> list:
    return [f for f in check_run(run).findings if f.rule == GRAD_GROWTH.id]


@pytest.mark.slow
@pytest.mark.parametrize("unit", [ConvUnit, ShiftedUnit])
def test_a_stage_ratio_past_the_threshold_with_the_stem_ahead_is_no_growth(tmp_path, unit):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
    first = train(TwoStages(unit), x, y, tmp_path / "convnext")
    assert first["last"] / first["first"] > GRAD_GROWTH.defaults["warning"]  # across stages
    assert first["stem"] > first["last"]  # the input side has the largest gradient
    structure = load_meta(tmp_path / "convnext").structure or {}
    blocks = [b["name"] for b in structure.get("blocks", [])]
    units = ["stages.0.0", "stages.0.1", "stages.1.1", "stages.1.2"]
    assert blocks == (units if unit is ConvUnit else [])
    assert growth(tmp_path / "convnext") == []


def test_a_sigmoid_stack_behind_a_stem_still_grows(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    first = train(SigmoidStack(), x, y, tmp_path / "sigmoid")
    assert first["last"] / first["first"] > GRAD_GROWTH.defaults["error"]
    assert first["stem"] < first["last"]  # vanishing reaches the stem too
    (found,) = growth(tmp_path / "sigmoid")
    assert found.severity == "error"
