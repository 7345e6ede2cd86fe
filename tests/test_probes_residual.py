"""Residual dependency against hand-written Pre-LN and Post-LN blocks, computed by hand."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import stabscope
from stabscope import Schedule


class FFN(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, placement: str, alpha: float = 1.0) -> None:
        super().__init__()
        self.placement, self.alpha = placement, alpha
        self.ln = nn.LayerNorm(d)
        self.mlp = FFN(d)

    def forward(self, x):
        if self.placement == "pre":
            return x + self.mlp(self.ln(x))
        return self.ln(self.alpha * x + self.mlp(x))


class Net(nn.Module):
    def __init__(self, placement: str, depth: int = 4, d: int = 16, alpha: float = 1.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, placement, alpha) for _ in range(depth))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def by_hand(net: Net, x: torch.Tensor):
    """x_i, f_i and the sum t_i of every branch, from an explicit forward."""
    out = []
    h = x
    for b in net.blocks:
        if b.placement == "pre":
            f = b.mlp(b.ln(h))
            t = h + f
            out.append((h, f, t))
            h = t
        else:
            f = b.mlp(h)
            t = b.alpha * h + f
            out.append((h, f, t))
            h = b.ln(t)
    return out


def expected_metrics(net: Net, x: torch.Tensor, placement: str, alpha: float):
    with torch.no_grad():
        triples = by_hand(net, x)
    var = lambda v: v.double().var(unbiased=False).item()  # noqa: E731
    ratio = [(f.norm(dim=-1) / h.norm(dim=-1)).mean().item() for h, f, _ in triples]
    # Admin's footnote-1 ratio with x and f independent: Var f / (α² Var x + Var f).
    dependency = [var(f) / (alpha**2 * var(h) + var(f)) for h, f, _ in triples]
    corr = [
        np.corrcoef(h.double().reshape(-1), f.double().reshape(-1))[0, 1] for h, f, _ in triples
    ]
    omega, w = [], 1.0
    for h, f, _ in triples:
        omega.append(w)
        w = math.sqrt(var(h * w) + var(f))
    # β: the stream as sum_j c_j a_j over raw components a_0 = x_0, a_j = f_j.
    comps, coefs, beta = [triples[0][0]], [1.0], []
    for _, f, t in triples:
        coefs = [alpha * c for c in coefs] + [1.0]
        comps = [*comps, f]
        weights = np.array([c * math.sqrt(var(a)) for c, a in zip(coefs, comps)])
        beta.append(weights / np.linalg.norm(weights))
        if placement != "pre":
            coefs = [c / math.sqrt(var(t)) for c in coefs]
    return ratio, dependency, corr, omega, beta


@pytest.mark.parametrize(("placement", "alpha"), [("pre", 1.0), ("post", 1.0), ("post", 2.0)])
def test_residual_metrics_match_hand_computation(run_dir, placement, alpha):
    torch.manual_seed(0)
    net = Net(placement, alpha=alpha)
    x = torch.randn(4, 6, 16) * 0.7
    reference = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with stabscope.Recorder(net, run_dir, schedule=Schedule(1, 0), forward=lambda m: m(x)) as rec:
        loss = net(x).pow(2).mean()
        loss.backward()
        opt.step()
        rec.step(loss=loss)
    meta = stabscope.read_meta(run_dir)
    want_placement = "deepnorm" if alpha != 1.0 else placement
    assert {b["placement"] for b in meta["structure"]["blocks"]} == {want_placement}
    df = stabscope.load_run(run_dir, metrics="res_*", steps=0)
    ratio, dependency, corr, omega, beta = expected_metrics(reference, x, placement, alpha)

    def series(metric):
        sub = df[df.metric == metric].copy()
        sub["layer"] = sub.module.astype(str).str.split(".").str[1].astype(int)
        return sub.sort_values(["layer", "index"])

    np.testing.assert_allclose(series("res_ratio").value, ratio, rtol=1e-5)
    np.testing.assert_allclose(series("res_dependency").value, dependency, rtol=1e-4)
    np.testing.assert_allclose(series("res_corr").value, corr, rtol=1e-3, atol=1e-5)
    # The residual probe also reports each norm's input (x for Pre-LN, α·x + f otherwise),
    # once per norm: the norm-input probe leaves these norms to it.
    norms = stabscope.load_run(run_dir, metrics="norm_input_rms", steps=0)
    layer = norms.module.astype(str).str.split(".").str[1].astype(int)
    with torch.no_grad():
        read = [h if placement == "pre" else t for h, _, t in by_hand(reference, x)]
    assert sorted(layer) == list(range(len(read)))
    rms = [v.double().pow(2).mean().sqrt().item() for v in read]
    np.testing.assert_allclose(norms.value.to_numpy()[np.argsort(layer)], rms, rtol=1e-5)
    if placement == "pre":
        assert series("res_omega").empty  # Admin's ω is defined for Post-LN streams only
    else:
        np.testing.assert_allclose(series("res_omega").value, omega, rtol=1e-4)
    beta_rows = series("res_beta")
    for i, row in enumerate(beta):
        got = beta_rows[beta_rows.layer == i].value.to_numpy()
        np.testing.assert_allclose(got, row, rtol=1e-4)
        assert np.sum(got**2) == pytest.approx(1.0, rel=1e-5)


class Scaled(nn.Module):
    """f = c·x exactly: a bias-free linear map with weight c·I."""

    def __init__(self, d: int, c: float) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(c * torch.eye(d))

    def forward(self, x):
        return self.lin(x)


class ScaledBlock(nn.Module):
    def __init__(self, d: int, placement: str, c: float) -> None:
        super().__init__()
        self.placement = placement
        self.ln = nn.LayerNorm(d, elementwise_affine=False, eps=1e-12)
        self.f = Scaled(d, c)

    def forward(self, x):
        if self.placement == "pre":
            return x + self.f(self.ln(x))
        return self.ln(x + self.f(x))


class ScaledNet(nn.Module):
    def __init__(self, d: int, placement: str, cs: tuple[float, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ScaledBlock(d, placement, c) for c in cs)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_dependency_is_a_share_when_the_branch_is_a_multiple_of_the_stream(run_dir, placement):
    """Branches f = c·(stream) with an analytic answer. Block 0: f = −0.5·x, so the share
    Var f / (Var x + Var f) is 0.25 / 1.25 = 0.2 and Corr[x, f] = −1, where Var f / Var(x + f)
    = 0.25 / 0.25 would be 1 (and grows without bound as c → −1): no share of anything.
    Block 1: f = +1·LN(stream): its stream is 0.5·x for Pre-LN (share 1 / 1.25 = 0.8), the
    norm's output x for Post-LN (share 0.5); Corr = +1."""
    d = 16
    net = ScaledNet(d, placement, (-0.5, 1.0))
    # Tokens already normalised (zero mean, unit variance over the hidden dimension), so a
    # norm leaves them as they are and the first branch reads exactly the stream.
    x = nn.functional.layer_norm(
        torch.randn(4, 8, d, generator=torch.Generator().manual_seed(0)), (d,)
    )
    with stabscope.Recorder(net, run_dir, schedule=Schedule(1, 0), forward=lambda m: m(x)) as rec:
        net(x)
        rec.step()
    meta = stabscope.read_meta(run_dir)
    assert [b["placement"] for b in meta["structure"]["blocks"]] == [placement] * 2
    df = stabscope.load_run(run_dir, metrics=["res_dependency", "res_corr"], steps=0)
    got = df.pivot_table(index="module", columns="metric", values="value")
    names = ["blocks.0.f.lin", "blocks.1.f.lin"]
    assert sorted(got.index) == names
    want_share = [0.2, 0.8 if placement == "pre" else 0.5]
    np.testing.assert_allclose(got.loc[names, "res_dependency"], want_share, rtol=1e-5)
    np.testing.assert_allclose(got.loc[names, "res_corr"], [-1.0, 1.0], atol=1e-5)


