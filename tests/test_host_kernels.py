"""The numba kernels of the parameter, residual, correlation and attention probes against
float64 references, analytic values and the torch path they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stabscope.probes.attention import entropy_and_max
from stabscope.probes.correlation import token_correlation
from stabscope.probes.kernels import host_kernels, host_params
from stabscope.probes.residual import branch_stats

pytestmark = pytest.mark.skipif(not host_kernels.AVAILABLE, reason="numba is not installed")

GRAIN = 32768  # param_kernels.GRAIN, spelled out: the sizes below straddle it
SIZES = [1, 7, GRAIN - 1, GRAIN, GRAIN + 1, 3 * GRAIN + 5, 1 << 20]


def _tensors(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=dtype) * (i + 1) for i, n in enumerate(SIZES)]


def _squares(t: torch.Tensor) -> float:
    return float(t.double().square().sum())


@pytest.fixture(params=["threads", "one thread"])
def threads(request, monkeypatch):
    """Both drivers: split across threads, and the one-thread loop a forked child runs."""
    if request.param == "one thread":
        monkeypatch.setattr(host_kernels, "thread_parts", lambda: 1)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squares_and_copy(dtype, threads):
    weights, grads = _tensors(dtype, 0), _tensors(dtype, 1)
    grads[2] = None  # a parameter without a gradient
    copies = [torch.empty_like(w) if i % 2 else None for i, w in enumerate(weights)]
    out = host_params.squares_and_copy(weights, grads, copies)
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(out[:, 0], [_squares(w) for w in weights], rtol=rtol)
    want = [0.0 if g is None else _squares(g) for g in grads]
    np.testing.assert_allclose(out[:, 1], want, rtol=rtol)
    for w, c in zip(weights, copies):
        if c is not None:
            assert torch.equal(c, w)


def test_difference_and_totals(threads):
    old = _tensors(torch.float32, 2)
    new = [t + 1e-3 * torch.randn_like(t) for t in old]
    got = host_params.difference_squares(new, old)
    want = [_squares(n.double() - o.double()) for n, o in zip(new, old)]
    # float32 differences, as torch's sub_ + dot take them: ~1e-4 relative to a 1e-3 step.
    np.testing.assert_allclose(got, want, rtol=1e-3)
    np.testing.assert_allclose(
        host_params.totals(old), [float(t.double().sum()) for t in old], rtol=1e-5, atol=1e-3
    )


def test_usable_only_for_tensors_read_in_place():
    w = torch.randn(4, 5)
    assert host_params.usable([w, w.clone()], [None])
    assert not host_params.usable([w.t()])  # not contiguous
    assert not host_params.usable([w, w.double()])  # two dtypes
    assert not host_params.usable([w.bfloat16()])
    assert not host_params.usable([torch.nn.Parameter(w)])  # a subclass: callers detach first
    assert not host_params.usable([None])


@pytest.mark.parametrize("alpha, holds_sum", [(1.0, False), (1.0, True), (2.5, True)])
def test_branch_stats_kernel_equals_torch(alpha, holds_sum, threads, monkeypatch):
    """Residual statistics of one branch: the fused kernel against the five torch passes
    (which ``test_probes_residual`` checks against a hand-written block)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 128, 256, generator=g) * 3 + 0.5  # over PARALLEL_FROM elements
    f = torch.randn(8, 128, 256, generator=g) * 0.2 - 0.1
    stream = alpha * x + f if holds_sum else x
    fused = branch_stats(stream, f, alpha, holds_sum)
    monkeypatch.setattr(host_kernels, "AVAILABLE", False)
    reference = branch_stats(stream, f, alpha, holds_sum)
    assert fused.dtype == torch.float64 and reference.dtype == torch.float32
    np.testing.assert_allclose(fused.numpy(), reference.double().numpy(), rtol=2e-5)


def test_branch_stats_of_a_zero_stream_token():
    """A token whose stream is all zeros: rms(f)/rms(x) is infinite, as on the torch path."""
    x, f = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    x[0, 1] = 0.0
    assert np.isinf(branch_stats(x, f, 1.0)[0].item())


def _torch_path(monkeypatch, fn, *args, **kwargs):
    monkeypatch.setattr(host_kernels, "AVAILABLE", False)
    try:
        return fn(*args, **kwargs)
    finally:
        monkeypatch.setattr(host_kernels, "AVAILABLE", True)


