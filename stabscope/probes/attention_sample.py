"""Which rows of an attention call are recomputed, and the recomputation (SDPA's q and k).

**Entropy** (a mean over queries): ``batch × queries`` rows (32 by default) spread over every
sequence of the batch and over positions: r = max(1, rows // B) per sequence, from a grid of
B·r positions evenly spaced over [1, L-1], sequence i taking grid points i, i+B, i+2B, ...
(so the sequences sample staggered positions). Entropy varies more between sequences than
along one: on a trained Llama, 2 sequences × 16 positions missed the batch's mean by up to
0.32 (normalised), 32 rows spread over the 16 sequences by at most 0.05
(``bench/attention_sampling.py``, docs/benchmarks.md).

**Max logit** (an extreme): the entropy's rows, and in every sequence and head the ``peak``
queries most likely to hold the maximum, those with the largest ‖q_i‖ · max_{j ≤ i} ‖k_j‖
(Cauchy-Schwarz bound on their |q_i·k_j|; max over all keys without a causal mask). Reading
q's and k's norms costs one pass over them; the rows, a few logits per sequence. Every value
taken is an actual logit: a lower bound of the batch's maximum, measured within 10% of it on
trained models (32 evenly spaced rows alone: 23-63% below). Where the model wrote the logits
out (explicit softmax), their whole maximum is read.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .kernels import host_kernels
from .kernels.attention_masks import MASKED_ROW, NO_WEIGHT

#: Logits or additive-mask values at or below this fraction of the dtype's most negative
#: value mean "never attend" (-inf, or HF's ``finfo.min``).
NEVER = 0.5

#: Elements of a model's written-out logits handled at once (a temporary of this many).
CHUNK = 1 << 24


def query_positions(length: int, n: int, device: torch.device) -> torch.Tensor:
    """``n`` query indices evenly spaced over [1, length-1] (query 0 sees one causal key)."""
    if length <= 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.unique(
        torch.linspace(1, length - 1, min(n, length - 1), device=device).round().long()
    )


@functools.lru_cache(maxsize=64)
def entropy_rows(batch: int, length: int, rows: int, device: torch.device) -> torch.Tensor:
    """(batch, r) query positions of each sequence that the entropy reads (module docstring);
    cached: every layer of every recorded step asks for the same."""
    r = max(1, rows // batch)
    grid = query_positions(length, batch * r, device)
    i = torch.arange(batch, device=device)[:, None]
    j = torch.arange(min(r, len(grid)), device=device)[None, :]
    return grid[(i + j * batch) % len(grid)]


def float_mask_allowed(mask: torch.Tensor) -> torch.Tensor:
    """Where an additive mask (or logits written out with one) lets a key be attended."""
    return torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min * NEVER)


def apply_mask(
    logits: torch.Tensor, allowed: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` and ``allowed`` (broadcastable to them) under ``mask`` (logits' shape):
    boolean (True = may attend) narrows ``allowed``; additive narrows it where the mask means
    "never" and adds the rest to the logits (in ``dtype``)."""
    if mask.dtype == torch.bool:
        return logits, allowed & mask
    ok = float_mask_allowed(mask)
    return logits + mask.to(dtype).masked_fill(~ok, 0), allowed & ok


