"""The stability index against the exact Hessian of small models, and as a recorded metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import batch_maker, record_steps, train
from torch import nn

from stabscope import Recorder, RecorderConfig, load_run, read_meta
from stabscope.errors import ConfigError
from stabscope.probes.index_budget import IndexBudget
from stabscope.probes.sharpness import (
    BUDGET_NOTE,
    due,
    hessian_vector_product,
    lanczos_top,
    stability_index,
)
from stabscope.probes.stability_scale import scales
from stabscope.record.config import config_from_mapping

torch.manual_seed(0)
X = torch.randn(16, 4)
Y = torch.randint(0, 3, (16,))


def small() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def loss_of(model: nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(X), Y)


def exact_hessian(model: nn.Module) -> torch.Tensor:
    """(P, P) Hessian of the loss in the flattened parameters, by torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def f(v: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for name, shape in zip(names, shapes):
            n = int(np.prod(shape))
            parts[name] = v[i : i + n].reshape(shape)
            i += n
        out = torch.func.functional_call(model.double(), parts, (X.double(),))
        return F.cross_entropy(out, Y)

    hess = torch.autograd.functional.hessian(f, flat)
    model.float()
    return hess


def index_by_hand(opt: torch.optim.Optimizer, model: nn.Module, limit: float) -> float:
    """λ_max(M^½ H M^½) with M written out from the optimizer's own state (not the probe's)
    and, for Adam, the probe batch's gradient: the v and t the next step would use."""
    grads = dict(zip(model.parameters(), torch.autograd.grad(loss_of(model), model.parameters())))
    parts = []
    for group in opt.param_groups:
        for p in group["params"]:
            lr, st = group["lr"], opt.state[p]
            if "exp_avg_sq" in st:  # Adam: lr / ((1 - β1^t) limit (√(v / (1 - β2^t)) + ε))
                b1, b2 = group["betas"]
                t = float(st["step"]) + 1
                v = b2 * st["exp_avg_sq"].double() + (1 - b2) * grads[p].double() ** 2
                d = (v / (1 - b2**t)).sqrt() + group["eps"]
                parts.append((lr / ((1 - b1**t) * limit) / d).reshape(-1))
            else:
                parts.append(torch.full((p.numel(),), lr / limit, dtype=torch.float64))
    m = torch.cat(parts).sqrt()
    return float(torch.linalg.eigvalsh(m[:, None] * exact_hessian(model) * m[None, :])[-1])


def stepped(make_opt, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = small()
    opt = make_opt(model)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    return model, opt


class ClippedAdam(torch.optim.Adam):
    """A subclass that clips inside ``step``, as scripts write it: Adam's update and state."""

    def step(self, closure=None):  # type: ignore[override]
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], 1.0)
        return super().step(closure)


class MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize(
    "make_opt, limit",
    [
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.3), 2.0),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), 3.8),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, nesterov=True), 1.5),
        (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), 38.0),
        (lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.8, 0.99)), 18.0),
        (lambda m: ClippedAdam(m.parameters(), lr=1e-2), 38.0),
        (lambda m: MySGD(m.parameters(), lr=0.1, momentum=0.9), 3.8),
    ],
    ids=["sgd", "momentum", "nesterov", "adam", "adamw", "adam-subclass", "sgd-subclass"],
)
def test_index_equals_exact_hessian_eigenvalue(make_opt, limit) -> None:
    # 43 parameters: 43 Lanczos steps span the whole space, so the top Ritz value is exact.
    model, opt = stepped(make_opt)
    found, lr = stability_index(model, loss_of, [opt], iterations=43)
    assert lr == opt.param_groups[0]["lr"]
    assert found == pytest.approx(index_by_hand(opt, model, limit), rel=1e-4)


def test_param_groups_with_their_own_lr() -> None:
    def make(m: nn.Sequential) -> torch.optim.Optimizer:
        groups = [{"params": m[0].parameters(), "lr": 0.05}, {"params": m[2].parameters()}]
        return torch.optim.SGD(groups, lr=0.5)

    model, opt = stepped(make)
    found, lr = stability_index(model, loss_of, [opt], iterations=43)
    assert lr == 0.5
    assert found == pytest.approx(index_by_hand(opt, model, 2.0), rel=1e-4)


