"""Structure discovery's ``output_positions``: whether the model's output keeps the positions
of its last block, on real models traced by ``discover``: a token LM (batch first and
sequence first), a flattened (B·T, V) head, a mean-pooled classifier, a Perceiver-style
model whose blocks run on learned latents."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabscope.store.structure import Structure
from stabscope.structure import discover

V, D, T, B = 11, 16, 7, 3


class Encoder(nn.Module):
    """Embedding, two Pre-LN encoder layers, a head; ``read`` picks what the head reads."""

    def __init__(self, read: str, batch_first: bool = True) -> None:
        super().__init__()
        self.read, self.batch_first = read, batch_first
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(D, 2, 32, 0.0, batch_first=batch_first, norm_first=True)
            for _ in range(2)
        )
        self.head = nn.Linear(D, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) tokens
        h = self.embed(idx if self.batch_first else idx.T)  # (B, T, D) or (T, B, D)
        for layer in self.layers:
            h = layer(h)
        if self.read == "tokens":
            return self.head(h)  # (B, T, V) or (T, B, V)
        if self.read == "flat":
            return self.head(h).reshape(-1, V)  # (B·T, V)
        return self.head(h.mean(1 if self.batch_first else 0))  # (B, V): pooled


class Latents(nn.Module):
    """Perceiver-style: 4 learned latents read the tokens by cross-attention, then two
    self-attention layers run on the latents; the head reads their mean."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.latents = nn.Parameter(torch.randn(4, D))
        self.cross = nn.MultiheadAttention(D, 2, batch_first=True)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(D, 2, 32, 0.0, batch_first=True, norm_first=True)
            for _ in range(2)
        )
        self.head = nn.Linear(D, 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)  # (B, T, D)
        q = self.latents.expand(idx.shape[0], -1, -1)  # (B, 4, D)
        h = q + self.cross(q, x, x, need_weights=False)[0]
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))  # (B, 5)


def traced(model: nn.Module) -> Structure:
    torch.manual_seed(0)
    idx = torch.randint(0, V, (B, T))
    return discover(model, lambda m: m(idx))


@pytest.mark.parametrize(
    ("model", "keeps"),
    [
        (Encoder("tokens"), True),
        (Encoder("tokens", batch_first=False), True),
        (Encoder("flat"), True),
        (Encoder("pooled"), False),
        (Encoder("pooled", batch_first=False), False),
        (Latents(), False),
    ],
    ids=["lm", "lm-seq-first", "flat-head", "pooled", "pooled-seq-first", "latents"],
)
def test_output_positions(model: nn.Module, keeps: bool):
    structure = traced(model)
    assert structure.recognised and [b.name for b in structure.blocks] == ["layers.0", "layers.1"]
    assert structure.output_positions is keeps
    # meta.json round trip
    assert Structure.from_dict(structure.to_dict()).output_positions is keeps
