"""Which torch calls compute attention: the calls the attention probe samples, and that
structure discovery looks for in blocks whose attention is no module of its own.

Three forms: ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``
(``nn.MultiheadAttention``), and an explicit softmax over the keys of (B, H, T, S) logits
(HF's eager attention, hand-written attention). A softmax of fewer dims is a router's or a
classifier's, not attention's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: The functions as torch defines them (the attention probe patches the attributes while an
#: attention module runs).
SDPA = F.scaled_dot_product_attention
MHA = F.multi_head_attention_forward
SOFTMAX = frozenset({torch.softmax, F.softmax, torch.Tensor.softmax})


def _softmax_over_last(func: Any, args: tuple, kwargs: dict, out: Any, dims: int) -> bool:
    """Whether a call is a softmax over the last dim of a ``dims``-D tensor."""
    if func not in SOFTMAX or not isinstance(out, torch.Tensor) or out.dim() != dims:
        return False
    return kwargs.get("dim", args[1] if len(args) > 1 else None) in (-1, dims - 1)


def softmax_over_keys(func: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """Whether a call is a softmax over the last dim of (B, H, T, S) logits."""
    return _softmax_over_last(func, args, kwargs, out, 4)


def softmax_over_folded_keys(func: Any, args: tuple, kwargs: dict, out: Any, heads: int) -> bool:
    """Whether a call is a softmax over the last dim of (B·H, T, S) logits, batch and heads
    folded into one dim (``torch.bmm`` attention: HF's XGLM, and BART, OPT or Whisper in
    older transformers releases). Read only inside a module known to attend with ``heads``
    heads: a 3-D softmax elsewhere is a router's or a classifier's."""
    return (
        heads > 0 and _softmax_over_last(func, args, kwargs, out, 3) and out.shape[0] % heads == 0
    )


def attention_call(func: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """Whether a call computes attention, in any of the three forms."""
    return func is SDPA or func is MHA or softmax_over_keys(func, args, kwargs, out)


__all__ = [
    "MHA",
    "SDPA",
    "SOFTMAX",
    "attention_call",
    "softmax_over_folded_keys",
    "softmax_over_keys",
]
