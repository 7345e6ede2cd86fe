"""What structure discovery found: blocks, their residual branches, norms and attention.

Discovery (``stabscope.structure``, torch) builds these; the recorder writes them to
meta.json's ``structure``; the read side (rules, report) reads them back with
``Structure.from_dict``. No torch import here.
"""

from __future__ import annotations

import dataclasses
import math
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
    # f is an elementwise function of ``output``'s output, not that output itself: an
    # activation (x + gelu(W·h)) or a gate or scale (adaLN-Zero's x + g·attn(h), LayerScale,
    # ReZero): the block is a block, but the residual stats, which need f, skip the branch.
    transformed: bool = False


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
    # Whether the model's output keeps the positions of its last block's output (an LM's
    # or a tagger's logits do; a classifier's pooled output does not); None when unknown.
    output_positions: bool | None = None

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
        """From meta.json's ``structure`` as ``store.meta_check`` lets it through: keys a
        newer stabscope added are ignored, optional ones missing get defaults, and an α
        written as ``"nan"`` or null (strict JSON) is NaN."""
        blocks = [
            _record(
                Block,
                b,
                _BLOCK,
                alpha=_number(b.get("alpha")),
                branches=[
                    _record(Branch, x, _BRANCH, alpha=_number(x.get("alpha")))
                    for x in b.get("branches", [])
                ],
                attention=[_record(AttentionInfo, a, _ATTENTION) for a in b.get("attention", [])],
            )
            for b in data.get("blocks", [])
        ]
        positions = data.get("output_positions")
        return cls(
            bool(data.get("recognised", False)),
            blocks,
            list(data.get("norms", [])),
            list(data.get("notes", [])),
            positions if isinstance(positions, bool) else None,
        )


#: What a record read back from meta.json gets for a key it lacks (``meta_check`` requires
#: only a block's name).
_BRANCH = {"name": "", "output": "", "kind": "other", "placement": "", "norm": None}
_ATTENTION = {"name": "", "heads": None}
_BLOCK = {"index": 0, "stack": "", "placement": ""}


def _record(cls: type[Any], data: dict[str, Any], defaults: dict[str, Any], **parsed: Any) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**defaults, **{k: v for k, v in data.items() if k in known}, **parsed})


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def unrecognised(note: str) -> Structure:
    return Structure(False, notes=[note])


__all__ = ["AttentionInfo", "Block", "Branch", "Structure", "unrecognised"]