def test_few_iterations_are_close_and_never_above() -> None:
    # The top Ritz value rises to λ_max from below as the Krylov space grows.
    model, opt = stepped(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))
    exact = index_by_hand(opt, model, 38.0)
    few, _ = stability_index(model, loss_of, [opt], iterations=8)
    assert few <= exact * (1 + 1e-5)
    assert few == pytest.approx(exact, rel=0.05)


def test_lanczos_on_a_known_spectrum() -> None:
    eig = torch.linspace(-3.0, 2.0, 50)  # the top eigenvalue is 2, the largest |λ| is -3
    top = lanczos_top(lambda v: [eig * v[0]], [torch.zeros(50)], iterations=50)
    assert top == pytest.approx(2.0, rel=1e-6)


def test_the_probe_leaves_training_alone() -> None:
    model, opt = stepped(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    state = [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    stability_index(model, loss_of, [opt], iterations=8)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(
        torch.equal(a, opt.state[p]["exp_avg_sq"]) for a, p in zip(state, model.parameters())
    )
    assert all(p.grad is not None for p in model.parameters())  # the last step's, untouched
    assert torch.equal(rng, torch.get_rng_state())


def test_unsupported_or_unready_optimizers_say_why() -> None:
    model = small()
    assert "Adagrad" in stability_index(model, loss_of, [torch.optim.Adagrad(model.parameters())])
    fresh = torch.optim.Adam(model.parameters())
    assert stability_index(model, loss_of, [fresh]) == "the optimizer has not stepped yet"
    assert scales([fresh]).not_ready


def test_recorded_at_powers_of_two(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    make = batch_maker(6, 3)
    probe_x, probe_y = make(0)
    rec = Recorder(model, tmp_path / "run", forward=lambda m: (m(probe_x) - probe_y).pow(2).mean())
    with rec:
        train(model, 10, make, rec=rec, lr=1e-2)
    df = load_run(tmp_path / "run", metrics=["stability_index", "stability_lr"])
    idx = df[df.metric == "stability_index"]
    assert sorted(idx.step) == [s for s in range(10) if due(s)] == [2, 4, 8]
    assert np.allclose(df[df.metric == "stability_lr"].value, 1e-2)
    assert (idx.value > 0).all()


def test_a_nonfinite_loss_is_skipped_not_raised(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(6, 3))
    make = batch_maker(6, 3)
    x, y = make(0)

    def forward(m: nn.Module) -> torch.Tensor:
        return (m(x) - y).pow(2).mean() * float("nan")

    with Recorder(model, tmp_path / "run", forward=forward) as rec:
        train(model, 5, make, rec=rec)
    assert load_run(tmp_path / "run", metrics="stability_index").empty


def test_a_parameter_that_never_had_a_gradient_is_left_out() -> None:
    # Adam keeps no state for a parameter whose grad stayed None (an unused embedding): it
    # does not move, so it has no step size, and the rest is measured as if it were absent.
    model = small()
    unused = nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([*model.parameters(), unused], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    found, _ = stability_index(model, loss_of, [opt], iterations=43)
    ref = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref.load_state_dict(
        {
            "state": opt.state_dict()["state"],
            "param_groups": [{**opt.state_dict()["param_groups"][0], "params": list(range(4))}],
        }
    )
    assert found == pytest.approx(index_by_hand(ref, model, 38.0), rel=1e-4)


def _budget_run(tmp_path, budget: float | None) -> tuple[nn.Module, dict]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    make = batch_maker(6, 3)
    probe_x, probe_y = make(0)
    cfg = RecorderConfig(sharpness_budget=budget)
    out = tmp_path / f"run-{budget}"
    rec = Recorder(model, out, cfg, forward=lambda m: (m(probe_x) - probe_y).pow(2).mean())
    with rec:
        train(model, 20, make, rec=rec, lr=1e-2)
    return model, read_meta(out)


def test_a_budget_skips_measurements_records_the_skips_and_leaves_training_alone(tmp_path):
    # A budget of 1e-9 of the training time admits no measurement: each scheduled one (steps
    # 2, 4, 8, 16) is skipped, counted and noted; the weights are those of a plain run.
    model, meta = _budget_run(tmp_path, 1e-9)
    assert meta["stability_index"]["skipped"] == 4 == sum(map(due, range(20)))
    assert meta["stability_index"]["measured"] == 0
    assert any(n.startswith(BUDGET_NOTE + "4 scheduled") for n in meta["notes"])
    assert load_run(tmp_path / "run-1e-09", metrics="stability_index").empty
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    train(plain, 20, batch_maker(6, 3), lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    # No budget: every scheduled step is measured, and training is the same again.
    free, meta = _budget_run(tmp_path, None)
    assert meta["stability_index"]["measured"] == 4 and meta["stability_index"]["skipped"] == 0
    assert not any(n.startswith(BUDGET_NOTE) for n in meta["notes"])
    assert all(torch.equal(a, b) for a, b in zip(free.parameters(), plain.parameters()))


def test_budget_arithmetic_on_a_known_clock() -> None:
    # Steps of 1 s; each measurement 3 s; 25% of the training time. Allowed when the spent
    # time plus the next cost (the last one's; 3 steps = 3 s before the first) fits.
    now = [0.0]

    def read() -> float:
        return now[0]

    budget = IndexBudget(0.25, first_cost=3.0, clock=read)
    allowed = []
    for step in range(64):
        now[0] += 1.0  # the step trains for 1 s
        budget.tick()
        if due(step):
            ok = budget.allows()
            allowed.append((step, ok))
            if ok:
                now[0] += 3.0  # the measurement
                budget.charge(3.0)
    # training after step s: s seconds (the clock starts at the first boundary).
    # step 2: 0 + 3 <= 0.25 * 2? no. 4: 3 <= 1? no. 8: 3 <= 2? no. 16: 3 <= 4 yes (spent 3).
    # 32: 6 <= 8 yes (spent 6). no more due steps below 64 but 32.
    assert allowed == [(2, False), (4, False), (8, False), (16, True), (32, True)]
    assert (budget.measured, budget.skipped, budget.spent) == (2, 3, 6.0)
    assert budget.training == 63.0
    # A planned run of 1000 steps of 1 s allows 250 s: every measurement from the first.
    planned = IndexBudget(0.25, first_cost=3.0, clock=read)
    planned.tick()
    now[0] += 1.0
    planned.tick()
    assert planned.allows(planned=1000) and not planned.allows()


def test_a_bad_budget_in_pyproject_names_the_key() -> None:
    with pytest.raises(ConfigError, match="sharpness_budget"):
        config_from_mapping({"sharpness_budget": -1})
    assert config_from_mapping({"sharpness_budget": 0.05}).sharpness_budget == 0.05


def test_the_forecast_says_why_an_optimizer_got_no_index(tmp_path) -> None:
    from stabscope.rules import check_run

    model = small()
    opt = torch.optim.Adagrad(model.parameters(), lr=1e-2)
    with Recorder(model, tmp_path / "run", forward=loss_of) as rec:
        for _ in range(6):
            loss = loss_of(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    (forecast,) = [f for f in check_run(tmp_path / "run").findings if f.rule == "failure-forecast"]
    evidence = {e["signal"]: e["evidence"] for e in forecast.evidence}
    assert (
        evidence["stability_now"]
        == "stability index not measured: no stability threshold for Adagrad"
    )


def _clipped_run(out, max_norm: float | None) -> list[float]:
    """SGD at lr 0.5 on ``small``'s loss scaled x50 (gradients of norm ~10-100), clipped to
    ``max_norm`` (None: no clip) before each step, every step recorded. Returns the clip's
    factor per step by the script's own account: min(1, max_norm / (total + 1e-6)), the
    total being clip_grad_norm_'s return."""
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    factors = []
    with Recorder(model, out, forward=lambda m: 50 * loss_of(m)) as rec:
        for _ in range(9):
            loss = 50 * loss_of(model)
            opt.zero_grad()
            loss.backward()
            if max_norm is not None:
                total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                factors.append(min(1.0, max_norm / (total + 1e-6)))
            opt.step()
            rec.step(loss=loss)
    return factors


def test_a_clipped_step_is_read_at_its_clipped_size(tmp_path) -> None:
    """The index is the step's size in units of the edge: a clip that scales the gradient by
    f scales SGD's step by f, so the signal reads S x f at each measured step (the factor by
    the script's own clip), and an unclipped run reads S as measured."""
    import math

    from stabscope import load_run
    from stabscope.rules.stability_features import stability_features
    from stabscope.rules.view import RunView

    factors = _clipped_run(tmp_path / "clip", 0.1)
    index = load_run(tmp_path / "clip", metrics="stability_index").set_index("step").value
    assert list(index.index) == [2, 4, 8]
    scaled = [index[s] * factors[s] for s in (4, 8)]  # the last two, as S_now reads them
    assert max(factors[s] for s in (2, 4, 8)) < 0.05  # the clip is active: a x20+ cut
    found = stability_features(RunView.open(tmp_path / "clip"))
    assert found["stability_now"].value == pytest.approx(
        math.log10(math.sqrt(scaled[0] * scaled[1])), abs=1e-4
    )
    assert "scaled by the clip's factor" in found["stability_now"].evidence
    _clipped_run(tmp_path / "free", None)
    free = load_run(tmp_path / "free", metrics="stability_index").set_index("step").value
    plain = stability_features(RunView.open(tmp_path / "free"))["stability_now"]
    assert plain.value == pytest.approx(math.log10(math.sqrt(free[4] * free[8])), abs=1e-6)
    assert "clip" not in plain.evidence


def test_a_measurement_whose_clip_factor_has_not_landed_waits(tmp_path) -> None:
    """While a run trains, a step's gradient norms reach host memory at the next sync: the
    index measured at step 8 of a run that clips every step to 1% has no factor yet when the
    norms have landed up to step 5. It is left out (its raw 100 would read as 100x past the
    edge), and the signal reads the measurements whose factor is known. A run that wrote its
    norms at recorded steps only (step 10 after it, none at 8) saw no clip there: x1."""
    import math

    from stabscope.rules.stability_features import stability_features
    from stabscope.rules.view import RunView
    from tests.rule_runs import write

    def run(name: str, norm_steps: list[int]) -> dict:
        rows = [(s, "__run__", "stability_index", -1, 100.0) for s in (2, 4, 8)]
        rows += [(s, "__run__", "stability_lr", -1, 0.1) for s in (2, 4, 8)]
        rows += [(s, "__run__", "grad_norm", -1, 50.0) for s in norm_steps]
        rows += [(s, "__run__", "grad_norm_clipped", -1, 0.5) for s in norm_steps]
        return stability_features(RunView.open(write(tmp_path / name, rows)))

    waiting = run("waiting", list(range(6)))
    assert waiting["stability_now"].value == pytest.approx(math.log10(1.0), abs=1e-6)
    assert waiting["stability_now"].step == 4 and waiting["stability_peak"].step == 2
    landed = run("landed", list(range(9)))
    assert landed["stability_now"].step == 8
    assert landed["stability_peak"].value == pytest.approx(0.0, abs=1e-6)  # 100 x 0.01
    older = run("older", [*range(6), 10])
    assert older["stability_peak"].value == pytest.approx(2.0, abs=1e-6)  # step 8 read x1
    assert older["stability_peak"].step == 8


def test_a_loss_without_a_second_derivative_is_said_so(tmp_path) -> None:
    """CTC's loss has no double backward in torch (its own error names the op): the index is
    not measured, and the note says why in words, with torch's message."""
    T, C, N, S = 12, 5, 3, 4
    model = nn.Linear(6, C)
    x, targets = torch.randn(T, N, 6), torch.randint(1, C, (N, S))

    def loss_of(m: nn.Module) -> torch.Tensor:
        logp = m(x).log_softmax(-1)  # (T, N, C)
        return F.ctc_loss(logp, targets, torch.full((N,), T), torch.full((N,), S))

    hvp, _ = hessian_vector_product(loss_of(model), list(model.parameters()))
    with pytest.raises(RuntimeError, match="derivative for aten::_ctc_loss_backward") as torch_says:
        hvp([torch.ones_like(p) for p in model.parameters()])
    record_steps(model, tmp_path, loss_of, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    (note,) = [n for n in read_meta(tmp_path)["notes"] if n.startswith("stability_index")]
    assert "has no second derivative in torch" in note
    assert str(torch_says.value).splitlines()[0] in note
