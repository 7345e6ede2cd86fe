"""A padding mask written as a finite fill, ``scores.masked_fill(pad, -1e9)`` (The Annotated
Transformer's idiom) or HF's older additive -10000: the fill is not one of the model's
attention logits. The recorded ``attn_logit_max`` equals the max |q·k|/sqrt(d) over the
unmasked keys, computed here from the module's own q and k, the recorded ``attn_entropy`` is
normalised by the log of the keys a query may attend (not the fill's), on the numba kernels
and on torch's path alike, and a healthy padded classifier passes the gate (the fill alone read
1e9, past attention-logit-growth's error at 1e4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabscope import Recorder, RecorderConfig, Schedule, load_run
from stabscope.probes.attention import AttentionSampling
from stabscope.probes.attention_sample import entropy_rows
from stabscope.rules import check_run

V, T, D, H = 16, 12, 32, 4


class Attention(nn.Module):
    def __init__(self, fill: float, additive: bool, causal: bool) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fill, self.additive, self.causal = fill, additive, causal
        self.seen: list[torch.Tensor] = []  # the unmasked logits of each call (the reference)
        # (scores, masked) of each call: the entropy's reference is computed after the step
        # (a softmax in here would be read as one more attention call)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = self.qkv(x).view(b, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, T, E)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)  # (B, H, T, T)
        keys = pad[:, None, None, :]  # (B, 1, 1, T): True at padding keys
        if self.causal:  # and later keys: a left-padded query sees padding only (a row all fill)
            keys = keys | torch.ones(T, T, dtype=torch.bool).triu(1)
        self.seen.append(scores.detach().abs().masked_fill(keys, 0).amax((0, 2, 3)))
        self.calls.append((scores.detach(), keys.expand(b, 1, T, T)))
        if self.additive:  # HF's older extended mask: (1 - mask) * -10000 added to the scores
            scores = scores + keys.float() * self.fill
        else:
            scores = scores.masked_fill(keys, self.fill)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, T, D))


class Block(nn.Module):
    def __init__(self, fill: float, additive: bool, causal: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention(fill, additive, causal)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), pad)
        return x + self.mlp(self.ln2(x))


class Classifier(nn.Module):
    def __init__(self, fill: float, additive: bool, causal: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([Block(fill, additive, causal) for _ in range(2)])
        self.head = nn.Linear(D, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x, pad)
        keep = (~pad).float()[..., None]
        return self.head((x * keep).sum(1) / keep.sum(1))  # masked mean pooling


def sampled_entropy(scores: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """(H,) mean over the probe's sampled query rows of entropy / ln(keys the query may
    attend), from the unmasked (B, H, T, T) scores; rows that may attend one key or none (a
    left-padded query under a causal mask) are left out."""
    b = scores.shape[0]
    rows = entropy_rows(b, T, AttentionSampling().rows, scores.device)  # (B, r)
    seq = torch.arange(b)[:, None]
    x = scores[seq, :, rows].double()  # (B, r, H, T)
    off = masked[seq, 0, rows][:, :, None, :].expand_as(x)  # (B, r, H, T): True = masked
    p = x.masked_fill(off, float("-inf")).softmax(-1).nan_to_num()
    ent = -(p * p.clamp(min=1e-300).log()).sum(-1)  # (B, r, H)
    keys = (~off).sum(-1)
    keep = keys > 1
    norm = torch.where(keep, ent / keys.clamp(min=2).double().log(), 0.0)
    return norm.sum((0, 1)) / keep.sum((0, 1))


def batch(g: torch.Generator, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(1, V, (16, T), generator=g)
    lengths = torch.randint(4, T, (16,), generator=g)  # every sequence has padding
    position = torch.arange(T)[None, :]
    padded = position < (T - lengths)[:, None] if left else position >= lengths[:, None]
    tokens[padded] = 0
    return tokens, ((tokens == 3).sum(1) > 0).long()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fill", "additive", "causal"), [(-1e9, False, False), (-1e4, True, False), (-1e9, False, True)]
)
def test_a_finite_fill_is_not_read_as_an_attention_logit(
    tmp_path, kernel_path, fill, additive, causal
):
    # causal: left padding under a causal mask, so a padded query's row is all fill.
    torch.manual_seed(0)
    model = Classifier(fill, additive, causal)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    steps = 6
    config = RecorderConfig(schedule=Schedule(steps, 0), online_rules=False)
    with Recorder(model, tmp_path / "run", config) as rec:
        for _ in range(steps):
            for block in model.blocks:
                block.attn.seen.clear()
                block.attn.calls.clear()
            tokens, labels = batch(g, left=causal)
            loss = F.cross_entropy(model(tokens), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss)
            last = [block.attn.seen[-1] for block in model.blocks]
            entropy = [sampled_entropy(*block.attn.calls[-1]) for block in model.blocks]
    rows = load_run(tmp_path / "run", metrics=["attn_logit_max", "attn_entropy"])
    rows = rows[rows.step == steps - 1].sort_values(["module", "index"])
    # The entropy's normalisation counts the keys the query may attend, not the fill's.
    got = rows[rows.metric == "attn_entropy"].value.to_numpy()
    assert got == pytest.approx(torch.cat(entropy).numpy(), rel=1e-5)
    final = rows[rows.metric == "attn_logit_max"]
    want = torch.cat(last).numpy()  # blocks.0's heads, then blocks.1's
    assert final.module.astype(str).tolist() == [
        f"blocks.{i}.attn" for i in (0, 1) for _ in range(H)
    ]
    assert final.value.to_numpy() == pytest.approx(want, rel=1e-5)
    assert (final.value < 100).all()
    assert "attention-logit-growth" not in {f.rule for f in check_run(tmp_path / "run").findings}
