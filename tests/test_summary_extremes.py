"""`stabscope summary`'s largest and smallest modules: each module listed once, in the order
of the recorded values at the first recorded step (load_run's rows are the reference); and a
loss that overflowed while every module stayed finite is named, not "no non-finite values"."""

from __future__ import annotations

import math

import torch

import stabscope
from stabscope.analysis.summary import summarize
from stabscope.rules import check_run
from tests.cli_inputs import invoke
from tests.conftest import batch_maker, mlp, train


def record(run_dir):
    torch.manual_seed(0)
    model = mlp()  # five modules: three Linear, ReLU, Tanh
    with stabscope.Recorder(model, run_dir) as rec:
        train(model, 3, batch_maker(6, 3), rec)
    return run_dir


def reference(run_dir) -> list[tuple[str, float]]:
    """(module, grad_rms) at the first recorded step, largest first."""
    df = stabscope.load_run(run_dir, metrics="grad_rms", phase="train")
    df = df[~df.module.isin(["<root>", "__run__"])]
    at = df[df.step == df.step.min()].groupby("module", observed=True).value.max()
    return [(str(k), float(v)) for k, v in at.sort_values(ascending=False).items()]


def test_a_model_with_few_modules_lists_each_once(tmp_path):
    run = record(tmp_path / "run")
    want = reference(run)
    assert len(want) == 5
    s = summarize(run, top=3)  # 3 largest, then the 2 left as smallest, smallest first
    assert s.largest == want[:3]
    assert s.smallest == want[3:][::-1]
    s = summarize(run, top=5)  # every module is among the largest: none left for smallest
    assert s.largest == want and s.smallest == []
    s = summarize(run, top=2)
    assert s.largest == want[:2] and s.smallest == want[-2:][::-1]


def test_a_loss_that_overflows_while_every_module_stays_finite_is_named(tmp_path):
    """The squared error of a target at 1e20 is 1e40, past float32: the loss is inf at that
    step while the model's output and the gradient (2 * error / n, ~1e19) stay finite."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights never change
    run = tmp_path / "run"
    losses = []
    with stabscope.Recorder(model, run) as rec:
        for step in range(6):
            x = torch.randn(8, 4)
            y = torch.full((8, 1), 1e20 if step == 3 else 0.0)
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
            losses.append(loss.item())
    want = next(i for i, v in enumerate(losses) if not math.isfinite(v))
    assert want == 3
    s = summarize(run)
    assert s.first_nonfinite == {}  # no module output or gradient went non-finite
    assert s.loss_nonfinite_step == want
    result = invoke("summary", str(run))
    assert f"the loss did at step {want}" in " ".join(result.output.split())
    assert "no non-finite values recorded" not in result.output
    # The gate says the same, and that the flight recorder watched that very step: no advice
    # to record more steps to find a module.
    (f,) = [f for f in check_run(run).findings if f.rule == "nonfinite"]
    assert (f.step, f.module) == (want, "__run__")
    assert "the flight recorder watched it" in f.message and "denser" not in f.remedy


def test_a_frozen_body_under_a_trained_head_has_no_layer_trend_and_no_crash(tmp_path):
    """Linear probing: the numbered layers (body.0, body.2) are frozen, only the head (no
    layer index) has gradients. The per-layer gradient-norm trend has no layer to read, so
    there is none; the summary, and profile's, still come out (this raised IndexError)."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    model = torch.nn.ModuleDict({"body": body, "head": torch.nn.Linear(8, 3)})
    body.requires_grad_(False)
    opt = torch.optim.SGD(model["head"].parameters(), lr=0.1)
    make = batch_maker(6, 3)
    with stabscope.Recorder(model, tmp_path / "run") as rec:
        for step in range(3):
            x, y = make(step)
            loss = (model["head"](body(x)) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    grads = stabscope.load_run(tmp_path / "run", metrics="param_grad_norm")
    assert set(grads.module) == {"head.weight", "head.bias"}
    s = summarize(tmp_path / "run")
    assert s.param_trend is None
    result = invoke("summary", tmp_path / "run")
    assert result.exit_code == 0, result.output


class Twice(torch.nn.Module):
    """The same three-layer stack applied twice a step (an ODE's field, an unrolled cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(6, 6) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(self.layers(x)))


def test_the_depth_trend_of_a_module_called_twice_reads_what_the_extremes_read(tmp_path):
    torch.manual_seed(0)
    model = Twice()
    with stabscope.Recorder(model, tmp_path / "run") as rec:
        train(model, 3, batch_maker(6, 6), rec)
    df = stabscope.load_run(tmp_path / "run", metrics="grad_rms", phase="train")
    first = df[(df.step == df.step.min()) & df.module.isin([f"layers.{i}" for i in range(3)])]
    assert set(first.call) == {0, 1}  # each layer's two calls, each its own row
    s = summarize(tmp_path / "run")
    by_layer = first.groupby("module", observed=True).value.max()
    assert s.trend is not None and s.trend.metric == "grad_rms"
    # Both ends of the trend are the largest call of their layer, as the extremes' lines are.
    assert s.trend.values[0] == by_layer["layers.0"] and s.trend.values[-1] == by_layer["layers.2"]
    listed = dict(s.largest + s.smallest)
    assert listed["layers.0"] == by_layer["layers.0"]


def test_modules_that_pass_their_input_on_are_not_listed(tmp_path):
    """A Dropout at p = 0 and an Identity hand on their input's gradient: their grad_rms is
    their neighbour's (the recorded rows say so), and the extremes list the neighbour."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.0),
        torch.nn.Linear(12, 12),
        torch.nn.Identity(),
        torch.nn.Linear(12, 3),
    )
    with stabscope.Recorder(model, tmp_path / "run") as rec:
        train(model, 3, batch_maker(6, 3), rec)
    rows = dict(reference(tmp_path / "run"))
    assert rows["2"] == rows["1"] and rows["4"] == rows["3"]  # copies of their neighbours
    s = summarize(tmp_path / "run", top=2)
    listed = [name for name, _ in s.largest + s.smallest]
    assert "2" not in listed and "4" not in listed
    want = [(k, v) for k, v in reference(tmp_path / "run") if k not in ("2", "4")]
    assert s.largest == want[:2] and s.smallest == want[2:][::-1]
