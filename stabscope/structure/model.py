"""What structure discovery found: blocks, their residual branches, norms and attention."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Branch:
    """One residual branch: the stream x goes in, f comes out, and x' = α·x + f.

    ``output`` is the module whose output *is* f (hooked at run time); ``name`` is the module
    that best stands for the branch: the attention or MLP module when one covers it, else the
    last projection (weight matrix) in it, e.g. ``linear2`` of torch's transformer layers.
    """

    name: str
    output: str
    kind: str  # attention | cross_attention | mlp | other
    placement: str  # pre: x + f(LN(x)) | post: LN(x + f(x)) | deepnorm: LN(α·x + f(x))
    norm: str | None  # pre: the norm before f; post/deepnorm: the norm after the add
    alpha: float
    stack: str = ""  # encoder | decoder | "" (decoder-only or encoder-only)
    position: int = 0  # index among the branches of its stack, in forward order


@dataclass
class AttentionInfo:
    name: str
    heads: int | None
    kv_heads: int | None = None


@dataclass
class Block:
    name: str
    index: int
    stack: str
    placement: str  # pre | post | deepnorm | mixed
    alpha: float
    branches: list[Branch] = field(default_factory=list)
    attention: list[AttentionInfo] = field(default_factory=list)


@dataclass
class Structure:
    recognised: bool
    blocks: list[Block] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def branches(self) -> list[Branch]:
        return [b for block in self.blocks for b in block.branches]

    @property
    def attention(self) -> list[AttentionInfo]:
        return [a for block in self.blocks for a in block.attention]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Structure:
        blocks = [
            Block(
                **{
                    **b,
                    "branches": [Branch(**x) for x in b["branches"]],
                    "attention": [AttentionInfo(**a) for a in b["attention"]],
                }
            )
            for b in data.get("blocks", [])
        ]
        return cls(
            data.get("recognised", False), blocks, data.get("norms", []), data.get("notes", [])
        )


def unrecognised(note: str) -> Structure:
    return Structure(False, notes=[note])
