"""What a module is, from its class name, its qualified name and its attributes: a norm, an
attention, an MLP, a block of a repeated stack, an encoder or decoder. Only hints: detect.py
claims a residual branch only where the traced tensors prove it."""

from __future__ import annotations

import re

from torch import nn

from .trace import Call

_NORM = re.compile(r"Norm", re.I)
_ATTN_TYPE = re.compile(r"Attention|Attn", re.I)
_ATTN_NAME = re.compile(
    r"(^|\.)(attn|attention|self_attn|self_attention|crossattention|"
    r"encoder_attn|multihead_attn|EncDecAttention|SelfAttention)$"
)
_CROSS = re.compile(r"cross|encoder_attn|EncDecAttention|multihead_attn", re.I)
_MLP_TYPE = re.compile(r"MLP|FeedForward|FFN|DenseReluDense", re.I)
#: By name only the module's own (last) name: ``mlp.dense_h_to_4h`` is a projection inside one.
_MLP_NAME = re.compile(r"(^|\.)(mlp|ffn|feed_forward|DenseReluDense)$", re.I)
_HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "heads", "h")
_KV_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")


def is_norm(module: nn.Module) -> bool:
    return bool(_NORM.search(type(module).__name__))


def is_attention(call: Call) -> bool:
    return bool(_ATTN_TYPE.search(type(call.module).__name__) or _ATTN_NAME.search(call.name))


def is_mlp(call: Call) -> bool:
    return bool(_MLP_TYPE.search(type(call.module).__name__) or _MLP_NAME.search(call.name))


def is_cross_attention(name: str) -> bool:
    return bool(_CROSS.search(name))


def count_heads(module: nn.Module) -> tuple[int | None, int | None]:
    """Attention and key/value head counts from the usual attribute names."""
    heads = kv = None
    for m in module.modules():
        config = getattr(m, "config", None)
        for source in (m, config):
            if source is None:
                continue
            heads = heads or next(
                (
                    getattr(source, a)
                    for a in _HEAD_ATTRS
                    if isinstance(getattr(source, a, None), int)
                ),
                None,
            )
            kv = kv or next(
                (
                    getattr(source, a)
                    for a in _KV_ATTRS
                    if isinstance(getattr(source, a, None), int)
                ),
                None,
            )
    return heads, kv


def block_candidates(model: nn.Module, names: dict[int, str]) -> dict[str, bool]:
    """Children of a ModuleList, Sequential or ModuleDict (blocks keyed ``"layer0"``, or stages
    keyed ``"low"``/``"high"``), of a repeated class, that have children of their own, in
    module order, each with whether its container holds two or more of its class (a stack of
    like blocks, not T5's one attention and one MLP layer). Nested ones are included: a stage
    of a hierarchical model (Swin's ``layers.0``, ConvNeXt's ``stages.0``) holds a stack of
    its own blocks; detect.py chooses the level."""
    out: dict[str, bool] = {}
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            continue
        kids = list(module.children())
        for kid in kids:
            same = sum(type(k) is type(kid) for k in kids)
            if (
                id(kid) in names
                and any(True for _ in kid.children())
                and (same >= 2 or re.search(r"Block|Layer", type(kid).__name__))
            ):
                out[names[id(kid)]] = same >= 2
    return out


def inner_stack(name: str, candidates: dict[str, bool]) -> list[str]:
    """The candidates of a repeated class nested in ``name`` with no candidate between
    (a stage's blocks; the experts of an MoE layer, which detect.py finds no residual in)."""
    inside = [n for n in candidates if n.startswith(name + ".")]
    return [
        n
        for n in inside
        if candidates[n] and not any(n.startswith(o + ".") for o in inside if o != n)
    ]


def outermost(candidates: dict[str, bool]) -> list[str]:
    """The candidates no other candidate holds."""
    return [n for n in candidates if not any(n.startswith(o + ".") for o in candidates if o != n)]


def stack_of(name: str) -> str:
    if re.search(r"(^|\.)decoder(\.|$)", name):
        return "decoder"
    if re.search(r"(^|\.)encoder(\.|$)", name):
        return "encoder"
    return ""


__all__ = [
    "block_candidates",
    "count_heads",
    "inner_stack",
    "is_attention",
    "is_cross_attention",
    "is_mlp",
    "is_norm",
    "outermost",
    "stack_of",
]
