"""Norm inputs, token correlation, output logits, Adam's eps ratio and the model update,
each against a direct computation on the sample GPT; and a model with no structure."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import stabscope
from stabscope import Schedule
from tests.conftest import record_steps, sample_gpt


def run_sample(tmp_path, preset="standard", steps=1, norm="pre"):
    model, forward = sample_gpt(norm, depth=2)
    before = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    record_steps(model, tmp_path, forward, opt, steps, preset=preset, schedule=Schedule(steps, 0))
    return before, model, forward, opt, stabscope.load_run(tmp_path, phase="train")


def captured(model, forward, names):
    """Inputs and outputs of the named modules during one forward pass."""
    seen = {}

    def keep(name, module, args, output):
        seen.setdefault(name, (args[0].detach(), output.detach()))

    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: keep(n, m, a, o)) for n in names
    ]
    with torch.no_grad():
        forward(model)
    for h in handles:
        h.remove()
    return seen


def value(df, module, metric, step=0):
    sel = df[(df.module == module) & (df.metric == metric) & (df.step == step)]
    assert len(sel) == 1, (module, metric)
    return float(sel.value.iloc[0])


def test_norm_input_and_token_correlation(tmp_path):
    before, _, forward, _, df = run_sample(tmp_path)
    seen = captured(before, forward, ["blocks.1.ln2", "blocks.0", "blocks.1"])
    x = seen["blocks.1.ln2"][0]
    assert value(df, "blocks.1.ln2", "norm_input_rms") == pytest.approx(
        x.pow(2).mean().sqrt().item(), rel=1e-5
    )
    for block in ("blocks.0", "blocks.1"):
        out = seen[block][1].double()  # (B, T, D)
        idx = np.unique(np.round(np.linspace(0, out.shape[1] - 1, min(64, out.shape[1]))))
        s = out[:2, idx]
        gram = torch.einsum("bid,bjd->bij", s, s)
        n = s.shape[1]
        diag = gram.diagonal(dim1=1, dim2=2).mean()
        off = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)).sum() / (2 * n * (n - 1))
        assert value(df, block, "token_corr") == pytest.approx((off / diag).item(), rel=1e-4)


def test_rank_collapse_reads_one():
    from stabscope.probes.correlation import token_correlation

    same = torch.randn(1, 1, 32).expand(2, 10, 32)  # every token the same vector
    assert token_correlation(same).item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    independent = torch.randn(2, 64, 4096, generator=g)  # E<x_i, x_j> = 0 for i != j
    assert abs(token_correlation(independent).item()) < 0.01


def test_output_logits(tmp_path):
    before, _, forward, _, df = run_sample(tmp_path)
    seen = captured(before, forward, ["head"])
    z = seen["head"][1].double()
    assert value(df, "<root>", "logit_lse_mean") == pytest.approx(
        torch.logsumexp(z, -1).mean().item(), rel=1e-5
    )
    assert value(df, "<root>", "logit_max") == pytest.approx(z.max().item(), rel=1e-6)
    assert value(df, "<root>", "logit_min") == pytest.approx(z.min().item(), rel=1e-6)


def entropies64(z: torch.Tensor) -> tuple[float, float]:
    """(mean H(p_i), H(p̄)) of (..., V) logits in float64 numpy, 0·log 0 = 0."""
    p = torch.softmax(z.double(), -1).reshape(-1, z.shape[-1]).numpy()

    def h(q: np.ndarray) -> np.ndarray:
        return -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)

    return float(h(p).mean()), float(h(p.mean(0)))


def test_prediction_entropies(tmp_path):
    before, _, forward, _, df = run_sample(tmp_path)
    z = captured(before, forward, ["head"])["head"][1]  # (B, T, V)
    each, marginal = entropies64(z)
    assert value(df, "<root>", "pred_entropy") == pytest.approx(each, rel=1e-5)
    assert value(df, "<root>", "pred_marginal_entropy") == pytest.approx(marginal, rel=1e-5)


def test_prediction_entropies_of_masked_classes_and_many_positions():
    from stabscope.probes.logits import ENTROPY_ROWS, prediction_entropies

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 7, generator=g)
    z[..., 0] = -torch.inf  # a class masked out everywhere: it adds nothing
    np.testing.assert_allclose(prediction_entropies(z).numpy(), entropies64(z), rtol=1e-5)
    same = torch.randn(7, generator=g).expand(4, 9, 7)  # one prediction everywhere
    each, marginal = prediction_entropies(same).tolist()
    assert marginal - each == pytest.approx(0.0, abs=1e-6)
    # More positions than ENTROPY_ROWS: the evenly spaced rows, read as above.
    big = torch.randn(ENTROPY_ROWS + 905, 11, generator=g)
    pick = [k * (len(big) - 1) // (ENTROPY_ROWS - 1) for k in range(ENTROPY_ROWS)]
    assert pick[0] == 0 and pick[-1] == len(big) - 1
    np.testing.assert_allclose(prediction_entropies(big).numpy(), entropies64(big[pick]), rtol=1e-5)


class ConvTagger(nn.Module):
    """Per-position classes from a 1x1 convolution: logits (B, C=6, T=10), the layout
    ``cross_entropy`` takes (a WaveNet's, a segmentation net's)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv1d(3, 16, 3, padding=1)
        self.head = nn.Conv1d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_output_logits_of_a_convolution_head_read_its_channels_as_classes(tmp_path):
    torch.manual_seed(0)
    model = ConvTagger()
    x = torch.randn(4, 3, 10)
    y = torch.randint(6, (4, 10))
    with torch.no_grad():
        z = model(x).double().movedim(1, -1)  # (B, T, C): the classes last, as read
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    record_steps(model, tmp_path, loss, opt, 1, schedule=Schedule(1, 0))
    df = stabscope.load_run(tmp_path, phase="train")
    assert value(df, "<root>", "logit_lse_mean") == pytest.approx(
        torch.logsumexp(z, -1).mean().item(), rel=1e-5
    )
    each, marginal = entropies64(z)
    assert marginal <= np.log(6) + 1e-9  # over the 6 classes, not the 10 positions
    assert value(df, "<root>", "pred_entropy") == pytest.approx(each, rel=1e-5)
    assert value(df, "<root>", "pred_marginal_entropy") == pytest.approx(marginal, rel=1e-5)


