"""``loss-above-uniform`` on real training: a next-token model on a Markov chain behind
dropout 0.98 at a high learning rate ends confidently wrong, its loss above ln V (what
predicting every token with equal probability scores); the same model without the dropout
learns the chain. The end level is checked against the median of the script's own last
losses; a regression head whose mean squared error ends above ln 2 is not read against it."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

import stabscope
from stabscope.rules import check_run
from stabscope.rules.output_features import log_classes
from stabscope.rules.view import RunView
from tests.test_rules_constant_prediction import STEPS, V, markov_batch


class Net(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.drop = nn.Dropout(dropout)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(64, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.head(self.body(self.drop(self.emb(tokens))))


def train(run, dropout: float, lr: float, budget: int = STEPS) -> list[float]:
    """The script's own loss at every step."""
    torch.manual_seed(0)
    model = Net(dropout)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    batches = [markov_batch(g) for _ in range(8)]
    seen = []
    with stabscope.Recorder(model, run, budget=budget) as rec:
        for step in range(STEPS):
            batch = batches[step % len(batches)]
            logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
            seen.append(loss.item())
    return seen


def above_uniform(run) -> list:
    return [f for f in check_run(run).findings if f.rule == "loss-above-uniform"]


@pytest.mark.slow
def test_a_model_worse_than_uniform_at_its_planned_end_is_an_error(tmp_path):
    seen = train(tmp_path / "run", dropout=0.98, lr=0.1)
    (found,) = above_uniform(tmp_path / "run")
    # The end level: the median of the last w = max(5, 120 // 20) = 6 losses.
    level = statistics.median(seen[-6:])
    assert level > math.log(V)
    assert found.severity == "error" and found.value == pytest.approx(level / math.log(V))
    assert f"{level:.4g}" in found.message and "worse than knowing nothing" in found.message


@pytest.mark.slow
def test_the_model_that_learns_and_a_run_before_its_planned_end_pass(tmp_path):
    seen = train(tmp_path / "healthy", dropout=0.0, lr=1e-2)
    assert statistics.median(seen[-6:]) < 0.5 * math.log(V)
    assert above_uniform(tmp_path / "healthy") == []
    train(tmp_path / "early", dropout=0.98, lr=0.1, budget=4 * STEPS)  # a quarter of the way
    assert above_uniform(tmp_path / "early") == []


def train_regression(run, signal: float, small_head: bool, as_float: bool) -> list[float]:
    """Two outputs fit by mean squared error to ``signal`` · x[:, :2] + noise of variance 1;
    the script's own loss at every step. ``small_head``: near-zero outputs at init (a narrow
    cross-entropy range); ``as_float``: the loss handed over without its graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    if small_head:
        with torch.no_grad():
            model[2].weight.mul_(0.01)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    with stabscope.Recorder(model, run, budget=STEPS) as rec:
        for _ in range(STEPS):
            x = torch.randn(64, 4, generator=g)
            y = signal * x[:, :2] + torch.randn(64, 2, generator=g)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss.item() if as_float else loss)
            losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_a_regression_head_is_not_read_against_ln_v(tmp_path):
    """Targets of variance ~2, the loss handed over as a float (no graph to read its loss
    function from): the loss ends near 1, above ln 2, and at step 0 it is outside the range a
    cross-entropy of the two near-zero outputs lies in (near ln 2), so it is no cross-entropy
    of them."""
    losses = train_regression(tmp_path / "run", 1.0, small_head=True, as_float=True)
    assert stabscope.read_meta(tmp_path / "run")["loss_function"] == "unknown"
    assert statistics.median(losses[-6:]) > math.log(2)
    reason = log_classes(RunView.open(tmp_path / "run"), checked=True)
    assert isinstance(reason, str) and "outside" in reason
    assert above_uniform(tmp_path / "run") == []


@pytest.mark.slow
def test_a_noisy_regression_that_fits_as_well_as_it_can_is_neither_rules_case(tmp_path):
    """Targets 0.3·x + noise of variance 1 (R² ~ 0.08): the best fit's outputs stay small, so
    read as two logits they are nearly uniform whatever the input, and its error (the noise's
    variance, ~1) sits above ln 2. Its loss's graph says mse_loss, so neither rule that reads
    a loss against ln V judges it."""
    losses = train_regression(tmp_path / "run", 0.3, small_head=False, as_float=False)
    assert statistics.median(losses[-6:]) > math.log(2)
    assert stabscope.read_meta(tmp_path / "run")["loss_function"] == "mse_loss"
    ids = {f.rule for f in check_run(tmp_path / "run").findings if f.severity == "error"}
    assert not ids & {"loss-above-uniform", "constant-prediction"}


@pytest.mark.slow
def test_a_contrastive_loss_over_the_batch_is_not_read_against_the_projection_width(tmp_path):
    """InfoNCE over 64 candidates of 16-wide projections: a cross-entropy whose classes are the
    batch's candidates, its floor far above ln 16. The loss's graph says so (64 classes, not
    the head's 16 outputs), and the rule does not read it against ln 16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    with stabscope.Recorder(model, tmp_path / "run", budget=STEPS) as rec:
        for _ in range(STEPS):
            x = torch.randn(64, 8, generator=g)
            views = (
                x + 0.5 * torch.randn(64, 8, generator=g),
                x + 0.5 * torch.randn(64, 8, generator=g),
            )
            a, b = (nn.functional.normalize(model(v), dim=-1) for v in views)
            loss = nn.functional.cross_entropy(a @ b.T / 0.5, torch.arange(64))
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
            losses.append(loss.item())
    assert statistics.median(losses[-6:]) > math.log(16)
    meta = stabscope.read_meta(tmp_path / "run")
    assert (meta["loss_function"], meta["loss_classes"]) == ("cross_entropy", 64)
    assert above_uniform(tmp_path / "run") == []
