"""Structure discovery on the sample models, torch's transformers and HF models from tiny
configs, plus a model it must not recognise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabscope.structure import capture, discover, from_trace
from tests.conftest import sample_gpt


@pytest.fixture
def transformers():
    """The HF tests skip themselves where transformers is not installed; the others run."""
    return pytest.importorskip("transformers")


def summary(structure):
    return [
        (b.name, b.placement, [(br.kind, br.placement, br.norm) for br in b.branches])
        for b in structure.blocks
    ]


def pre_ln_blocks(layers: str, attn_norm: str, mlp_norm: str, n: int = 2) -> list:
    """``summary`` of ``n`` Pre-LN blocks ``layers.i``, an attention branch after the norm
    ``attn_norm`` and an MLP branch after ``mlp_norm`` (names inside the block)."""
    return [
        (
            f"{layers}.{i}",
            "pre",
            [
                ("attention", "pre", f"{layers}.{i}.{attn_norm}"),
                ("mlp", "pre", f"{layers}.{i}.{mlp_norm}"),
            ],
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("norm", ["pre", "post", "deepnorm"])
def test_sample_gpt(norm):
    model, forward = sample_gpt(norm, depth=3)
    s = discover(model, forward)
    assert s.recognised and [b.name for b in s.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    block = s.blocks[1]
    assert block.placement == norm
    assert [(br.name, br.kind) for br in block.branches] == [
        ("blocks.1.attn", "attention"),
        ("blocks.1.mlp", "mlp"),
    ]
    if norm == "pre":
        assert [br.norm for br in block.branches] == ["blocks.1.ln1", "blocks.1.ln2"]
    else:
        assert [br.norm for br in block.branches] == ["blocks.1.ln1", "blocks.1.ln2"]
    expected_alpha = (2 * 3) ** 0.25 if norm == "deepnorm" else 1.0  # DeepNet: (2N)^(1/4)
    assert block.alpha == pytest.approx(expected_alpha, rel=1e-5)
    assert [(a.name, a.heads) for a in block.attention] == [("blocks.1.attn", 4)]
    assert [br.position for br in s.branches] == list(range(6))
    # Discovery leaves no hooks behind and restores the training mode.
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (batch, d) -> (batch, d)
        return h + self.fc(self.norm(h))


class _LoRALinear(nn.Module):
    """A frozen projection plus a low-rank adapter: f = base(x) + x A^T B^T."""

    def __init__(self, d: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.A = nn.Parameter(torch.randn(rank, d) * 0.1)
        self.B = nn.Parameter(torch.randn(d, rank) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, d) -> (batch, d)
        return self.base(x) + x @ self.A.t() @ self.B.t()


def test_a_branch_whose_module_adds_to_its_projection_is_named_by_that_module():
    """An adapter-wrapped projection: f is the wrapper's output (base + adapter), not its
    inner Linear's, so the branch is named by the wrapper, the module that writes f. A
    projection that writes f itself keeps its name (linear2 before its dropout, below)."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(8), _Block(8))
    for block in model:
        block.fc = _LoRALinear(8)
    s = discover(model, lambda m: m(torch.randn(4, 8)))
    assert [(br.name, br.output, br.placement) for br in s.branches] == [
        ("0.fc", "0.fc", "pre"),
        ("1.fc", "1.fc", "pre"),
    ]


