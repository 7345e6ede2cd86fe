"""``constant-prediction`` on real training: a next-token model on a Markov chain learns its
transitions; the same model with its input zeroed (an input that never reaches the model)
can only learn the chain's marginal. Entropies from the model's own logits, in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import stabscope
from stabscope.rules import check_run
from stabscope.rules.constant_prediction import CONSTANT_PREDICTION

V = 16  # tokens
STEPS = 120  # over the rule's min_steps (100)


def markov_batch(g: torch.Generator, batch: int = 32, length: int = 17) -> torch.Tensor:
    """(batch, length) tokens: next = 3·x + 1 mod V nine times in ten, else uniform."""
    x = torch.randint(V, (batch, 1), generator=g)
    cols = [x]
    for _ in range(length - 1):
        follow = (3 * cols[-1] + 1) % V
        other = torch.randint(V, (batch, 1), generator=g)
        keep = torch.rand(batch, 1, generator=g) < 0.9
        cols.append(torch.where(keep, follow, other))
    return torch.cat(cols, 1)


class NextToken(nn.Module):
    def __init__(self, sees_input: bool) -> None:
        super().__init__()
        self.sees_input = sees_input
        self.emb = nn.Embedding(V, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU())
        self.head = nn.Linear(64, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)  # (B, T, 32)
        if not self.sees_input:
            h = h * 0  # the bug: the input never reaches the model
        return self.head(self.body(h))  # (B, T, V)


def train(
    run,
    sees_input: bool,
    budget: int = STEPS,
    steps: int = STEPS,
    warmup: int = 0,
    lr: float = 1e-2,
) -> NextToken:
    torch.manual_seed(0)
    model = NextToken(sees_input)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for group in opt.param_groups:
        group["lr"] = lr  # torch refuses a negative lr only when the optimizer is built
    ramp = lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0  # noqa: E731
    rise = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
    g = torch.Generator().manual_seed(1)
    batches = [markov_batch(g) for _ in range(8)]

    def loss_of(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = m(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))

    model.constant = []  # type: ignore[assignment]  # per step: H of the zero-input prediction
    with stabscope.Recorder(model, run, budget=budget) as rec:
        for step in range(steps):
            with torch.no_grad():
                q = torch.softmax(model.head(model.body(torch.zeros(32))).double(), -1)
            model.constant.append(float(-(q * q.log()).sum()))
            loss = loss_of(model, batches[step % len(batches)])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rise.step()
            rec.step(loss=loss)
    model.probe = batches[0]  # type: ignore[assignment]
    return model


def info_share(model: NextToken) -> float:
    """(H(p̄) − mean H(p_i)) / H(p̄) of the model's predictions on one batch, float64."""
    with torch.no_grad():
        p = torch.softmax(model(model.probe[:, :-1]).double(), -1).reshape(-1, V).numpy()
    entropy = lambda q: -(q * np.log(np.where(q > 0, q, 1))).sum(-1)  # noqa: E731
    marginal = entropy(p.mean(0))
    return float((marginal - entropy(p).mean()) / marginal)


def findings(run, until=None):
    return [f for f in check_run(run, until=until).findings if f.rule == CONSTANT_PREDICTION.id]


@pytest.mark.slow
def test_a_model_that_learned_its_inputs_passes(tmp_path):
    model = train(tmp_path, sees_input=True)
    assert info_share(model) > 0.3  # it predicts the chain's transitions
    assert findings(tmp_path) == []


@pytest.mark.slow
def test_a_model_whose_input_never_arrives_is_an_error_at_the_planned_end(tmp_path):
    model = train(tmp_path, sees_input=False)
    assert info_share(model) == pytest.approx(0.0, abs=1e-9)  # one prediction everywhere
    (found,) = findings(tmp_path)
    assert found.severity == "error"
    assert found.value == pytest.approx(0.0, abs=1e-5)
    # H(p̄) is the entropy of the one prediction the model makes (its zero-input output),
    # the median over the last three recorded steps of the run's second half.
    steps = sorted(stabscope.load_run(tmp_path, metrics="pred_entropy").step.unique())
    last = [s for s in steps if s >= STEPS // 2][-3:]
    marginal = float(np.median([model.constant[s] for s in last]))
    assert f"H(p̄) {marginal:.4g}" in found.message
    assert found.step == last[-1]
    assert "learned its outputs' marginal" in found.message  # its loss is near H(p̄)


@pytest.mark.slow
def test_one_confident_wrong_prediction_is_not_called_the_marginal(tmp_path):
    """The same model trained up its loss (a negative lr): one prediction everywhere, with
    its mass on tokens the chain rarely gives, so its loss ends far above H(p̄), which the
    finding says instead of "learned its outputs' marginal"."""
    model = train(tmp_path, sees_input=False, lr=-1e-2)
    assert info_share(model) == pytest.approx(0.0, abs=1e-9)
    loss = stabscope.load_run(tmp_path, metrics="loss").sort_values("step").value
    (found,) = findings(tmp_path)
    assert loss.iloc[-10:].median() > 2 * model.constant[-1]
    assert "confidently, and they are wrong" in found.message
    assert "learned its outputs' marginal" not in found.message


@pytest.mark.slow
def test_before_the_planned_end_or_on_a_short_budget_it_says_nothing(tmp_path):
    train(tmp_path / "long", sees_input=False)
    assert findings(tmp_path / "long", until=STEPS // 2) == []  # the run was still going
    train(tmp_path / "short", sees_input=False, budget=50, steps=50)  # under min_steps
    assert findings(tmp_path / "short") == []


@pytest.mark.slow
def test_a_run_that_ends_inside_its_warm_up_is_told_so(tmp_path):
    """A warm-up ten times longer than the run: the lr still rises at the end, and the
    finding names the warm-up; one that ends within the run does not."""
    from stabscope.rules.constant_prediction import WARMING_UP

    train(tmp_path / "rising", sees_input=False, warmup=10 * STEPS)
    lr = stabscope.load_run(tmp_path / "rising", metrics="lr").sort_values("step").value
    assert lr.idxmax() == lr.index[-1] and lr.iloc[-1] > lr.iloc[0]
    (rising,) = findings(tmp_path / "rising")
    assert rising.message.endswith(WARMING_UP)
    train(tmp_path / "warm", sees_input=False, warmup=STEPS // 4)  # warm by the end
    (warm,) = findings(tmp_path / "warm")
    assert WARMING_UP not in warm.message


@pytest.mark.slow
def test_a_regression_output_is_not_read_as_a_constant_prediction(tmp_path):
    """Eight small regression outputs read as logits are near uniform (information ~0), but
    the loss (a small MSE) sits far under their entropy ln 8: no finding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 8))
    g = torch.Generator().manual_seed(0)
    w = 0.01 * torch.randn(4, 8, generator=g)
    xs = [torch.randn(64, 4, generator=g) for _ in range(4)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with stabscope.Recorder(model, tmp_path, budget=STEPS) as rec:
        for step in range(STEPS):
            x = xs[step % 4]
            loss = nn.functional.mse_loss(model(x), x @ w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    ent = stabscope.load_run(tmp_path, metrics=["pred_entropy", "pred_marginal_entropy"])
    last = ent[ent.step == ent.step.max()].set_index("metric").value
    assert last["pred_marginal_entropy"] - last["pred_entropy"] < 0.1 * math.log(8)
    assert findings(tmp_path) == []