def on_host(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernel can read q, k and the mask in place."""
    tensors = (q, k) if mask is None else (q, k, mask)
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" for t in tensors):
        return False
    if q.dtype not in host_kernels.HOST_DTYPES or k.dtype != q.dtype:
        return False
    if mask is not None and mask.dtype not in (torch.bool, q.dtype):
        return False
    return host_kernels.ready()


def sample_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    rows: torch.Tensor,
    peak: int,
) -> torch.Tensor:
    """(H, 2) [mean normalised entropy over the ``rows`` (B, r), max |logit| over those and
    the ``peak`` likeliest queries of each sequence]. q (B, H, L, E), k (B, Hk, S, E) (head h
    reads kv head h // (H/Hk)); mask None or a (B, H, L, S) view, boolean (True = may attend)
    or additive."""
    if on_host(q, k, mask):
        return _host(q, k, mask, causal, scale, rows, peak)
    b, heads, _, width = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    picks = rows[:, None, :].expand(b, heads, rows.shape[1])
    if peak > 0:
        picks = torch.cat((picks, _likeliest(q, k, causal, peak)), 2)
    n = picks.shape[2]
    sel = q.gather(2, picks[..., None].expand(b, heads, n, width))  # (B, H, n, E)
    # (B, Hk, group·n, E) @ (B, Hk, E, S): each kv head serves its group, k is not copied.
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    compute = k.dtype if k.dtype in (torch.float16, torch.bfloat16) else dtype
    logits = sel.reshape(b, kv_heads, -1, width).to(compute) @ k.to(compute).transpose(-2, -1)
    logits = logits.reshape(b, heads, n, keys).to(dtype) * scale  # (B, H, n, S)
    allowed = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.arange(keys, device=q.device) <= picks[..., None]
    if mask is not None:
        part = mask.gather(2, picks[..., None].expand(b, heads, n, keys))
        logits, allowed = apply_mask(logits, allowed, part, dtype)
    allowed = allowed.expand(b, heads, n, keys)
    r = rows.shape[1]
    result = entropy_and_max(logits[:, :, :r], allowed[:, :, :r])
    if peak > 0:
        top = carried_peak(logits, allowed)
        result[:, 1] = torch.maximum(result[:, 1], top.to(result))
    return result


def carried_peak(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(H,) max |logit| of (b, H, q, S) ``logits`` over the ``allowed`` keys (broadcastable)
    that carry softmax weight: within ``NO_WEIGHT`` of their row's largest allowed logit, in
    a row not wholly masked by a finite fill (``MASKED_ROW``), so a mask written as a finite
    fill (-1e9) is not read as a logit. A NaN stays in (data)."""
    top = logits.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True)  # (b, H, q, 1)
    carried = allowed & ~(logits < top - NO_WEIGHT) & ~(top < -MASKED_ROW)  # NaN stays in
    return logits.abs().masked_fill(~carried, 0).amax((0, 2, 3))


def _likeliest(q: torch.Tensor, k: torch.Tensor, causal: bool, n: int) -> torch.Tensor:
    """(B, H, n) positions of the queries with the largest ‖q_i‖ · max_{j ≤ i} ‖k_j‖."""
    heads, length, keys = q.shape[1], q.shape[2], k.shape[2]
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    key_norm = torch.linalg.vector_norm(k, dim=-1, dtype=dtype)  # (B, Hk, S)
    if causal:  # what query i may see: keys 0..i (SDPA's causal mask is top-left aligned)
        reach = key_norm.cummax(-1).values
        if keys != length:
            reach = reach[..., torch.arange(length, device=q.device).clamp(max=keys - 1)]
    else:
        reach = key_norm.amax(-1, keepdim=True)
    reach = reach.repeat_interleave(heads // k.shape[1], dim=1)
    bound = torch.linalg.vector_norm(q, dim=-1, dtype=dtype) * reach  # (B, H, L)
    return bound.nan_to_num(nan=float("inf")).topk(min(n, length), dim=-1).indices


_EMPTY = {dt: np.zeros((0, 0, 0, 0), dt) for dt in (np.bool_, np.float32, np.float64)}


def _host(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    rows: torch.Tensor,
    peak: int,
) -> torch.Tensor:
    from .kernels.attention_kernels import sample_attention

    qn, q_heads_first = _rows_contiguous(q)
    kn, k_heads_first = _rows_contiguous(k)
    dtype = qn.dtype.type
    allowed, bias = _EMPTY[np.bool_], _EMPTY[dtype]
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask.numpy()
    elif mask is not None:
        bias = mask.numpy()
    out = np.empty((q.shape[1], 2))
    floor = dtype(np.finfo(dtype).min * NEVER)
    sample_attention(
        qn, q_heads_first, kn, k_heads_first, causal, dtype(scale), allowed, bias, floor,
        rows.numpy(), peak, out,
    )  # fmt: skip
    return torch.from_numpy(out)


def _rows_contiguous(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """A (B, H, L, E) tensor as a C-contiguous array: itself (heads first), or the (B, L, H, E)
    projection it is a transposed view of (no copy); else a copy."""
    if t.is_contiguous():
        return t.numpy(), True
    tokens_first = t.transpose(1, 2)
    if tokens_first.is_contiguous():
        return tokens_first.numpy(), False
    return t.contiguous().numpy(), True


def entropy_and_max(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(H, 2) of [mean normalised entropy, max |logit|] from (b, H, q, S) logits.

    ``allowed``: boolean, broadcastable to ``logits``; True where a key may be attended.
    """
    if host_kernels.host_readable([logits]) and logits.dim() == 4:  # one call on CPU
        from .kernels.attention_kernels import entropy_and_max as kernel

        out = np.empty((logits.shape[1], 2))
        kernel(logits.numpy(), allowed.expand_as(logits).contiguous().numpy(), out)
        return torch.from_numpy(out)
    allowed = allowed.expand_as(logits)
    x = logits.float()
    masked = x.masked_fill(~allowed, float("-inf"))
    p = masked.softmax(-1)
    ent = torch.special.entr(p).sum(-1)  # (b, H, q) in nats; 0·log 0 = 0
    top = masked.amax(-1, keepdim=True)  # (b, H, q, 1)
    fill = (x < -MASKED_ROW) & (x < top - NO_WEIGHT)  # a finite fill's keys (attention_masks)
    keys = (allowed & ~fill).sum(-1)  # (b, H, q): the keys the normalisation counts
    norm = ent / torch.log(keys.clamp(min=2).float())
    # Rows with no choice (one key or none) are left out, not NaN; so are rows all fill.
    valid = (keys > 1) & ~(top[..., 0] < -MASKED_ROW)
    mean_ent = torch.where(valid, norm, 0).sum((0, 2)) / valid.sum((0, 2)).clamp(min=1)
    return torch.stack((mean_ent, carried_peak(x, allowed)), 1)


def written_out_peak(logits: torch.Tensor) -> torch.Tensor:
    """(H,) max |logit| over every entry of (B, H, L, S) logits a model wrote out, all
    sequences; masked entries (-inf, or at most half the dtype's most negative value) and
    entries that carry no softmax weight (``carried_peak``: a finite fill) left out, a NaN
    or +inf kept (data). A few sequences at a time: the temporaries stay small."""
    x = logits.detach()
    floor = torch.finfo(x.dtype).min * NEVER
    step = max(1, CHUNK // max(1, x[0].numel()))
    parts = [carried_peak(part, ~(part <= floor)) for part in x.split(step, dim=0)]
    return torch.stack(parts).amax(0).float()