class _ResidualMLP(nn.Module):
    """Pre-LN residual MLP blocks on a stream a Linear writes: under bf16 autocast the
    stream and every branch output are bfloat16, so each residual sum is rounded to bf16."""

    def __init__(self, d: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.out = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 16) -> (batch, 4)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def test_residual_sums_rounded_to_bf16_under_autocast_are_still_found():
    """The adds are verified within the precision the sum is stored in (bf16's eps 7.8e-3,
    against 1e-4 in float32): under autocast the structure is the one found in float32."""
    from stabscope.structure.detect import _TOL, residual_alpha, tolerance

    torch.manual_seed(0)
    model, x = _ResidualMLP(), torch.randn(64, 16)

    def forward(m):
        return m(x).float().pow(2).mean()

    def autocast_forward(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(m)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.inp(x)
        f = model.blocks[0].fc(model.blocks[0].norm(h))
        t = h + f
    assert t.dtype == torch.bfloat16 and tolerance(t) == torch.finfo(torch.bfloat16).eps
    error = float((t.double() - h.double() - f.double()).norm() / t.double().norm())
    assert _TOL < error < tolerance(t)  # rounding a float32 tolerance would reject
    assert residual_alpha(t, h, f) == pytest.approx(1.0, abs=1e-2)
    plain, mixed = discover(model, forward), discover(model, autocast_forward)
    assert plain.recognised and mixed.recognised
    assert summary(mixed) == summary(plain)


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_encoder_decoder(norm_first):
    torch.manual_seed(0)
    placement = "pre" if norm_first else "post"
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first),
        2,
        enable_nested_tensor=False,
    )
    s = discover(enc, lambda m: m(torch.randn(2, 5, 16)))
    assert [b.placement for b in s.blocks] == [placement] * 2
    # The feed-forward branch is named by its output projection (linear2), not by the dropout
    # whose output f is: that one is still what the probes hook.
    assert [(br.name, br.output, br.kind) for br in s.blocks[1].branches] == [
        ("layers.1.self_attn", "layers.1.dropout1", "attention"),
        ("layers.1.linear2", "layers.1.dropout2", "mlp"),
    ]
    assert s.blocks[0].attention[0].heads == 2
    dec = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first), 2
    )
    s = discover(dec, lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 7, 16)))
    assert [(br.name, br.kind) for br in s.blocks[0].branches] == [
        ("layers.0.self_attn", "attention"),
        ("layers.0.multihead_attn", "cross_attention"),
        ("layers.0.linear2", "mlp"),
    ]
    assert {br.placement for br in s.branches} == {placement}


def test_torch_transformer_has_two_stacks():
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 2, 3, 32, batch_first=True)
    s = discover(model, lambda m: m(torch.randn(2, 5, 16), torch.randn(2, 4, 16)))
    stacks = [(b.name, b.stack) for b in s.blocks]
    assert stacks == [
        ("encoder.layers.0", "encoder"),
        ("encoder.layers.1", "encoder"),
        ("decoder.layers.0", "decoder"),
        ("decoder.layers.1", "decoder"),
        ("decoder.layers.2", "decoder"),
    ]
    # Branches are numbered per stack, in forward order.
    assert [br.position for br in s.branches if br.stack == "decoder"] == list(range(9))