def test_beta_is_uniform_for_equal_independent_pre_ln_components():
    from stabscope.probes.residual import beta_matrix
    from stabscope.structure import Branch

    # Pre-LN stream x_0 + f_1 + f_2 + f_3 with unit-variance parts: β_{i,j} = 1/sqrt(i+2).
    branches = [Branch(f"b{i}", f"b{i}", "mlp", "pre", None, 1.0) for i in range(3)]
    v = np.array([[1.0, 1.0, 1.0, 2.0, 2.0]] * 3)  # [ratio, Var f, Var x, Var sum, norm input]
    for i, row in enumerate(beta_matrix(branches, v)):
        np.testing.assert_allclose(row, np.full(i + 2, 1 / math.sqrt(i + 2)))


def test_beta_of_an_infinite_branch_is_nan_without_a_warning():
    """A blown-up run: branch 2's variance is inf. The finite parts' share of the stream is 0,
    the infinite one's inf / inf is NaN, and numpy prints nothing into the user's terminal."""
    import warnings

    from stabscope.probes.residual import beta_matrix
    from stabscope.structure import Branch

    branches = [Branch(f"b{i}", f"b{i}", "mlp", "pre", None, 1.0) for i in range(2)]
    v = np.array([[1.0, 1.0, 1.0, 2.0, 2.0], [1.0, math.inf, 2.0, math.inf, 2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = beta_matrix(branches, v)
    np.testing.assert_allclose(rows[0], [1 / math.sqrt(2)] * 2)
    np.testing.assert_array_equal(rows[1][:2], [0.0, 0.0])
    assert math.isnan(rows[1][2])


@pytest.mark.slow
def test_post_ln_depends_on_its_branch_pre_ln_dilutes_it(tmp_path):
    """Admin (Liu et al. 2020), at init on the sample GPT: Post-LN's β_{i,i} stays large at every
    depth (heavy dependency on the branch), Pre-LN's shrinks as the stream accumulates."""
    from tests.conftest import sample_gpt

    beta_ii = {}
    for placement in ("pre", "post"):
        model, forward = sample_gpt(placement, depth=12)
        with stabscope.Recorder(
            model, tmp_path / placement, schedule=Schedule(1, 0), forward=forward
        ) as rec:
            forward(model).backward()
            rec.step()
        df = stabscope.load_run(tmp_path / placement, metrics="res_beta")
        beta_ii[placement] = [
            df[df.module == f"blocks.{i}.mlp"].sort_values("index").value.iloc[-1] for i in (0, 11)
        ]
    pre, post = beta_ii["pre"], beta_ii["post"]
    assert post[1] > 2 * pre[1]
    assert pre[1] < 0.7 * pre[0]
    assert post[1] > 0.8 * post[0]
