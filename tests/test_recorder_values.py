"""Every recorded number against a naive autograd computation of the same quantity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import stabscope
from stabscope import Schedule
from stabscope.probes.kernels import host_kernels
from tests.conftest import batch_maker, mlp, train

STEPS = 3


def reference_stats(model, make_batch, steps, lr=1e-2):
    """Re-run training by hand, layer by layer, collecting every statistic the recorder makes."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out: dict[tuple[int, str, str], float] = {}
    names = ["0", "1", "2", "3", "4"]
    for step in range(steps):
        x, y = make_batch(step)
        acts = []
        h = x
        for layer in model:
            h = layer(h)
            h.retain_grad()
            acts.append(h)
        loss = (h - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for name, a in zip([*names, "<root>"], [*acts, acts[-1]]):
            a64, g64 = a.detach().double(), a.grad.double()
            out[(step, name, "act_mean")] = a64.mean().item()
            out[(step, name, "act_rms")] = a64.pow(2).mean().sqrt().item()
            out[(step, name, "act_absmax")] = a64.abs().max().item()
            out[(step, name, "grad_rms")] = g64.pow(2).mean().sqrt().item()
            out[(step, name, "grad_mean")] = g64.mean().item()
            out[(step, name, "grad_absmax")] = g64.abs().max().item()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            out[(step, n, "param_norm")] = p.detach().double().norm().item()
            out[(step, n, "param_rms")] = p.detach().double().pow(2).mean().sqrt().item()
            out[(step, n, "param_grad_norm")] = p.grad.double().norm().item()
        opt.step()
        for n, p in model.named_parameters():
            delta = (p.detach() - before[n]).double().norm().item()
            out[(step, n, "update_norm")] = delta
            out[(step, n, "update_ratio")] = delta / before[n].double().norm().item()
        out[(step, "__run__", "loss")] = loss.item()
    return out


# Both CPU moment paths: numba's single pass (when installed) and torch's reductions.
@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_every_metric_matches_naive_reference(run_dir, kernel, monkeypatch):
    if kernel == "numba" and not host_kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(host_kernels, "AVAILABLE", kernel == "numba")
    torch.manual_seed(0)
    model = mlp()
    ref_model = copy.deepcopy(model)
    make = batch_maker(6, 3)
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=STEPS, every=0)) as rec:
        train(model, STEPS, make, rec)
    expected = reference_stats(ref_model, make, STEPS)
    df = stabscope.load_run(run_dir, phase="train")
    got = {
        (int(r.step), str(r.module), str(r.metric)): float(r.value)
        for r in df.itertuples()
        if r.call == 0
    }
    checked = 0
    for key, value in expected.items():
        assert key in got, f"missing {key}"
        assert got[key] == pytest.approx(value, rel=2e-5, abs=1e-7), key
        checked += 1
    assert checked == len(expected) > 100
    assert stabscope.read_meta(run_dir)["cpu_moments"] == kernel


def test_lr_follows_the_scheduler(run_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    make = batch_maker(6, 3)
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=1, every=0)) as rec:
        for step in range(4):
            x, y = make(step)
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            rec.step(loss=loss)
    lr = stabscope.load_run(run_dir, metrics="lr").sort_values("step")
    # The lr recorded at step s is the one its optimizer step used, 0.1 * 0.5**s, although
    # the scheduler had moved the group on to the next step's when rec.step() was called.
    np.testing.assert_allclose(lr.value, [0.1 * 0.5**s for s in range(4)], rtol=1e-6)
    # Loss is recorded on every step, including the three that carried no hooks.
    assert sorted(stabscope.load_run(run_dir, metrics="loss").step) == [0, 1, 2, 3]


def test_eval_pass_is_kept_apart(run_dir):
    torch.manual_seed(0)
    model = mlp()
    make = batch_maker(6, 3)
    x_eval = torch.randn(4, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=1, every=0)) as rec:
        x, y = make(0)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            expected = model(x_eval)
        model.train()
        rec.step(loss=loss)
    ev = stabscope.load_run(run_dir, phase="eval")
    assert set(ev.metric.astype(str)) == {"act_mean", "act_rms", "act_absmax", "act_nonfinite"}
    rms = ev[(ev.module == "<root>") & (ev.metric == "act_rms")].value.item()
    assert rms == pytest.approx(expected.pow(2).mean().sqrt().item(), rel=1e-6)
    train = stabscope.load_run(run_dir, modules="<root>", metrics="act_rms", phase="train")
    assert len(train) == 1  # the eval call did not become call 1 of the training statistics