def test_padded_post_ln_encoder_is_traced_as_it_trains():
    """nn.TransformerEncoder's default enable_nested_tensor=True: under no_grad in eval mode a
    padding mask would turn the batch into nested tensors; discovery turns torch's inference
    fast path off while it traces (and back on after), and finds every block."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    s = discover(enc, lambda m: m(torch.randn(2, 5, 16), src_key_padding_mask=pad))
    assert s.recognised and not s.notes
    assert [b.placement for b in s.blocks] == ["post", "post"]
    assert [br.kind for br in s.blocks[0].branches] == ["attention", "mlp"]
    assert torch.backends.mha.get_fastpath_enabled()


IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


def test_hf_gpt2_pre_ln(transformers):
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    )
    s = discover(model, lambda m: m(input_ids=IDS))
    assert summary(s)[0] == pre_ln_blocks("transformer.h", "ln_1", "ln_2", n=1)[0]


def test_hf_bert_post_ln(transformers):
    model = transformers.BertModel(
        transformers.BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=50,
        )
    )
    s = discover(model, lambda m: m(input_ids=IDS))
    assert [b.placement for b in s.blocks] == ["post", "post"]
    kinds = [(br.name, br.kind, br.norm) for br in s.blocks[0].branches]
    assert kinds == [
        (
            "encoder.layer.0.attention.self",
            "attention",
            "encoder.layer.0.attention.output.LayerNorm",
        ),
        # No one module covers BERT's feed-forward (intermediate + output.dense): its output
        # projection names it, not the dropout after it.
        ("encoder.layer.0.output.dense", "mlp", "encoder.layer.0.output.LayerNorm"),
    ]


def test_hf_llama_gqa(transformers):
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=50,
            attn_implementation="sdpa",
        )
    )
    s = discover(model, lambda m: m(input_ids=IDS))
    assert [b.placement for b in s.blocks] == ["pre", "pre"]
    assert [br.name for br in s.blocks[0].branches] == [
        "model.layers.0.self_attn",
        "model.layers.0.mlp",
    ]
    attn = s.blocks[0].attention[0]
    assert (attn.name, attn.heads, attn.kv_heads) == ("model.layers.0.self_attn", 4, 2)
    assert s.blocks[0].branches[0].norm == "model.layers.0.input_layernorm"


def _hooked(layer: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The stream entering ``layer``, its output and the outputs of its submodules ``names``
    (the first tensor of a tuple), filled in by the next forward pass."""
    seen: dict[str, torch.Tensor] = {}

    def first(o):  # copied: the model may later write into a tensor it returned
        return (o[0] if isinstance(o, tuple) else o).clone()

    def stream_in(module, args, kwargs):  # the stream arrives by position or by keyword
        seen["x"] = first(args if args else (kwargs["hidden_states"],))

    layer.register_forward_pre_hook(stream_in, with_kwargs=True)
    for name in names:
        sub = layer.get_submodule(name)
        sub.register_forward_hook(lambda m, a, o, n=name: seen.update({n: first(o)}))
    layer.register_forward_hook(lambda m, a, o: seen.update(out=first(o)))
    return seen


def test_hf_opt_adds_its_ffn_on_the_flattened_stream(transformers):
    """OPT flattens the stream to (batch·tokens, d) before its FFN and adds there, then views
    the sum back: the add holds up to that reshape. Its value is checked here by hand: the
    block output equals the flattened stream after attention plus fc2's output."""
    model = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=2,
            vocab_size=50,
            max_position_embeddings=16,
            word_embed_proj_dim=32,
            dropout=0.0,
        )
    ).eval()
    seen = {}
    layer = model.model.decoder.layers[0]
    layer.final_layer_norm.register_forward_hook(lambda m, a, o: seen.update(stream=a[0]))
    layer.fc2.register_forward_hook(lambda m, a, o: seen.update(f=o))
    layer.register_forward_hook(
        lambda m, a, o: seen.update(out=o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(input_ids=IDS)
    assert seen["stream"].dim() == 2 and seen["out"].dim() == 3  # the add is on the flat view
    torch.testing.assert_close(seen["out"].reshape(-1, 32), seen["stream"] + seen["f"])
    s = discover(model, lambda m: m(input_ids=IDS))
    assert summary(s) == pre_ln_blocks(
        "model.decoder.layers", "self_attn_layer_norm", "final_layer_norm"
    )


@pytest.mark.parametrize("family", ["opt", "bart"])
def test_hf_layers_with_dropout_by_function_keep_their_blocks_in_training(transformers, family):
    """OPT and BART apply ``nn.functional.dropout`` to each branch before the residual add
    (OPT's FFN add on the flattened stream). A training script's structure comes from a
    training step, where the dropout drops 30% here: the blocks found there are the ones
    found in eval mode, where it does not."""
    if family == "opt":
        config = transformers.OPTConfig(
            num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
            vocab_size=50, max_position_embeddings=16, word_embed_proj_dim=32, dropout=0.3,
        )  # fmt: skip
        model, norms = (
            transformers.OPTForCausalLM(config),
            ("self_attn_layer_norm", "final_layer_norm"),
        )
    else:
        config = transformers.BartConfig(
            decoder_layers=2, d_model=32, decoder_ffn_dim=64, decoder_attention_heads=2,
            vocab_size=50, max_position_embeddings=16, dropout=0.3,
        )  # fmt: skip
        model, norms = (
            transformers.BartForCausalLM(config),
            ("self_attn_layer_norm", "final_layer_norm"),
        )
    want = discover(model, lambda m: m(input_ids=IDS))
    model.train()
    with torch.no_grad(), capture(model) as trace:
        model(input_ids=IDS)
    got = from_trace(model, trace)
    assert summary(got) == summary(want)
    if family == "opt":
        assert summary(got) == pre_ln_blocks("model.decoder.layers", *norms)
    else:  # Post-LN: each norm follows its add
        assert [b.placement for b in got.blocks] == ["post", "post"]
    assert all(br.transformed for b in got.blocks for br in b.branches)


def test_hf_gpt_neox_parallel_residual_has_two_branches_from_one_sum(transformers):
    """GPT-NeoX's parallel block adds x + attn(LN1 x) + mlp(LN2 x) in one sum, with no
    tensor between: checked here by hand from the modules' outputs, then found as a Pre-LN
    block with an attention and an MLP branch, each with its own norm of the stream."""
    model = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=50,
            max_position_embeddings=16,
            use_parallel_residual=True,
        )
    ).eval()
    seen = _hooked(model.gpt_neox.layers[0], ["attention", "mlp"])
    with torch.no_grad():
        model(input_ids=IDS)
    torch.testing.assert_close(seen["out"], seen["x"] + seen["attention"] + seen["mlp"])
    s = discover(model, lambda m: m(input_ids=IDS))
    assert summary(s) == pre_ln_blocks(
        "gpt_neox.layers", "input_layernorm", "post_attention_layernorm"
    )


