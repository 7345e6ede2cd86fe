"""The update-ratio rule on real recorded runs of a small class-token classifier (a ViT's
head in miniature): a class token initialised at zero, as ViTs do, makes every one of its
first updates "large" against its own norm (above 0.5 in its first steps here), which says nothing
about the learning rate; the rule passes it over as it passes over biases. The same model
at a learning rate 1000x higher still gets the finding, on a weight that did not start at
zero."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stabscope
from stabscope.rules import check_run

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


def record(run_dir, lr: float) -> None:
    torch.manual_seed(0)
    model = TokenClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = stabscope.Schedule(dense=6, every=50)
    with stabscope.Recorder(model, run_dir, schedule=schedule) as rec:
        for _ in range(6):
            x, y = torch.randn(32, TOKENS, WIDTH), torch.randint(CLASSES, (32,))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec.step(loss)


def update_ratio_finding(run_dir) -> stabscope.Finding | None:
    found = [f for f in check_run(run_dir).findings if f.rule == "update-ratio"]
    return found[0] if found else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("update_ratio")
    record(root / "calm", 1e-3)
    record(root / "hot", 1.0)
    return root / "calm", root / "hot"


def test_a_zero_initialised_token_is_not_an_oversized_update(runs):
    ratios = stabscope.load_run(runs[0], metrics=["update_ratio"])
    token = ratios[ratios.module == "cls"].value
    assert token.max() > 0.5  # what the rule would have read: its norm is its own updates
    assert ratios[ratios.module != "cls"].value.max() < 0.1  # the weights: small steps
    assert update_ratio_finding(runs[0]) is None


def test_a_learning_rate_1000x_higher_is_still_found_on_a_weight(runs):
    found = update_ratio_finding(runs[1])
    assert found is not None
    assert found.module in ("mix.weight", "head.weight")
    assert found.value > 0.1