class LossFirst(nn.Module):
    """The sample GPT returning ``(loss, logits)``, HF's ``return_dict=False`` order."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gpt(batch[:, :-1])  # (B, T, V)
        targets = batch[:, 1:].reshape(-1)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets), logits


def test_output_logits_after_the_loss_in_a_tuple(tmp_path):
    gpt, _ = sample_gpt("pre", depth=2)  # vocabulary 32, 8 positions
    batch = torch.randint(32, (2, 9), generator=torch.Generator().manual_seed(0))
    model = LossFirst(gpt)
    with torch.no_grad():
        z = model(batch)[1].double()  # the logits of step 0, before any update
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    record_steps(model, tmp_path, lambda m: m(batch)[0], opt, 1, schedule=Schedule(1, 0))
    df = stabscope.load_run(tmp_path, phase="train")
    assert value(df, "<root>", "logit_lse_mean") == pytest.approx(
        torch.logsumexp(z, -1).mean().item(), rel=1e-5
    )
    assert value(df, "<root>", "logit_max") == pytest.approx(z.max().item(), rel=1e-6)
    assert value(df, "<root>", "logit_min") == pytest.approx(z.min().item(), rel=1e-6)


def test_adam_eps_ratio(tmp_path):
    _, model, _, opt, df = run_sample(tmp_path)
    p = model.blocks[0].mlp.fc.weight
    v = opt.state[p]["exp_avg_sq"]
    v_hat = v.double() / (1 - 0.999 ** float(opt.state[p]["step"]))  # Adam's bias correction
    expected = v_hat.mean().sqrt().item() / 1e-8
    assert value(df, "blocks.0.mlp.fc.weight", "adam_sqrtv_over_eps") == pytest.approx(
        expected, rel=1e-5
    )


class SpectralFilter(nn.Module):
    """A learned complex filter in the frequency domain: one complex weight per frequency."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n // 2 + 1, dtype=torch.cfloat) * 0.1 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, n)
        return torch.fft.irfft(torch.fft.rfft(x) * self.w, n=x.shape[-1])