def test_cheap_preset_records_no_gradients(run_dir):
    model = mlp()
    with stabscope.Recorder(model, run_dir, preset="cheap") as rec:
        train(model, 2, batch_maker(6, 3), rec)
    metrics = set(stabscope.load_run(run_dir).metric.astype(str))
    assert "act_rms" in metrics and "param_norm" in metrics
    # No gradient moments of module outputs and no update ratios; the run-level gradient norm
    # of every step is recorded at every preset.
    every_step = {"grad_norm", "grad_norm_clipped"}
    assert not {m for m in metrics - every_step if m.startswith(("grad_", "update"))}


def test_full_preset_adds_parameter_moments(run_dir):
    torch.manual_seed(0)
    model = mlp()
    w = model[0].weight.detach().clone()
    with stabscope.Recorder(model, run_dir, preset="full", schedule=Schedule(1, 0)) as rec:
        train(model, 1, batch_maker(6, 3), rec)
    df = stabscope.load_run(run_dir, modules="0.weight", metrics=["param_absmax", "param_mean"])
    vals = dict(zip(df.metric.astype(str), df.value))
    assert vals["param_absmax"] == pytest.approx(w.abs().max().item(), rel=1e-6)
    assert vals["param_mean"] == pytest.approx(w.mean().item(), rel=1e-5, abs=1e-8)


def test_module_filters(run_dir):
    model = mlp()
    with stabscope.Recorder(model, run_dir, include=["2*", "4*"], exclude=["*.bias"]) as rec:
        train(model, 1, batch_maker(6, 3), rec)
    modules = set(stabscope.load_run(run_dir).module.astype(str))
    assert modules == {"2", "4", "2.weight", "4.weight", "__run__"}


def test_one_host_sync_per_recorded_step(run_dir):
    model = mlp()
    schedule = Schedule(dense=3, every=5)
    with stabscope.Recorder(model, run_dir, schedule=schedule) as rec:
        train(model, 20, batch_maker(6, 3), rec)
        syncs_while_training = rec.host_syncs
    recorded = schedule.recorded_steps(20)  # 0, 1, 2, 5, 10, 15
    assert syncs_while_training == len(recorded) == 6
    # Losses of steps 16-19 waited on the device and were fetched once, at close.
    assert rec.host_syncs == 7
    assert sorted(stabscope.load_run(run_dir, metrics="loss").step) == list(range(20))
    assert stabscope.read_meta(run_dir)["host_syncs"] == 7


class _Residual(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.branch = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh())

    def forward(self, x):
        return x + self.branch(x)


def test_gradient_moments_through_residual_adds(run_dir):
    """A residual add hands one gradient tensor to both addends, so the branch output and the
    block output share their gradient moments; each must still match its own autograd grad."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), _Residual(8), _Residual(8))
    x = torch.randn(16, 4)
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=1, every=0)) as rec:
        model(x).pow(2).sum().backward()
        rec.step()
    df = stabscope.load_run(run_dir, metrics=["grad_rms", "grad_absmax"], phase="train")
    got = {(str(r.module), str(r.metric)): float(r.value) for r in df.itertuples()}

    model.zero_grad()
    outputs = {}
    h = model[0](x)
    outputs["0"] = h
    for i in (1, 2):
        branch = model[i].branch(h)
        h = h + branch
        outputs[f"{i}.branch"], outputs[str(i)] = branch, h
    for t in outputs.values():
        t.retain_grad()
    h.pow(2).sum().backward()
    for name, t in outputs.items():
        g = t.grad.double()
        assert got[(name, "grad_rms")] == pytest.approx(g.pow(2).mean().sqrt().item(), rel=1e-5)
        assert got[(name, "grad_absmax")] == pytest.approx(g.abs().max().item(), rel=1e-6)
    # d(x + f)/df = I: the branch's gradient is the block output's, an analytic identity.
    assert got[("2.branch", "grad_rms")] == got[("2", "grad_rms")]


class LoRALinear(torch.nn.Module):
    """A linear map with a zero-initialised bias and a LoRA adapter whose B starts at zero."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2) -> None:
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out)
        torch.nn.init.zeros_(self.base.bias)
        self.A = torch.nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.B = torch.nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.A.T @ self.B.T


