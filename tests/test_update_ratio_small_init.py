"""``update-ratio`` on a matrix initialised to zero (LoRA's B, a ViT's class token) or far
below the usual scale (a policy head scaled by 0.01): grown from (near) zero, its update is a
large share of its norm by construction for its first 1/max_ratio² steps, and that says
nothing about the lr. The same rule still fires on a random-init matrix whose lr is too
high. The ratios are checked against the script's own norms and Adam's first step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stabscope
from stabscope import Schedule
from stabscope.rules import check_run


class LoRALinear(nn.Module):
    """A frozen (d, d) base plus the low-rank update B·A (B: (d, r) zeros, A: (r, d))."""

    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, d) / d**0.5)
        self.lora_B = nn.Parameter(torch.zeros(d, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        return self.base(x) + x @ self.lora_A.t() @ self.lora_B.t()


def train(run_dir, lr: float, steps: int = 12) -> list[float]:
    """Adam on a LoRA regression; returns ||ΔB|| / ||B|| per step from the script's own
    copies (inf where B was zero)."""
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(16, 4), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    ratios = []
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=steps, every=1)) as rec:
        for _ in range(steps):
            before = model[0].lora_B.detach().clone()
            loss = nn.functional.mse_loss(rec.model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
            delta = (model[0].lora_B.detach() - before).norm()
            ratios.append(float(delta / before.norm()) if before.norm() > 0 else float("inf"))
    return ratios


def update_ratio_findings(run_dir):
    return [f for f in check_run(run_dir).findings if f.rule == "update-ratio"]


def test_lora_b_grown_from_zero_is_not_an_update_ratio_finding(tmp_path):
    ratios = train(tmp_path / "lora", lr=1e-3)
    recorded = stabscope.load_run(tmp_path / "lora", metrics="update_ratio")
    b = recorded[recorded.module == "0.lora_B"].sort_values("step")
    # The script's ratios (steps 1..): large by construction, and what the recorder saw.
    assert ratios[1] > 0.3 and all(r > 0.1 for r in ratios[1:6])
    assert b.step.tolist() == list(range(1, 12))  # no row at step 0: ||B|| was zero
    assert b.value.tolist() == pytest.approx(ratios[1:], rel=1e-4)
    assert update_ratio_findings(tmp_path / "lora") == []


def test_a_random_init_matrix_at_too_high_an_lr_still_is(tmp_path):
    train(tmp_path / "hot", lr=0.5)
    recorded = stabscope.load_run(tmp_path / "hot", metrics="update_ratio")
    a = recorded[recorded.module == "0.lora_A"]
    assert a.value.max() > 0.1  # lora_A starts random: its ratio is the lr's doing
    (found,) = update_ratio_findings(tmp_path / "hot")
    assert "0.lora_A" in found.message or "2.weight" in found.message


WIDTH, TOKENS, CLASSES = 16, 4, 3


class TokenClassifier(nn.Module):
    """(B, TOKENS, WIDTH) -> (B, CLASSES): a class token joins the tokens, a mixing layer,
    the class token's output classified."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, WIDTH))  # zero-init, as ViT's
        self.mix = nn.Linear(WIDTH * (TOKENS + 1), WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)  # (B, TOKENS + 1, WIDTH)
        return self.head(torch.tanh(self.mix(x.flatten(1))))


def test_a_zero_initialised_class_token_is_not_an_oversized_update(tmp_path):
    torch.manual_seed(0)
    model = TokenClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with stabscope.Recorder(model, tmp_path, schedule=Schedule(dense=6, every=50)) as rec:
        for _ in range(6):
            x, y = torch.randn(32, TOKENS, WIDTH), torch.randint(CLASSES, (32,))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec.step(loss)
    ratios = stabscope.load_run(tmp_path, metrics=["update_ratio"])
    assert ratios[ratios.module == "cls"].value.max() > 0.5  # its norm is its own updates
    assert ratios[ratios.module != "cls"].value.max() < 0.1  # the weights: small steps
    assert update_ratio_findings(tmp_path) == []


def policy_head_run(run_dir, gain: float, lr: float, steps: int = 8) -> float:
    """A policy whose last layer is scaled by ``gain`` after PyTorch's default init, as PPO
    implementations initialise it, trained by Adam; returns the script's own ratio
    ||ΔW|| / ||W|| of that head at step 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight.mul_(gain)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=steps, every=1)) as rec:
        for _ in range(steps):
            before = model[2].weight.detach().clone()
            x, y = torch.randn(32, 8), torch.randint(4, (32,))
            loss = F.cross_entropy(rec.model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
            if first is None:
                first = float((model[2].weight.detach() - before).norm() / before.norm())
    return first


def test_a_policy_head_initialised_100x_small_is_not_an_oversized_update(tmp_path):
    ratio = policy_head_run(tmp_path / "small", gain=0.01, lr=3e-4)
    # Adam's first step moves every element by lr (m̂/√v̂ = ±1): ||ΔW|| = lr·√256, against a
    # head of rms 0.01/√(3·64) (kaiming-uniform's default, scaled).
    assert ratio == pytest.approx(3e-4 * 16 / (0.01 * 256**0.5 / (3 * 64) ** 0.5), rel=0.1)
    assert ratio > 0.1  # over the bar, by the init alone
    assert update_ratio_findings(tmp_path / "small") == []


def test_a_head_at_its_usual_scale_and_a_hot_lr_still_is(tmp_path):
    ratio = policy_head_run(tmp_path / "hot", gain=1.0, lr=0.03)
    assert ratio > 0.1  # lr·√256 over a head of the default rms: the lr's doing
    (found,) = update_ratio_findings(tmp_path / "hot")
    assert "2.weight" in found.message