@pytest.mark.parametrize("seq_dim", [1, 0])
def test_token_correlation_kernel(seq_dim, monkeypatch):
    g = torch.Generator().manual_seed(4)
    shape = (8, 128, 64) if seq_dim == 1 else (128, 8, 64)
    shared = torch.randn(64, generator=g)  # a common direction: r well above 0
    x = torch.randn(shape, generator=g) + 0.5 * shared
    fused = token_correlation(x, seq_dim=seq_dim).item()
    assert fused == pytest.approx(
        _torch_path(monkeypatch, token_correlation, x, seq_dim=seq_dim).item(), abs=1e-6
    )
    same = shared.expand(shape).contiguous()  # every token the same vector: r = 1
    assert token_correlation(same, seq_dim=seq_dim).item() == pytest.approx(1.0, abs=1e-6)


def test_attention_kernel_uniform_and_masked(monkeypatch):
    """Equal logits over k allowed keys have entropy log k: normalised, exactly 1."""
    b, heads, q, s = 2, 3, 5, 16
    allowed = torch.ones(1, 1, q, s, dtype=torch.bool).tril(diagonal=s - q)  # causal-like
    flat = torch.full((b, heads, q, s), 0.7)
    out = entropy_and_max(flat, allowed)
    np.testing.assert_allclose(out[:, 0].numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out[:, 1].numpy(), 0.7)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(b, heads, q, s, generator=g) * 4
    mask = torch.rand(b, heads, q, s, generator=g) > 0.3
    mask[0, 1, 2] = False  # a query with no key: left out, not NaN
    mask[1, 2, 3, 1:] = False  # a query with one key: left out
    for m in (allowed, mask):
        fused = entropy_and_max(logits, m)
        reference = _torch_path(monkeypatch, entropy_and_max, logits, m)
        np.testing.assert_allclose(fused.numpy(), reference.double().numpy(), rtol=1e-5)
    logits[0, 0, 0, 0] = float("nan")  # non-finite logits show, as on the torch path
    assert np.isnan(entropy_and_max(logits, allowed)[0].numpy()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampled_attention_kernel_reads_model_strides(dtype, monkeypatch):
    """The fused SDPA sample (logits formed in the kernel, from q and k as the model leaves
    them: transposed views of (B, L, H, E) projections) against the torch path, for a causal
    call, grouped-query attention, a broadcast boolean mask, an additive float mask with HF's
    most-negative value, and an unbatched call."""
    from stabscope.probes.attention import AttentionSampling, sdpa_sample

    g = torch.Generator().manual_seed(6)
    sampling = AttentionSampling(batch=2, queries=9)
    q = (torch.randn(3, 40, 8, 16, generator=g, dtype=dtype) * 2).transpose(1, 2)
    k = torch.randn(3, 40, 2, 16, generator=g, dtype=dtype).transpose(1, 2)  # 2 kv heads
    assert not q.is_contiguous()
    allowed = torch.rand(3, 1, 40, 40, generator=g) > 0.5
    allowed[..., 0] = True
    additive = torch.zeros(3, 1, 40, 40, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    additive += torch.rand(3, 1, 40, 40, generator=g, dtype=dtype)  # a bias on allowed keys
    cases = [
        (q, k, None, True, None),
        (q, k, allowed, False, 0.3),
        (q, k, additive, False, None),
        (q[0], k[0], allowed[0, 0], True, None),  # unbatched (H, L, E), mask (L, S)
    ]
    for args in cases:
        fused = sdpa_sample(*args, sampling)
        reference = _torch_path(monkeypatch, sdpa_sample, *args, sampling)
        assert fused.dtype == torch.float64
        np.testing.assert_allclose(fused.numpy(), reference.double().numpy(), rtol=2e-6, atol=2e-6)
    from stabscope.probes.attention_sample import entropy_rows

    bad = q.clone()
    row = int(entropy_rows(3, 40, sampling.rows, torch.device("cpu"))[0, 2])
    bad[0, 3, row, 5] = float("nan")  # head 3 sees a NaN logit in an entropy row; others do not
    out = sdpa_sample(bad, k, None, True, None, sampling).numpy()
    assert np.isnan(out[3]).all() and np.isfinite(np.delete(out, 3, axis=0)).all()