def test_update_ratio_of_zero_initialised_parameters(run_dir):
    """||θ|| = 0 before the first step: no update_ratio row (undefined, never inf), the
    update_norm is there; from the second step on the ratio is ||Δθ|| / ||θ_before||."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(LoRALinear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    make = batch_maker(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    want: dict[tuple[int, str, str], float] = {}
    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=STEPS, every=0)) as rec:
        for step in range(STEPS):
            x, y = make(step)
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            opt.step()
            rec.step(loss=loss)
            for n, p in model.named_parameters():
                delta = (p.detach().double() - before[n]).norm().item()
                want[(step, n, "update_norm")] = delta
                if before[n].norm() > 0:
                    want[(step, n, "update_ratio")] = delta / before[n].norm().item()
    df = stabscope.load_run(run_dir, metrics=["update_norm", "update_ratio"])
    got = {(int(r.step), str(r.module), str(r.metric)): float(r.value) for r in df.itertuples()}
    assert got.keys() == want.keys()
    zero_init = {"0.B", "0.base.bias"}
    assert {m for s, m, k in got if s == 0 and k == "update_ratio"} == {
        "0.A",
        "0.base.weight",
        "2.weight",
        "2.bias",
    }
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert all(got[(0, n, "update_norm")] > 0 for n in zero_init)
    assert all((s, n, "update_ratio") in got for s in (1, 2) for n in zero_init)
    assert np.isfinite(df.value).all()


def test_two_optimizers_each_read_just_before_their_own_step(run_dir):
    """A GAN-style step: the discriminator's optimizer steps, then the generator's backward
    makes its gradients and its optimizer steps. Each parameter's weight and gradient norms
    are those its own ``optimizer.step()`` received (the generator's gradients do not exist
    yet when the discriminator steps: read there, they would be the previous step's)."""
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(4, 6), torch.nn.Linear(6, 1)
    model = torch.nn.ModuleDict({"gen": gen, "disc": disc})
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-2)
    want: dict[tuple[int, str, str], float] = {}

    def read(step: int, prefix: str, part: torch.nn.Module) -> None:
        for n, p in part.named_parameters():
            want[(step, f"{prefix}.{n}", "param_norm")] = p.detach().double().norm().item()
            want[(step, f"{prefix}.{n}", "param_grad_norm")] = p.grad.double().norm().item()

    with stabscope.Recorder(model, run_dir, schedule=Schedule(dense=STEPS, every=0)) as rec:
        for step in range(STEPS):
            z, real = torch.randn(8, 4), torch.randn(8, 6)
            opt_d.zero_grad()
            (disc(gen(z).detach()).mean() - disc(real).mean()).backward()
            read(step, "disc", disc)
            opt_d.step()
            opt_g.zero_grad()
            (-disc(gen(z)).mean()).backward()
            read(step, "gen", gen)
            opt_g.step()
            rec.step()
    df = stabscope.load_run(run_dir, metrics=["param_norm", "param_grad_norm"])
    got = {(int(r.step), str(r.module), str(r.metric)): float(r.value) for r in df.itertuples()}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


def test_a_recorder_opened_by_its_first_step_records_nothing_of_that_step_but_its_loss(run_dir):
    """Without ``with`` or ``start()``, the first ``rec.step()`` opens the run after that
    step's forward, backward and optimizer step: step 0 has its loss and no statistics (its
    weights read then would be step 1's, labelled step 0), a note says why, and every
    weight norm recorded is that of the weights its step's optimizer step received."""
    torch.manual_seed(0)
    model = mlp()
    make = batch_maker(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = stabscope.Recorder(model, run_dir, schedule=Schedule(dense=STEPS, every=0))
    want: dict[tuple[int, str], float] = {}
    losses = []
    for step in range(STEPS):
        x, y = make(step)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            want[(step, n)] = p.detach().double().norm().item()
        opt.step()
        rec.step(loss=loss)
        losses.append(loss.item())
    rec.close()
    df = stabscope.load_run(run_dir)
    assert df[df.step == 0].metric.unique().tolist() == ["loss"]
    assert df[df.metric == "loss"].value.tolist() == pytest.approx(losses)
    norms = df[df.metric == "param_norm"]
    assert sorted(set(norms.step)) == [1, 2]
    for r in norms.itertuples():
        assert r.value == pytest.approx(want[(r.step, r.module)], rel=1e-5)
    assert set(df[df.metric == "act_rms"].step) == {1, 2}
    notes = stabscope.read_meta(run_dir)["notes"]
    assert any("step 0 ran before the run opened" in n for n in notes), notes
