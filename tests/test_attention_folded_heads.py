"""Attention written with ``torch.bmm`` on heads folded into the batch dim: a softmax of
(B·H, T, S) logits (HF's XGLM; BART, OPT and Whisper in older transformers releases). Inside a
module whose head count the structure read, the probe unfolds it and records the heads'
``attn_logit_max`` and ``attn_entropy``. Checked against the logits computed here from the
module's own queries and keys: the max |logit| over the keys each query may attend, and the
entropy of the probe's sampled rows over those keys."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabscope import Recorder, RecorderConfig, Schedule, load_run
from stabscope.probes.attention import AttentionSampling
from stabscope.probes.attention_sample import entropy_rows
from tests.conftest import record_steps

V, T, D, H = 20, 10, 32, 4
CAUSAL = torch.ones(T, T, dtype=torch.bool).triu(1)  # True above the diagonal: masked


class FoldedAttention(nn.Module):
    """q, k, v of shape (B·H, T, E), logits by ``torch.bmm``, a causal mask added as
    finfo.min (HF's form), softmax over the last dim of the 3-D logits."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = H
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.scores = torch.empty(0)  # (B, H, T, T): the last call's unmasked logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]

        def fold(t: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B·H, T, E)
            return t.view(b, T, H, D // H).transpose(1, 2).reshape(b * H, T, D // H)

        q = fold(self.q_proj(x) / math.sqrt(D // H))
        k, v = fold(self.k_proj(x)), fold(self.v_proj(x))
        logits = torch.bmm(q, k.transpose(1, 2))  # (B·H, T, T)
        self.scores = logits.detach().view(b, H, T, T)
        bias = torch.zeros(T, T).masked_fill(CAUSAL, torch.finfo(torch.float32).min)
        weights = F.softmax(logits + bias, dim=-1)
        out = torch.bmm(weights, v).view(b, H, T, D // H).transpose(1, 2).reshape(b, T, D)
        return self.out_proj(out)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.self_attn = FoldedAttention()
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(D, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def reference(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H,) max |logit| over the causal keys of every query, and (H,) mean over the probe's
    sampled rows of entropy / ln(causal keys), rows with one key left out."""
    b = scores.shape[0]
    x = scores.double()
    peak = x.abs().masked_fill(CAUSAL, 0).amax((0, 2, 3))
    rows = entropy_rows(b, T, AttentionSampling().rows, scores.device)  # (B, r)
    seq = torch.arange(b)[:, None]
    sample = x[seq, :, rows]  # (B, r, H, T)
    off = CAUSAL[rows][:, :, None, :].expand_as(sample)
    p = sample.masked_fill(off, float("-inf")).softmax(-1)
    ent = -(p * p.clamp(min=1e-300).log()).sum(-1)  # (B, r, H)
    keys = (~off).sum(-1)
    keep = keys > 1
    norm = torch.where(keep, ent / keys.clamp(min=2).double().log(), 0.0)
    return peak, norm.sum((0, 1)) / keep.sum((0, 1))


@pytest.mark.slow
def test_folded_heads_are_recorded_per_head(tmp_path, kernel_path):
    torch.manual_seed(0)
    model = LM()
    g = torch.Generator().manual_seed(0)

    def lm_loss(m: nn.Module) -> torch.Tensor:
        tokens = torch.randint(0, V, (8, T), generator=g)
        logits = m(tokens)
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))

    steps = 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = RecorderConfig(schedule=Schedule(steps, 0), online_rules=False)
    record_steps(model, tmp_path / "run", lm_loss, opt, steps, config, probe_forward=False)
    # The last step's forward: the logits its recorded statistics read.
    last = [reference(block.self_attn.scores) for block in model.blocks]
    rows = load_run(tmp_path / "run", metrics=["attn_logit_max", "attn_entropy"])
    rows = rows[rows.step == steps - 1].sort_values(["module", "index"])
    for metric, i in (("attn_logit_max", 0), ("attn_entropy", 1)):
        got = rows[rows.metric == metric]
        assert got.module.astype(str).tolist() == [
            f"blocks.{j}.self_attn" for j in (0, 1) for _ in range(H)
        ]
        want = torch.cat([ref[i] for ref in last]).numpy()
        assert got.value.to_numpy() == pytest.approx(want, rel=1e-5)


def test_hf_xglm_attention_is_recorded(tmp_path):
    """HF's XGLM attends with ``torch.bmm`` on folded heads: each layer's ``self_attn`` gets
    its 4 heads' max logit, equal to the one computed from its q_proj and k_proj outputs
    (the queries scaled by 1/sqrt(E), as XGLM does) over the causal keys."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.XGLMConfig(
        vocab_size=V, d_model=D, num_layers=2, attention_heads=H, ffn_dim=64,
        max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    model = transformers.XGLMForCausalLM(config)
    seen: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for role in ("q_proj", "k_proj"):
            getattr(layer.self_attn, role).register_forward_hook(
                lambda m, a, o, key=f"{i}.{role}": seen.update({key: o.detach()})
            )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(1))
    config_rec = RecorderConfig(schedule=Schedule(2, 0), online_rules=False)
    with Recorder(model, tmp_path / "run", config_rec) as rec:
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
            want = []
            for i in range(2):
                q = seen[f"{i}.q_proj"].view(4, T, H, D // H).transpose(1, 2) / math.sqrt(D // H)
                k = seen[f"{i}.k_proj"].view(4, T, H, D // H).transpose(1, 2)
                scores = (q @ k.transpose(-2, -1)).abs().masked_fill(CAUSAL, 0)
                want.append(scores.amax((0, 2, 3)))
    rows = load_run(tmp_path / "run", metrics="attn_logit_max")
    rows = rows[rows.step == 1].sort_values(["module", "index"])
    assert rows.module.astype(str).tolist() == [
        f"model.layers.{i}.self_attn" for i in (0, 1) for _ in range(H)
    ]
    assert rows.value.to_numpy() == pytest.approx(torch.cat(want).numpy(), rel=1e-4)