@pytest.mark.slow
def test_hf_gptj_parallel_block_from_one_norm_has_an_attention_and_an_mlp_branch(transformers):
    """GPT-J adds x + attn(LN x) + mlp(LN x): one norm feeds both branches. The MLP branch is
    the MLP's, not the attention's that ran between the norm and it."""
    model = transformers.GPTJForCausalLM(
        transformers.GPTJConfig(
            vocab_size=50, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=16
        )
    ).eval()
    seen = _hooked(model.transformer.h[0], ["attn", "mlp"])
    with torch.no_grad():
        model(input_ids=IDS)
    torch.testing.assert_close(seen["out"], seen["x"] + seen["attn"] + seen["mlp"])
    s = discover(model, lambda m: m(input_ids=IDS))
    for i, block in enumerate(s.blocks):
        h = f"transformer.h.{i}"
        assert [(br.kind, br.name, br.placement, br.norm) for br in block.branches] == [
            ("attention", f"{h}.attn", "pre", f"{h}.ln_1"),
            ("mlp", f"{h}.mlp", "pre", f"{h}.ln_1"),
        ]
    assert len(s.blocks) == 2


def test_hf_gemma2_sandwich_norms_are_pre_ln_branches_ending_in_their_own_norm(transformers):
    """Gemma 2 adds x + LN_post(attn(LN_pre x)): the added term is a norm's output. The stream
    itself is never normalised, so both branches are Pre-LN, each f written by its post-norm."""
    model = transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()
    post = ["post_attention_layernorm", "post_feedforward_layernorm"]
    seen = _hooked(model.model.layers[0], post)
    with torch.no_grad():
        model(input_ids=IDS)
    torch.testing.assert_close(seen["out"], seen["x"] + seen[post[0]] + seen[post[1]])
    s = discover(model, lambda m: m(input_ids=IDS))
    assert len(s.blocks) == 2
    for i, block in enumerate(s.blocks):
        h = f"model.layers.{i}"
        assert [(br.kind, br.output, br.placement, br.norm) for br in block.branches] == [
            ("attention", f"{h}.post_attention_layernorm", "pre", f"{h}.input_layernorm"),
            ("mlp", f"{h}.post_feedforward_layernorm", "pre", f"{h}.pre_feedforward_layernorm"),
        ]
        assert [(a.heads, a.kv_heads) for a in block.attention] == [(2, 1)]


