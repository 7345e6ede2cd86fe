"""stabscope.grow: the six expansions of Gesmundo & Maile 2023 on real models.

Every check compares the grown model against the base model it came from (same inputs, float32)
or against the paper's constraints written out independently of the code (which slices must be
zero, which are rescaled and by how much).
"""

from __future__ import annotations

import math

import gpt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabscope.drivers.script import ScriptConfig
from stabscope.errors import UsageError
from stabscope.grow import GrowthSpec, compare, expand, grow_model
from stabscope.grow.transforms import insertion_counts

TOL = 1e-5
WIDTH, HEADS, HEAD, MLP = 32, 4, 8, 128  # the tiny sample GPT: k = v = 32 / 4, p = 4·32
VOCAB, SEQ = 32, 16


def perturb(model: nn.Module, norms: bool = True) -> nn.Module:
    """Move every parameter off its initial value, as training would: no zero biases, no unit
    gains left for a constraint to hide behind. ``norms=False`` keeps the norms at init."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norms or "ln" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def sample_gpt(norm: str = "pre", rms: bool = False, trained: bool = True, **cfg) -> nn.Module:
    """The sample GPT at a tiny size; ``rms`` swaps its LayerNorms for RMSNorms (the paper's
    norm) so that hidden expansion applies."""
    torch.manual_seed(0)
    config = {**gpt.CONFIG, "norm": norm, "depth": 2, "width": WIDTH, "heads": HEADS}
    model = gpt.model(ScriptConfig({**config, "seq_len": SEQ, "vocab": VOCAB, **cfg}))
    if rms:
        for block in model.blocks:
            block.ln1, block.ln2 = nn.RMSNorm(WIDTH, eps=1e-5), nn.RMSNorm(WIDTH, eps=1e-5)
        model.ln_f = nn.RMSNorm(WIDTH, eps=1e-5)
    return perturb(model, norms=norm == "pre") if trained else model


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return getattr(out, "logits", out)


def max_change(base: nn.Module, grown: nn.Module) -> float:
    with torch.no_grad():
        return max(
            float((logits(grown, x) - logits(base, x)).abs().max()) for x in (tokens(0), tokens(1))
        )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


ALONE = {
    "mlp": {"mlp": "2x"},
    "heads": {"heads": "2x"},
    "value_dim": {"value_dim": "2x"},
    "key_dim": {"key_dim": "2x"},
    "depth": {"depth": "2x"},
}


@pytest.mark.slow
@pytest.mark.parametrize("init", ["random", "copy"])
@pytest.mark.parametrize("expansion", list(ALONE))
@pytest.mark.parametrize("norm", ["pre", "post", "deepnorm"])
def test_each_expansion_alone_keeps_the_sample_gpt_outputs(norm, expansion, init):
    # Post-norm models keep their norms at init (layer addition needs that, see below); every
    # other parameter is trained. Post-norm layer addition is exact only up to the norms' eps
    # (next test), so it gets the command's default tolerance, 1e-5 of the output's scale.
    base = sample_gpt(norm)
    grown = expand(base, init=init, **ALONE[expansion])
    assert n_params(grown) > n_params(base)
    change = max_change(base, grown)
    if norm != "pre" and expansion == "depth":
        with torch.no_grad():
            scale = float(logits(base, tokens(0)).abs().max())
        assert change <= TOL * scale
    else:
        assert change <= TOL


@pytest.mark.parametrize("init", ["random", "copy"])
def test_hidden_expansion_alone_keeps_the_rms_sample_gpt_outputs(init):
    # The sixth expansion alone, on the sample GPT with the paper's RMSNorm (its LayerNorm is
    # refused, below); 1.5x leaves the new width off any power of two.
    base = sample_gpt("pre", rms=True)
    grown = expand(base, hidden="1.5x", init=init)
    assert grown.tok.weight.shape[1] == WIDTH * 3 // 2
    assert max_change(base, grown) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["pre", "post", "deepnorm"])
def test_layer_addition_is_exact_for_pre_norm_and_within_eps_for_post_norm(norm):
    # In float64, away from rounding: a pre-norm identity layer is exact; a post-norm one
    # computes LN(α·LN(α·x)) for x = LN(y), which differs from x by a relative O(eps) (LayerNorm
    # eps 1e-5): present, and below eps·|output|.
    base = sample_gpt(norm).double()
    change = max_change(base, expand(base, depth="3x"))
    with torch.no_grad():
        scale = float(logits(base, tokens(0)).abs().max())
    if norm == "pre":
        assert change < 1e-12
    else:
        assert 1e-12 < change < 1e-5 * scale


@pytest.mark.parametrize("init", ["random", "copy"])
@pytest.mark.parametrize("attn", ["sdpa", "explicit"])
def test_all_six_composed_keep_the_sample_gpt_outputs(attn, init):
    # The sample's LayerNorm rules out hidden expansion (next test), so all six run on the
    # sample GPT with its norms swapped for RMSNorm, the paper's setting.
    base = sample_gpt("pre", rms=True, attn=attn)
    sizes = {"mlp": "2x", "heads": "2x", "value_dim": "2x", "key_dim": "3x", "hidden": "2x"}
    growth = grow_model(base, GrowthSpec(**sizes, depth="2x", init=init))
    assert [s["expansion"] for s in growth.steps] == [
        "MLP expansion",
        "head addition",
        "heads expansion",
        "attention expansion",
        "hidden dimension expansion",
        "layer addition",
    ]
    assert (growth.shape.depth, growth.shape.hidden, growth.shape.mlp) == (4, 64, 256)
    assert (growth.shape.heads, growth.shape.key_dim, growth.shape.value_dim) == (8, 24, 16)
    assert max_change(base, growth.model) <= TOL


def test_hidden_expansion_is_refused_for_layernorm():
    with pytest.raises(UsageError, match="LayerNorm subtracts the mean"):
        expand(sample_gpt("pre"), hidden="2x")


def test_post_norm_layer_addition_needs_untrained_norms():
    # An added post-norm layer computes Norm(Norm(x)): x again (up to eps) only when the norms
    # have gain one and bias zero.
    at_init = sample_gpt("post", trained=False)
    assert max_change(at_init, expand(at_init, depth="3x")) <= TOL
    with pytest.raises(UsageError, match="post-norm"):
        expand(sample_gpt("post", trained=False), depth="3x", position="start")
    with pytest.raises(UsageError, match="after a trained norm"):
        expand(perturb(sample_gpt("post", trained=False)), depth="2x")


@pytest.mark.slow
def test_the_zero_constraints_are_what_keeps_the_function():
    # Break the zeros of each expansion and the outputs move: the constraints are not vacuous.
    base = sample_gpt("pre")
    checks = {
        "mlp": lambda m: m.blocks[0].mlp.proj.weight[:, MLP:],
        "heads": lambda m: m.blocks[0].attn.o.weight.view(WIDTH, 2 * HEADS, HEAD)[:, HEADS:],
        "value_dim": lambda m: m.blocks[0].attn.o.weight.view(WIDTH, HEADS, 2 * HEAD)[..., HEAD:],
        "key_dim": lambda m: m.blocks[0].attn.k.weight.view(HEADS, 2 * HEAD, WIDTH)[:, HEAD:],
        "depth": lambda m: m.blocks[1].mlp.proj.weight,
    }
    for expansion, zeros in checks.items():
        grown = expand(base, **ALONE[expansion])
        with torch.no_grad():
            zeros(grown).normal_(0, 0.5)
        assert max_change(base, grown) > 1e-2, expansion


def test_zero_constraints_and_rescales_are_in_place():
    base = sample_gpt("pre", rms=True)
    b0 = base.blocks[0]

    g = expand(base, mlp="2x").blocks[0].mlp  # Thm 3.1, eq. 9
    assert torch.equal(g.proj.weight[:, MLP:], torch.zeros(WIDTH, MLP))
    assert torch.equal(g.proj.weight[:, :MLP], b0.mlp.proj.weight)
    assert torch.equal(g.fc.weight[:MLP], b0.mlp.fc.weight)

    a = expand(base, heads="2x").blocks[0].attn  # Thm 3.2, eq. 12
    o = a.o.weight.view(WIDTH, 2 * HEADS, HEAD)
    assert torch.equal(o[:, HEADS:], torch.zeros(WIDTH, HEADS, HEAD))
    assert torch.equal(o[:, :HEADS], b0.attn.o.weight.view(WIDTH, HEADS, HEAD))
    assert torch.equal(a.q.weight[:WIDTH], b0.attn.q.weight)

    a = expand(base, value_dim="2x").blocks[0].attn  # Thm 3.3, eq. 16
    o = a.o.weight.view(WIDTH, HEADS, 2 * HEAD)
    assert torch.equal(o[..., HEAD:], torch.zeros(WIDTH, HEADS, HEAD))
    assert torch.equal(o[..., :HEAD], b0.attn.o.weight.view(WIDTH, HEADS, HEAD))

    a = expand(base, key_dim="4x").blocks[0].attn  # Thm 3.4, eqs. 19-20: sqrt(k'/k) = 2
    k, kb = a.k.weight.view(HEADS, 4 * HEAD, WIDTH), a.k.bias.view(HEADS, 4 * HEAD)
    assert torch.equal(k[:, HEAD:], torch.zeros(HEADS, 3 * HEAD, WIDTH))
    assert torch.equal(kb[:, HEAD:], torch.zeros(HEADS, 3 * HEAD))
    old_k = b0.attn.k.weight.view(HEADS, HEAD, WIDTH)
    assert torch.allclose(k[:, :HEAD], 2 * old_k, rtol=0, atol=1e-7)
    assert torch.equal(a.q.weight.view(HEADS, 4 * HEAD, WIDTH)[:, :HEAD],
                       b0.attn.q.weight.view(HEADS, HEAD, WIDTH))  # fmt: skip

    grown = expand(base, hidden="2x")  # Thm 3.5, eqs. 24, 33-37
    assert torch.equal(grown.tok.weight[:, WIDTH:], torch.zeros(VOCAB, WIDTH))
    assert torch.equal(grown.pos.weight[:, WIDTH:], torch.zeros(SEQ, WIDTH))
    g0 = grown.blocks[0]
    for lin in (g0.attn.o, g0.mlp.proj):
        assert torch.equal(lin.weight[WIDTH:], torch.zeros(WIDTH, lin.weight.shape[1]))
        assert torch.equal(lin.bias[WIDTH:], torch.zeros(WIDTH))
    for new, old in ((g0.ln1, b0.ln1), (g0.ln2, b0.ln2), (grown.ln_f, base.ln_f)):
        assert torch.allclose(new.weight[:WIDTH], old.weight * math.sqrt(0.5), atol=1e-7)
        assert new.eps == pytest.approx(old.eps / 2)

    grown = expand(base, depth="2x")  # Thm 3.6, eq. 40: layers 1 and 3 are new
    for new in (grown.blocks[1], grown.blocks[3]):
        for t in (new.attn.o.weight, new.attn.o.bias, new.mlp.proj.weight, new.mlp.proj.bias):
            assert not t.any()
    for i, old in ((0, 0), (2, 1)):
        assert torch.equal(grown.blocks[i].mlp.fc.weight, base.blocks[old].mlp.fc.weight)


def test_the_base_model_is_left_untouched():
    base = sample_gpt("pre", rms=True)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expand(base, width="2x", depth="2x", head_dim="2x")
    after = base.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_nan_output_is_compared_as_data():
    # NaN in one logit's bias: that logit is NaN for every token in both models and counts
    # as kept; the finite logits are still compared.
    base = sample_gpt("pre")
    with torch.no_grad():
        base.head.bias[3] = float("nan")
    grown = expand(base, mlp="2x", depth="2x")
    probes = [tokens(0), tokens(1)]
    kept = compare(base, grown, probes, logits)
    assert kept.passed and kept.nonfinite == 2 * 4 * SEQ  # one logit per token, two batches
    assert 1 < kept.max_abs_output < 100
    with torch.no_grad():
        grown.head.bias[4] += 1e-3
    changed = compare(base, grown, probes, logits)
    assert not changed.passed and changed.max_abs_diff == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_outputs_are_checked_at_their_own_rounding(dtype):
    # 1e-5 is below one rounding step of a bfloat16 or float16 logit; the default tolerance
    # is 16 eps of the output's scale there, which a rounding-level change meets and a broken
    # constraint does not.
    base = sample_gpt("post").to(dtype)
    grown = expand(base, depth="2x", mlp="2x", heads="2x", head_dim="2x")
    probes = [tokens(0), tokens(1)]
    kept = compare(base, grown, probes, logits)
    eps = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    assert kept.tolerance == pytest.approx(16 * eps * max(1.0, kept.max_abs_output))
    assert kept.passed
    with torch.no_grad():
        grown.blocks[1].mlp.proj.weight.normal_(0, 0.5)  # an added layer's zero W_l2
    assert not compare(base, grown, probes, logits).passed


# -- gradients ---------------------------------------------------------------------------------
# Right after an expansion the zero-initialised writers (W^O rows, W_l2 columns, new stream
# coordinates' writers) already have gradients, while the free parameters behind them are
# blocked by those zeros: their gradient is exactly zero. One optimizer step moves the zeros,
# and then every new parameter has a gradient: nothing is left dead.


def head_outputs(lin: nn.Linear) -> torch.Tensor:
    return lin.weight.view(HEADS, -1, WIDTH)  # (E·k, h) -> (E, k, h)


def head_inputs(lin: nn.Linear) -> torch.Tensor:
    return lin.weight.view(WIDTH, HEADS, -1)  # (h, E·v) -> (h, E, v)


NEW = {  # expansion -> (sizes, {slice name: (slice of the grown model, gradient at step 0?)})
    "mlp": ({"mlp": "2x"}, {
        "W_l2 new columns": (lambda m: m.blocks[0].mlp.proj.weight[:, MLP:], True),
        "W_l1 new rows": (lambda m: m.blocks[0].mlp.fc.weight[MLP:], False),
        "b_l1 new entries": (lambda m: m.blocks[0].mlp.fc.bias[MLP:], False),
    }),
    "heads": ({"heads": "2x"}, {
        "W^O new head rows": (lambda m: m.blocks[0].attn.o.weight[:, WIDTH:], True),
        "new head W^V": (lambda m: m.blocks[0].attn.v.weight[WIDTH:], False),
        "new head W^Q": (lambda m: m.blocks[0].attn.q.weight[WIDTH:], False),
    }),
    "value_dim": ({"value_dim": "2x"}, {
        "W^O new rows": (lambda m: head_inputs(m.blocks[0].attn.o)[..., HEAD:], True),
        "W^V new columns": (lambda m: head_outputs(m.blocks[0].attn.v)[:, HEAD:], False),
    }),
    "key_dim": ({"key_dim": "2x"}, {
        "W^K new columns": (lambda m: head_outputs(m.blocks[0].attn.k)[:, HEAD:], True),
        "W^Q new columns": (lambda m: head_outputs(m.blocks[0].attn.q)[:, HEAD:], False),
    }),
    "depth": ({"depth": "2x"}, {
        "new layer W^O": (lambda m: m.blocks[1].attn.o.weight, True),
        "new layer W_l2": (lambda m: m.blocks[1].mlp.proj.weight, True),
        "new layer W^Q": (lambda m: m.blocks[1].attn.q.weight, False),
        "new layer W_l1": (lambda m: m.blocks[1].mlp.fc.weight, False),
        "new layer norm gain": (lambda m: m.blocks[1].ln1.weight, False),
    }),
    "hidden": ({"hidden": "2x"}, {
        "token embedding new columns": (lambda m: m.tok.weight[:, WIDTH:], True),
        "W^O new rows": (lambda m: m.blocks[0].attn.o.weight[WIDTH:], True),
        "W_l2 new rows": (lambda m: m.blocks[1].mlp.proj.weight[WIDTH:], True),
        "W^Q new input columns": (lambda m: m.blocks[0].attn.q.weight[:, WIDTH:], False),
        "W_l1 new input columns": (lambda m: m.blocks[1].mlp.fc.weight[:, WIDTH:], False),
        "head new input columns": (lambda m: m.head.weight[:, WIDTH:], False),
        "norm new gains": (lambda m: m.blocks[0].ln1.weight[WIDTH:], False),
    }),
}  # fmt: skip


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    z = logits(model, x[:, :-1])
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), x[:, 1:].reshape(-1))


def grad_of(model: nn.Module, piece) -> torch.Tensor:
    """The gradient entries of the slice ``piece(model)`` (same indexing on ``.grad``)."""
    holder = {id(p): p for p in model.parameters()}
    view = piece(model)
    for p in holder.values():
        if view.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            return grad.as_strided(view.shape, view.stride(), view.storage_offset())
    raise AssertionError("slice of no parameter")


@pytest.mark.slow
@pytest.mark.parametrize("expansion", list(NEW))
def test_gradients_reach_every_new_parameter_after_one_step(expansion):
    sizes, pieces = NEW[expansion]
    grown = expand(sample_gpt("pre", rms=True), **sizes)
    opt = torch.optim.Adam(grown.parameters(), lr=1e-2)
    x = torch.randint(VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(2))
    lm_loss(grown, x).backward()
    for name, (piece, at_once) in pieces.items():
        norm = float(grad_of(grown, piece).norm())
        assert (norm > 0) == at_once, f"{name}: gradient {norm} at step 0"
    opt.step()
    opt.zero_grad()
    lm_loss(grown, x).backward()
    for name, (piece, _) in pieces.items():
        assert float(grad_of(grown, piece).norm()) > 0, f"{name}: no gradient after one step"


@pytest.mark.slow
def test_zero_new_gains_would_leave_the_new_hidden_coordinates_dead():
    # Table 1 of the paper lists the new norm gains among the zeros; its Thm 3.5 (eqs. 33-37)
    # does not need them. With zero gains no gradient ever reaches the new coordinates of a
    # pre-norm model (every reader of the stream sees them through a norm), which is why
    # stabscope leaves them free (docs/grow.md).
    grown = expand(sample_gpt("pre", rms=True), hidden="2x")
    with torch.no_grad():
        for norm in [b.ln1 for b in grown.blocks] + [b.ln2 for b in grown.blocks] + [grown.ln_f]:
            norm.weight[WIDTH:] = 0
    opt = torch.optim.Adam(grown.parameters(), lr=1e-2)
    x = torch.randint(VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        opt.zero_grad()
        lm_loss(grown, x).backward()
        opt.step()
    assert not grown.tok.weight[:, WIDTH:].any()
    assert not grown.blocks[0].attn.q.weight.grad[:, WIDTH:].any()


# -- HF LLaMA-style models ---------------------------------------------------------------------


def tiny_hf(kind: str = "llama", **overrides) -> nn.Module:
    """A small HF decoder with weights drawn at 1/sqrt(fan-in) and random gains, so rotary
    frequencies, grouped heads and norm epsilons all matter to the output (rope_theta 100 and
    eps 1e-2 make both effects large: a wrong RoPE layout or an unscaled eps moves the logits
    by O(1))."""
    transformers = pytest.importorskip("transformers")
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    config = {
        "vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
    }  # fmt: skip
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**config, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
            elif "norm" in name:
                p.normal_(1, 0.3)
            else:
                p.normal_(0, 0.1)
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "sizes",
    [{"mlp": "2x"}, {"heads": "2x"}, {"head_dim": "2x"}, {"hidden": "2x"}, {"depth": "2x"},
     {"head_dim": "3x", "init": "copy"}, {"hidden": "1.5x", "init": "copy"}],
)  # fmt: skip
def test_each_expansion_alone_keeps_a_llama_outputs(sizes):
    base = tiny_hf()
    grown = expand(base, **sizes)
    assert n_params(grown) > n_params(base)
    assert max_change(base, grown) <= TOL


@pytest.mark.parametrize(
    "kind,overrides",
    [("llama", {}), ("llama", {"num_key_value_heads": HEADS}),
     ("llama", {"tie_word_embeddings": True}), ("mistral", {}), ("qwen2", {})],
)  # fmt: skip
def test_all_six_composed_keep_hf_decoder_outputs(kind, overrides):
    base = tiny_hf(kind, **overrides)
    growth = grow_model(
        base, GrowthSpec(mlp="2x", heads="2x", head_dim="2x", hidden="2x", depth="2x")
    )
    assert len(growth.steps) == 6  # head_dim grows the value and the key size
    cfg = growth.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (64, 4, 16)
    assert cfg.num_attention_heads == 8
    assert max_change(base, growth.model) <= TOL


def test_llama_rotary_pairs_keep_their_frequency():
    # Half-split RoPE: dim i turns with i + k/2 at base^(-2i/k); in a head of 2k dims the
    # same frequency sits at dim 2i, so the old key dims land on 0, 2, 4, ... (and k + 2i).
    base = tiny_hf()
    grown = expand(base, head_dim="2x")
    k_old = base.model.layers[0].self_attn.k_proj.weight.view(2, HEAD, WIDTH)
    k_new = grown.model.layers[0].self_attn.k_proj.weight.view(2, 2 * HEAD, WIDTH)
    half = torch.arange(HEAD // 2) * 2
    old = torch.cat([half, half + HEAD])
    assert torch.allclose(k_new[:, old], k_old * math.sqrt(2), atol=1e-7)
    rest = torch.tensor([i for i in range(2 * HEAD) if i not in old.tolist()])
    assert not k_new[:, rest].any()
    inv = grown.model.rotary_emb.inv_freq
    assert torch.allclose(inv[::2], base.model.rotary_emb.inv_freq)


def test_llama_grouped_heads_keep_their_key_value_head():
    # 4 query heads over 2 key/value heads -> 8: old heads 0,1 (group 0) stay at 0,1 and heads
    # 2,3 (group 1) move to 4,5, the front of group 1 in the wider layout.
    base, grown = tiny_hf(), None
    grown = expand(base, heads="2x")
    q_old = base.model.layers[0].self_attn.q_proj.weight.view(HEADS, HEAD, WIDTH)
    q_new = grown.model.layers[0].self_attn.q_proj.weight.view(2 * HEADS, HEAD, WIDTH)
    assert torch.equal(q_new[[0, 1, 4, 5]], q_old)
    assert grown.config.num_key_value_heads == 2


def test_llama_eps_is_rescaled_with_the_gains():
    grown = expand(tiny_hf(), hidden="4x")
    assert grown.config.rms_norm_eps == pytest.approx(1e-2 / 4)
    assert grown.model.layers[1].input_layernorm.variance_epsilon == pytest.approx(1e-2 / 4)


def test_llama_gradients_after_one_step_reach_new_hidden_coordinates():
    grown = expand(tiny_hf(), hidden="2x", depth="2x")
    opt = torch.optim.Adam(grown.parameters(), lr=1e-2)
    x = torch.randint(VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(2))
    lm_loss(grown, x).backward()
    opt.step()
    opt.zero_grad()
    lm_loss(grown, x).backward()
    layer = grown.model.layers[1]  # an added layer
    for t in (
        grown.model.embed_tokens.weight.grad[:, WIDTH:],
        layer.self_attn.q_proj.weight.grad[:, WIDTH:],
        layer.mlp.gate_proj.weight.grad,
        layer.mlp.down_proj.weight.grad[WIDTH:],
        layer.input_layernorm.weight.grad[WIDTH:],
        grown.lm_head.weight.grad[:, WIDTH:],
    ):
        assert float(t.norm()) > 0


# -- sizes and bad input -----------------------------------------------------------------------


def test_insertion_counts():
    assert insertion_counts(4, 4, "interleave") == [0, 1, 1, 1, 1]
    assert insertion_counts(4, 2, "interleave") == [0, 0, 1, 0, 1]
    assert insertion_counts(2, 6, "interleave") == [0, 3, 3]
    assert insertion_counts(3, 2, "start") == [2, 0, 0, 0]
    assert insertion_counts(3, 2, "end") == [0, 0, 0, 2]
    assert insertion_counts(3, 2, "1") == [0, 2, 0, 0]


@pytest.mark.slow
def test_layer_position_puts_identity_layers_where_asked():
    base = sample_gpt("pre")
    grown = expand(base, depth=4, position="1")  # two new layers before layer 1
    assert [bool(b.mlp.proj.weight.any()) for b in grown.blocks] == [True, False, False, True]
    assert max_change(base, grown) <= TOL


@pytest.mark.parametrize(
    "model,sizes,message",
    [
        ("gpt", {"depth": "0.5x"}, "below 1"),
        ("gpt", {"mlp": 64}, "smaller than the current"),
        ("gpt", {"heads": "1.3x"}, "not a whole number"),
        ("gpt", {"depth": "two"}, "bad size"),
        ("gpt", {"depth": "2x", "position": "middle"}, "unknown --position"),
        ("gpt", {"depth": "2x", "position": "9"}, "past the last layer"),
        ("gpt", {"mlp": "2x", "init": "zeros"}, "unknown --init"),
        ("llama", {"heads": 5}, "key/value heads"),
        ("llama", {"key_dim": "2x"}, "share one head size"),
        ("llama", {"head_dim": 12}, "whole factor"),
        ("mlp", {"depth": "2x"}, "does not know how to expand"),
    ],
)
def test_bad_requests_are_usage_errors(model, sizes, message):
    built = {"gpt": sample_gpt, "llama": tiny_hf}.get(model, lambda: nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UsageError, match=message):
        expand(built(), **sizes)
