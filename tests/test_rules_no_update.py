"""Rule ``no-update`` on real training: a loop that calls ``zero_grad()`` between
``backward()`` and ``step()`` (its weights never move) and an MLP whose ReLU inputs are all
negative under AdamW (no weight matrix gets a gradient; weight decay alone moves them) are
errors; the same loops without the bug are not. The zeros are checked against the weights and
gradients themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabscope
from stabscope import Recorder, RecorderConfig, Schedule
from stabscope.rules import check_run

STEPS = 12


def mlp(dead: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if dead:  # every pre-activation below 0: the ReLU passes no value and no gradient
        with torch.no_grad():
            net[0].bias.fill_(-100.0)
    return net


def train(
    run_dir, net: nn.Module, zero_before_step: bool, decay: float = 0.0, eps: float = 1e-8
) -> tuple[dict[str, torch.Tensor], float]:
    """The weight matrices' change over the run; the largest gradient entry any of them
    had when the optimizer stepped."""
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.dim() >= 2}
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=decay, eps=eps)
    largest = 0.0
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    config = RecorderConfig(schedule=Schedule(STEPS, 0), online_rules=False)
    with Recorder(net, run_dir, config) as rec:
        for _ in range(STEPS):
            loss = (net(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if zero_before_step:
                opt.zero_grad(set_to_none=False)  # the bug: the step sees zero gradients
            grads = [
                p.grad.abs().max().item()
                for p in net.parameters()
                if p.dim() >= 2 and p.grad is not None
            ]
            largest = max(largest, *grads)
            opt.step()
            rec.step(loss)
    change = {n: p.detach() - before[n] for n, p in net.named_parameters() if n in before}
    return change, largest


def found(run_dir) -> list:
    return [f for f in check_run(run_dir).findings if f.rule == "no-update"]


@pytest.mark.slow
def test_weights_that_never_move_are_an_error(tmp_path):
    change, largest = train(tmp_path / "bug", mlp(False), zero_before_step=True)
    assert largest == 0 and all(bool((d == 0).all()) for d in change.values())
    (f,) = found(tmp_path / "bug")
    assert (f.severity, f.metric, f.step) == ("error", "update_norm", STEPS - 1)
    assert f"all 2 trainable weight matrices at all {STEPS} recorded steps" in f.message
    assert "gradients were 0 when the optimizer stepped" in f.message
    change, largest = train(tmp_path / "ok", mlp(False), zero_before_step=False)
    assert largest > 0 and all(bool((d != 0).any()) for d in change.values())
    assert found(tmp_path / "ok") == []


def test_a_dead_network_is_an_error_even_when_weight_decay_moves_it(tmp_path):
    change, largest = train(tmp_path / "dead", mlp(True), zero_before_step=False, decay=0.1)
    assert largest == 0 and all(bool((d != 0).any()) for d in change.values())  # decay only
    (f,) = found(tmp_path / "dead")
    assert (f.severity, f.metric) == ("error", "param_grad_norm")
    assert "no weight matrix received a gradient" in f.message and "dead" in f.remedy
    train(tmp_path / "alive", mlp(False), zero_before_step=False, decay=0.1)
    assert found(tmp_path / "alive") == []


def test_a_dead_network_is_not_told_that_adams_eps_damps_its_updates(tmp_path):
    """sqrt(v) = 0 in every weight matrix: no gradient reached them (no-update says so), and
    there is no update for eps to damp. Gradients that do arrive, under an eps as large as
    they are, still get the finding: an error, with eps above most matrices' gradient rms."""
    train(tmp_path / "dead", mlp(True), zero_before_step=False)
    rules = {f.rule: f for f in check_run(tmp_path / "dead").findings}
    assert "no-update" in rules and "adam-epsilon" not in rules
    _, largest = train(tmp_path / "big-eps", mlp(False), zero_before_step=False, eps=1.0)
    (f,) = [f for f in check_run(tmp_path / "big-eps").findings if f.rule == "adam-epsilon"]
    assert 0 < f.value < 10
    # Every gradient entry stayed under eps = 1, so sqrt(v) did too: eps outweighs it, and
    # the finding says by how much (1 / the ratio) and that the step is an SGD step.
    assert largest < 1 and f.value < 1
    assert f"eps is {1 / f.value:.3g}x its gradient rms" in f.message and "SGD" in f.message
    # Under eps in most matrices (the median ratio below 1): the model trains as SGD at
    # lr/eps, an error. The median is the recorded ratios' at the last step.
    ratios = stabscope.load_run(tmp_path / "big-eps", metrics="adam_sqrtv_over_eps")
    ratios = ratios[ratios.module.str.endswith("weight")]
    median = float(ratios[ratios.step == ratios.step.max()].value.median())
    assert median < 1 and f.severity == "error"
    assert f"the median over the 2 weight matrices is {median:.3g}" in f.message


class TwoStage(nn.Module):
    """A front (8 -> 64 -> 64) and a back (64 -> 4); ``cut`` decides how the front's output
    reaches the back: through the graph, ``detach`` (the bug), or ``no_grad`` (a front meant
    to stay frozen while an optimizer still holds it). ``side`` is a small module whose
    output is computed and never used."""

    def __init__(self, cut: str, side: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.front = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64))
        self.back = nn.Linear(64, 4)
        self.side = nn.Linear(64, 2) if side else None
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cut == "no_grad":
            with torch.no_grad():
                h = self.front(x)
        else:
            h = self.front(x)
        if self.cut == "detach":
            h = h.detach()
        if self.side is not None:
            self.side(h)  # computed, never reaches the loss
        return self.back(h)


def test_a_front_cut_off_by_detach_is_an_error_and_one_frozen_under_no_grad_is_not(tmp_path):
    for cut in ("detach", "no_grad"):
        net = TwoStage(cut)
        change, _ = train(tmp_path / cut, net, zero_before_step=False)
        # The reference: the front's weights never moved, and never got a gradient.
        assert all(bool((change[f"front.{i}.weight"] == 0).all()) for i in (0, 2))
        assert all(p.grad is None for p in net.front.parameters())
        assert bool((change["back.weight"] != 0).any())
    (f,) = found(tmp_path / "detach")
    share = (8 * 64 + 64 * 64) / (8 * 64 + 64 * 64 + 64 * 4)  # values of the cut matrices
    assert (f.severity, f.metric, f.module) == ("error", "param_grad_norm", "front.0.weight")
    assert f.value == pytest.approx(share) and "front.2.weight" in f.message
    assert f"at any of the {STEPS} recorded steps" in f.message and ".detach()" in f.remedy
    # Run under no_grad its modules' outputs never entered the graph: frozen on purpose.
    assert found(tmp_path / "no_grad") == []


def test_a_small_module_whose_output_never_reaches_the_loss_is_a_warning(tmp_path):
    net = TwoStage("graph", side=True)
    change, _ = train(tmp_path / "side", net, zero_before_step=False)
    assert bool((change["side.weight"] == 0).all()) and net.side.weight.grad is None
    (f,) = found(tmp_path / "side")
    reached = 8 * 64 + 64 * 64 + 64 * 4
    assert (f.severity, f.module) == ("warning", "side.weight")
    assert f.value == pytest.approx(64 * 2 / (reached + 64 * 2))