def test_hf_bloom_branches_that_add_the_stream_inside_their_module_keep_its_kind(transformers):
    """BLOOM's attention and MLP take the residual as an argument and add it themselves, so
    each ends after the sum: the branch is still that attention's and that MLP's."""
    model = transformers.BloomForCausalLM(
        transformers.BloomConfig(vocab_size=50, hidden_size=32, n_layer=2, n_head=2)
    ).eval()
    seen = _hooked(model.transformer.h[0], ["self_attention.dense", "mlp.dense_4h_to_h"])
    with torch.no_grad():
        model(input_ids=IDS)
    torch.testing.assert_close(
        seen["out"], seen["x"] + seen["self_attention.dense"] + seen["mlp.dense_4h_to_h"]
    )
    s = discover(model, lambda m: m(input_ids=IDS))
    assert len(s.blocks) == 2
    for i, block in enumerate(s.blocks):
        h = f"transformer.h.{i}"
        assert [(br.kind, br.name, br.output, br.placement) for br in block.branches] == [
            ("attention", f"{h}.self_attention", f"{h}.self_attention.dense", "pre"),
            ("mlp", f"{h}.mlp", f"{h}.mlp.dense_4h_to_h", "pre"),
        ]


def test_hf_t5_encoder_decoder(transformers):
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            num_layers=2,
            num_decoder_layers=2,
            d_model=32,
            num_heads=2,
            d_kv=16,
            d_ff=64,
            vocab_size=50,
        )
    )
    s = discover(model, lambda m: m(input_ids=IDS, decoder_input_ids=IDS))
    assert [(b.stack, b.placement) for b in s.blocks] == [("encoder", "pre")] * 2 + [
        ("decoder", "pre")
    ] * 2
    assert [br.kind for br in s.blocks[2].branches] == ["attention", "cross_attention", "mlp"]


def test_unrecognised_model_says_so():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    s = discover(model, lambda m: m(torch.randn(3, 4)))
    assert not s.recognised and s.blocks == []
    assert "no residual blocks found" in s.notes[0]


def test_forward_that_raises_is_a_note_not_a_crash():
    model, _ = sample_gpt("pre", 2)

    def bad(m):
        raise ValueError("wrong batch")

    s = discover(model, bad)
    assert not s.recognised and "ValueError: wrong batch" in s.notes[0]


class _SmallInitPostLNLayer(nn.Module):
    """LN(x + attn(x)), then LN(h + ff(h)), with weights so small that each branch adds
    ~1e-3 of the stream: the first norm's output is then within the add check's tolerance of
    the sum it normalises."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))
        self.ln2 = nn.LayerNorm(d)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.004)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.attn.in_proj_weight, std=0.004)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.ln2(h + self.ff(h))


def test_a_small_init_post_ln_is_post_ln_in_every_block():
    torch.manual_seed(0)
    layers = nn.ModuleList(_SmallInitPostLNLayer() for _ in range(4))
    model = nn.Sequential(nn.LayerNorm(32), *layers)  # the stream enters normalised
    x = torch.randn(2, 6, 32)
    # The degenerate fit, by hand: in the second block the stream is LN output, LN1's output
    # h and the sum it reads differ by less than the add check's tolerance, so h + ff(h) also
    # fits 1·(x + attn) + ff.
    with torch.no_grad():
        x1 = layers[0](model[0](x))
        s_attn = x1 + layers[1].attn(x1, x1, x1, need_weights=False)[0]
        h = layers[1].ln1(s_attn)
    assert float((h - s_attn).norm() / s_attn.norm()) < 1e-4
    s = discover(model, lambda m: m(x))
    assert [b.placement for b in s.blocks] == ["post"] * 4
    assert [[br.norm for br in b.branches] for b in s.blocks] == [
        [f"{i + 1}.ln1", f"{i + 1}.ln2"] for i in range(4)
    ]
