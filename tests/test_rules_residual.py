"""The residual-dependency rule on recorded runs of real models: its message follows the norm
placement structure discovery found, and it says which step it read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stabscope
from stabscope import Schedule
from stabscope.rules import check_run
from tests.conftest import record_steps, sample_gpt


def residual_finding(run_dir):
    found = [f for f in check_run(run_dir).findings if f.rule == "residual-dependency"]
    assert len(found) <= 1
    return found[0] if found else None


def encoder(norm_first: bool, depth: int, growth: float = 1.0) -> nn.TransformerEncoder:
    """torch's encoder; ``growth`` scales each layer's output projections by growth**layer, so
    the branches outgrow the stream with depth."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            block.linear2.weight.mul_(growth**i)
            block.self_attn.out_proj.weight.mul_(growth**i)
    return model


def record(model, run_dir, forward, steps=2, probe_forward=True):
    """``steps`` Adam steps; the structure from ``forward`` before step 0, or (without
    ``probe_forward``) from step 0's own forward, as zero-code mode does."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = Schedule(steps, 0)
    record_steps(
        model, run_dir, forward, opt, steps, schedule=schedule, probe_forward=probe_forward
    )
    return stabscope.read_meta(run_dir)


# Embedding-scale inputs: every branch output (it reads a normalised stream) dwarfs them.
X = 0.02 * torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_shallow_pre_ln_encoder_is_not_called_post_ln_like(run_dir):
    """Two Pre-LN layers: the stream accumulates four branches, so β_ii = 1, 0.74, 0.73, 0.45
    by Pre-LN's own dilution (1/sqrt(i+1) with branches of one scale). That is Admin's light
    dependency, not a Post-LN-like one to fix by switching to Pre-LN."""
    meta = record(encoder(True, 2), run_dir, lambda m: m(X).pow(2).mean())
    assert {b["placement"] for b in meta["structure"]["blocks"]} == {"pre"}
    beta = stabscope.load_run(run_dir, metrics="res_beta", steps=0)
    own = beta.sort_values("index").groupby("module").value.last()
    assert (own > 0.4).all()  # what the old rule counted as heavy
    assert residual_finding(run_dir) is None


def test_pre_ln_branches_that_outgrow_the_stream(run_dir):
    meta = record(encoder(True, 4, growth=2.0), run_dir, lambda m: m(X).pow(2).mean())
    assert {b["placement"] for b in meta["structure"]["blocks"]} == {"pre"}
    f = residual_finding(run_dir)
    assert f is not None and f.step == 0
    assert "at init (step 0)" in f.message
    assert "Pre-LN stack" in f.message and "branches 7 and later" in f.message
    assert "in 2 of 2 branches" in f.message  # the last layer's two branches are judged
    assert "Post-LN-like" not in f.message and "Pre-LN" not in f.remedy
    assert "1/sqrt(2N)" in f.remedy


@pytest.mark.slow
@pytest.mark.parametrize("probe_forward", [True, False])
def test_post_ln_gpt_says_post_ln_and_the_step_it_read(tmp_path, probe_forward):
    model, forward = sample_gpt("post", depth=3)
    record(model, tmp_path / "run", forward, probe_forward=probe_forward)
    f = residual_finding(tmp_path / "run")
    assert f is not None and "in this Post-LN stack each layer leans on its own branch" in f.message
    assert f.remedy.startswith("Admin init") and "α=(2N)^(1/4)=1.57" in f.remedy  # N = 3
    if probe_forward:
        assert f.step == 0 and "at init (step 0)" in f.message
    else:
        # The structure was learnt from step 0's forward: β starts at step 1, after an update.
        assert f.step == 1 and "at init (step 0)" not in f.message
        assert "at step 1, the first recorded with β (after 1 optimizer update" in f.message


def test_deepnorm_with_too_small_alpha(run_dir):
    """The sample GPT's Post-LN blocks with α = 1.1: DeepNorm-style, but with neither DeepNet's
    α for the depth nor its β-scaled init."""
    model, forward = sample_gpt("post", depth=3)
    for block in model.blocks:
        block.alpha = 1.1
    meta = record(model, run_dir, forward)
    assert {b["placement"] for b in meta["structure"]["blocks"]} == {"deepnorm"}
    f = residual_finding(run_dir)
    assert f is not None and "DeepNorm stack still leans on its branches" in f.message
    # DeepNet for N = 3 layers: α = 6^(1/4), init gain β = 24^(-1/4).
    assert f"α=(2N)^(1/4)={6**0.25:.3g}" in f.remedy
    assert f"β=(8N)^(-1/4)={24**-0.25:.3g}" in f.remedy


def test_without_a_detected_structure_the_message_says_so(tmp_path):
    from tests.test_rules import write_run

    rows = [
        (3, f"blocks.{i}.mlp", "res_beta", j, 0.6 if j == 1 else 0.3)
        for i in range(4)
        for j in range(2)
    ]
    f = residual_finding(write_run(tmp_path / "run", rows))
    assert (
        f.step == 3
        and "at step 3, the first recorded with β (after 3 optimizer updates" in f.message
    )
    assert "(norm placement not detected)" in f.message and "Post-LN stack" not in f.message
    assert f.remedy.startswith("if the norms sit after the residual add (Post-LN)")


def own_beta_median(run_dir) -> float:
    """The median β_ii at step 0 (each branch's last component), from the table."""
    beta = stabscope.load_run(run_dir, metrics="res_beta", steps=0)
    return float(beta.sort_values("index").groupby("module").value.last().median())


def depth_ratio(run_dir, depth: int) -> float:
    """The largest, over recorded steps, last-block over first-block parameter-gradient norm,
    each the root of its parameters' squared norms (Xiong et al. 2020's quantity)."""
    g = stabscope.load_run(run_dir, metrics="param_grad_norm", phase="train")
    g = g.assign(module=g.module.astype(str))

    def norm(block: str):
        mine = g[g.module.str.startswith(block + ".")]
        return mine.groupby("step").value.apply(
            lambda v: float((v.astype(float) ** 2).sum()) ** 0.5
        )

    return float((norm(f"blocks.{depth - 1}") / norm("blocks.0")).max())


@pytest.mark.slow
@pytest.mark.parametrize("scale", [10.0, 1.0])
def test_skips_that_carry_almost_nothing_and_starved_gradients_are_an_error(run_dir, scale):
    """Post-LN, 8 blocks, the branches' output projections x``scale``: at x10 each branch
    carries ~99% of its sum (β_ii ~0.99; at init Post-LN's is ~0.5) and within 30 steps the
    last block's gradient is over 10x the first's. Both together are the error (Liu et al.
    2020; Xiong et al. 2020); heavy dependency alone stays a warning."""
    model, forward = sample_gpt("post", depth=8)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o.weight.mul_(scale)
            block.mlp.proj.weight.mul_(scale)
    record(model, run_dir, forward, steps=30)
    median, ratio = own_beta_median(run_dir), depth_ratio(run_dir, 8)
    f = residual_finding(run_dir)
    assert f.value == pytest.approx(median, rel=1e-6)
    if scale > 1:
        assert median > 0.9 and ratio > 10
        assert f.severity == "error" and f.threshold == 0.9
        assert f"gradient of the last layer is {ratio:.3g}x the first's" in f.message
    else:
        assert 0.4 < median < 0.9
        assert f.severity == "warning" and "gradient of the last layer" not in f.message