def test_adam_eps_ratio_of_a_complex_parameter(tmp_path, recwarn):
    """Adam steps a complex parameter through its real view: v holds the real and imaginary
    parts' second moments, and the ratio reads all of them (no complex-to-real cast). The
    stability index leaves the complex parameter out (its Hessian is over the real view's
    pairs) and measures the others."""
    torch.manual_seed(0)
    model = nn.Sequential(SpectralFilter(16), nn.Tanh(), nn.Linear(16, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    x = torch.randn(8, 16)
    forward = lambda m: (m(x) - x.roll(1, -1)).pow(2).mean()  # noqa: E731
    record_steps(model, tmp_path, forward, opt, 3, schedule=Schedule(3, 0))
    df = stabscope.load_run(tmp_path, phase="train")
    # The stability index (at step 2) reads the real parameters only: measured, no cast.
    assert value(df, "__run__", "stability_index", step=2) > 0
    p = model[0].w
    v = torch.view_as_real(opt.state[p]["exp_avg_sq"]).double()  # (9, 2), after step 2
    v_hat = v / (1 - 0.999 ** float(opt.state[p]["step"]))
    expected = v_hat.mean().sqrt().item() / 1e-8
    assert value(df, "0.w", "adam_sqrtv_over_eps", step=2) == pytest.approx(expected, rel=1e-5)
    assert not [w for w in recwarn if "complex" in str(w.message).lower()]


@pytest.mark.slow
def test_model_update_in_full_preset(tmp_path):
    before, after, forward, _, df = run_sample(tmp_path, preset="full", steps=3)

    def output(m):
        m.eval()
        with torch.no_grad():
            seen = captured(m, forward, ["head"])
        return seen["head"][1].double()

    f0, f3 = output(before), output(after)
    assert value(df, "__run__", "model_update", step=2) == pytest.approx(
        (f3 - f0).norm().item(), rel=1e-4
    )
    assert value(df, "__run__", "model_update_rel", step=2) == pytest.approx(
        ((f3 - f0).norm() / f0.norm()).item(), rel=1e-4
    )
    assert (
        0
        < value(df, "__run__", "model_update", step=0)
        < value(df, "__run__", "model_update", step=2)
    )


def test_model_update_is_off_in_standard_and_on_when_asked(tmp_path):
    *_, df = run_sample(tmp_path / "std")
    assert df[df.metric == "model_update"].empty
    model, forward = sample_gpt("pre", 2)
    cfg = stabscope.RecorderConfig(preset="cheap", model_update=True, schedule=Schedule(1, 0))
    with stabscope.Recorder(model, tmp_path / "cheap", cfg, forward=forward) as rec:
        forward(model).backward()
        rec.step()
    got = stabscope.load_run(tmp_path / "cheap")
    assert set(got.metric.astype(str)) >= {"model_update", "act_rms"}
    assert got[got.metric.astype(str).str.startswith("attn")].empty


@pytest.mark.slow
def test_model_update_probe_keeps_training_bit_identical(tmp_path):
    model, forward = sample_gpt("post", 2)
    twin = copy.deepcopy(model)
    torch.manual_seed(3)
    with stabscope.Recorder(model, tmp_path, preset="full", forward=forward) as rec:
        for _ in range(3):
            forward(model).backward()
            rec.step()
    torch.manual_seed(3)
    for _ in range(3):
        forward(twin).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_model_without_structure_records_generic_moments(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    with stabscope.Recorder(model, tmp_path, forward=lambda m: m(x)) as rec:
        model(x).sum().backward()
        rec.step()
    meta = stabscope.read_meta(tmp_path)
    assert meta["structure"]["recognised"] is False
    assert "no residual blocks found" in meta["notes"][0]
    metrics = set(stabscope.load_run(tmp_path).metric.astype(str))
    assert {"act_rms", "grad_rms", "logit_max"} <= metrics
    assert not {m for m in metrics if m.startswith(("res_", "attn_"))}


def test_structure_learned_from_first_step_without_forward(tmp_path):
    model, forward = sample_gpt("post", 2)
    with stabscope.Recorder(model, tmp_path, schedule=Schedule(2, 0)) as rec:
        for _ in range(2):
            forward(model).backward()
            rec.step()
    meta = stabscope.read_meta(tmp_path)
    assert meta["structure"]["recognised"]
    res = stabscope.load_run(tmp_path, metrics="res_ratio")
    assert sorted(res.step.unique()) == [1]  # probes start on the step after discovery
