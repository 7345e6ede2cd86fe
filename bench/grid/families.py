"""The grid's model families, each built from a small config (no weights downloaded).

Every family maps a batch dict (``tasks.to_batch``) to logits (B, T, vocab):

    gpt      sample_models/gpt.py's hand-written GPT (norm = pre | post | deepnorm)
    llama    transformers' LlamaForCausalLM (Pre-RMSNorm, rotary, SwiGLU)
    gpt2     transformers' GPT2LMHeadModel (Pre-LN, learned positions)
    bert     transformers' BertLMHeadModel as a causal LM (Post-LN)
    encdec   torch.nn.Transformer encoder-decoder (norm = pre | post) for the s2s form
    resconv  a residual causal-convolution net with no normalisation at all
    opt      transformers' OPTForCausalLM (Pre-LN, ReLU FFN added on the flattened stream)
    neox     transformers' GPTNeoXForCausalLM with parallel residual blocks (x + attn + mlp)
    lstm     a stacked LSTM language model: no attention, no residual blocks

``out_scale`` multiplies the output head's weights after init (1 = as built): the knob of the
bad-init failure. ``init_gain`` multiplies resconv's residual-branch weights; ``init_std`` is the
transformers models' ``initializer_range`` (their default 0.02).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sample_models.gpt import GPT


class HFCausalLM(nn.Module):
    """A transformers causal LM as logits = f(x); dropout off (configs set it to 0)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=x).logits  # (B, T, vocab)


class EncDec(nn.Module):
    """nn.Transformer with token and learned position embeddings; causal decoder."""

    def __init__(self, vocab: int, seq_len: int, width: int, depth: int, heads: int, norm: str):
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"encdec norm must be pre or post, not {norm!r}")
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.core = nn.Transformer(
            width, heads, depth, depth, 4 * width, dropout=0.0, batch_first=True,
            norm_first=norm == "pre",
        )  # fmt: skip
        self.head = nn.Linear(width, vocab)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))

    def forward(self, src: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        h = self.core(self.embed(src), self.embed(x), tgt_mask=mask, tgt_is_causal=True)
        return self.head(h)  # (B, T, vocab)


class ResConv(nn.Module):
    """x + conv1x1(relu(causal conv k=3 (x))) blocks, no normalisation anywhere: nothing
    bounds the residual stream, so a too-large step can reach inf."""

    def __init__(self, vocab: int, width: int, depth: int, init_gain: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.convs = nn.ModuleList(nn.Conv1d(width, 2 * width, 3) for _ in range(depth))
        self.mixes = nn.ModuleList(nn.Conv1d(2 * width, width, 1) for _ in range(depth))
        self.head = nn.Linear(width, vocab)
        for conv in (*self.convs, *self.mixes):
            conv.weight.data.mul_(init_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x).transpose(1, 2)  # (B, D, T)
        for conv, mix in zip(self.convs, self.mixes):
            h = h + mix(F.relu(conv(F.pad(h, (2, 0)))))  # left pad: causal
        return self.head(h.transpose(1, 2))  # (B, T, vocab)


class LSTMLM(nn.Module):
    """Embedding, a ``depth``-layer LSTM, a linear head: the grid's recurrent family."""

    def __init__(self, vocab: int, width: int, depth: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, width, depth, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.tok(x))  # (B, T, width)
        return self.head(h)  # (B, T, vocab)


def _gpt(cfg, vocab: int, seq_len: int) -> nn.Module:
    return GPT(vocab, seq_len, cfg.width, cfg.depth, cfg.heads, cfg.norm)


def _llama(cfg, vocab: int, seq_len: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.width, intermediate_size=int(8 * cfg.width / 3),
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=seq_len,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        initializer_range=cfg.init_std,
    )  # fmt: skip
    return HFCausalLM(LlamaForCausalLM(conf))


def _gpt2(cfg, vocab: int, seq_len: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    conf = GPT2Config(
        vocab_size=vocab, n_embd=cfg.width, n_layer=cfg.depth, n_head=cfg.heads,
        n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        initializer_range=cfg.init_std,
    )  # fmt: skip
    return HFCausalLM(GPT2LMHeadModel(conf))


def _bert(cfg, vocab: int, seq_len: int) -> nn.Module:
    from transformers import BertConfig, BertLMHeadModel

    conf = BertConfig(
        vocab_size=vocab, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads, intermediate_size=4 * cfg.width, is_decoder=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=seq_len, tie_word_embeddings=False, pad_token_id=None,
        initializer_range=cfg.init_std,
    )  # fmt: skip
    return HFCausalLM(BertLMHeadModel(conf))


def _encdec(cfg, vocab: int, seq_len: int) -> nn.Module:
    return EncDec(vocab, seq_len, cfg.width, cfg.depth, cfg.heads, cfg.norm)


def _resconv(cfg, vocab: int, seq_len: int) -> nn.Module:
    return ResConv(vocab, cfg.width, cfg.depth, cfg.init_gain)


def _opt(cfg, vocab: int, seq_len: int) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    conf = OPTConfig(
        vocab_size=vocab, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
        ffn_dim=4 * cfg.width, num_attention_heads=cfg.heads, max_position_embeddings=seq_len,
        word_embed_proj_dim=cfg.width, do_layer_norm_before=True, dropout=0.0,
        attention_dropout=0.0, init_std=cfg.init_std, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return HFCausalLM(OPTForCausalLM(conf))


def _neox(cfg, vocab: int, seq_len: int) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    conf = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads, intermediate_size=4 * cfg.width,
        max_position_embeddings=seq_len, use_parallel_residual=True, hidden_dropout=0.0,
        attention_dropout=0.0, initializer_range=cfg.init_std, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return HFCausalLM(GPTNeoXForCausalLM(conf))


def _lstm(cfg, vocab: int, seq_len: int) -> nn.Module:
    return LSTMLM(vocab, cfg.width, cfg.depth)


BUILDERS = {
    "gpt": _gpt,
    "llama": _llama,
    "gpt2": _gpt2,
    "bert": _bert,
    "encdec": _encdec,
    "resconv": _resconv,
    "opt": _opt,
    "neox": _neox,
    "lstm": _lstm,
}
FORMS = {name: "s2s" if name == "encdec" else "lm" for name in BUILDERS}


def output_head(model: nn.Module) -> nn.Module:
    """The last Linear, vocab logits out (HF models keep it inside the wrapped net)."""
    return model.net.get_output_embeddings() if isinstance(model, HFCausalLM) else model.head


def build(cfg, vocab: int, seq_len: int) -> nn.Module:
    """The family's model for a task of ``vocab`` tokens and sequences up to ``seq_len``."""
    if cfg.family not in BUILDERS:
        raise ValueError(f"family must be one of {sorted(BUILDERS)}, not {cfg.family!r}")
    model = BUILDERS[cfg.family](cfg, vocab, seq_len)
    if cfg.out_scale != 1.0:
        with torch.no_grad():
            output_head(model).weight.mul_(cfg.out_scale)
    return model


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["src"], batch["x"]) if "src" in batch else model(batch["x"])
