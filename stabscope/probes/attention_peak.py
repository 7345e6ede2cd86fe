"""The max attention logit beyond the entropy's sample.

The entropy is a mean over queries: a sample of a few sequences and evenly spaced queries
estimates it well. The max logit is an extreme: on trained models the sampled rows (2
sequences × 16 queries) missed the batch's true maximum by a median 20-27% (up to 50%), and
even every query of the two sampled sequences by 8-14%, because the maximum usually lies in
another sequence (``bench/attention_sampling.py``, docs/benchmarks.md). Computing every logit
again costs a second q·kᵀ of the whole batch.

So the max also looks, in *every* sequence and head, at the few queries most likely to hold it:
those with the largest ‖q_i‖ · max_{j ≤ i} ‖k_j‖, a bound on their |q_i·k_j| (Cauchy-Schwarz;
without a causal mask max over all keys). That costs one read of q and k (their norms) and a
few rows of logits per sequence. It is still a lower bound of the true maximum (every value it
takes is an actual logit); its error is measured in docs/benchmarks.md. Where the model wrote
the logits out (explicit softmax), their maximum is read whole.
"""

from __future__ import annotations

import numpy as np
import torch

#: Logits at or below this fraction of the dtype's most negative value mean "never attend".
NEVER = 0.5


def float_mask_allowed(mask: torch.Tensor) -> torch.Tensor:
    """Where an additive mask (or logits written out with one) lets a key be attended: -inf or
    the dtype's most negative value (HF) mean "never"."""
    return torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min * NEVER)


def apply_mask(
    logits: torch.Tensor, allowed: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` and ``allowed`` (same shape) under ``mask``: boolean (True = may attend)
    narrows ``allowed``; additive narrows it where the mask means "never" and adds the rest to
    the logits (in ``dtype``)."""
    if mask.dtype == torch.bool:
        return logits, allowed & mask
    ok = float_mask_allowed(mask)
    return logits + mask.to(dtype).masked_fill(~ok, 0), allowed & ok


def candidate_peak(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    per_sequence: int,
    on_host: bool,
) -> torch.Tensor:
    """(H,) max |logit| over the ``per_sequence`` likeliest queries of every sequence and head.

    q (B, H, L, E), k (B, Hk, S, E) (grouped-query attention: head h reads kv head
    h // (H/Hk)); mask None or a (B, H, L, S) view (zero strides where broadcast), boolean
    (True = may attend) or additive; ``causal``: query i sees keys j ≤ i. ``on_host``: the
    numba kernel reads the tensors in place (CPU, float32/64)."""
    if on_host:
        return _host_peak(q, k, mask, causal, scale, per_sequence)
    b, heads, length, width = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32  # what sums run in
    key_norm = torch.linalg.vector_norm(k, dim=-1, dtype=dtype)  # (B, Hk, S)
    if causal:  # what query i may see: keys 0..i (SDPA's causal mask is top-left aligned)
        seen = torch.arange(length, device=q.device).clamp(max=keys - 1)
        reach = key_norm.cummax(-1).values[..., seen]  # (B, Hk, L)
    else:
        reach = key_norm.amax(-1, keepdim=True)  # (B, Hk, 1)
    reach = reach.repeat_interleave(group, dim=1)
    bound = torch.linalg.vector_norm(q, dim=-1, dtype=dtype) * reach  # (B, H, L)
    picks = bound.nan_to_num(nan=float("inf")).topk(min(per_sequence, length), dim=-1).indices
    n = picks.shape[-1]
    rows = q.gather(2, picks[..., None].expand(b, heads, n, width))  # (B, H, n, E)
    # (B, Hk, group·n, E) @ (B, Hk, E, S): each kv head's keys serve its group, no copy of k.
    compute = k.dtype if k.dtype in (torch.float16, torch.bfloat16) else dtype
    logits = rows.reshape(b, kv_heads, group * n, width).to(compute) @ k.to(compute).transpose(
        -2, -1
    )
    logits = logits.reshape(b, heads, n, keys).to(dtype) * scale  # (B, H, n, S)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if causal:
        allowed = torch.arange(keys, device=q.device) <= picks[..., None]
    if mask is not None:
        sampled = mask.gather(2, picks[..., None].expand(b, heads, n, keys))
        logits, allowed = apply_mask(logits, allowed, sampled, dtype)
    return logits.abs().masked_fill(~allowed, 0).amax((0, 2, 3))


def _host_peak(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    per_sequence: int,
) -> torch.Tensor:
    from .attention_kernels import peak_candidates

    qn, q_heads_first = _rows_contiguous(q)
    kn, k_heads_first = _rows_contiguous(k)
    dtype = qn.dtype.type
    allowed = np.zeros((0, 0, 0, 0), np.bool_)
    bias = np.zeros((0, 0, 0, 0), dtype)
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask.numpy()
    elif mask is not None:
        bias = mask.numpy()
    out = np.empty(q.shape[1])
    floor = dtype(np.finfo(dtype).min * NEVER)
    peak_candidates(
        qn, q_heads_first, kn, k_heads_first, causal, dtype(scale), allowed, bias, floor,
        per_sequence, out,
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


#: Elements of a model's written-out logits handled at once (a temporary of this many).
CHUNK = 1 << 24


def written_out_peak(logits: torch.Tensor) -> torch.Tensor:
    """(H,) max |logit| over every entry of (B, H, L, S) logits a model wrote out, all
    sequences; masked entries (-inf, or at most half the dtype's most negative value) left
    out, a NaN or +inf kept (data). A few sequences at a time: the temporaries stay small."""
    x = logits.detach()
    floor = torch.finfo(x.dtype).min * NEVER
    step = max(1, CHUNK // max(1, x[0].numel()))
    parts = [
        part.masked_fill(part <= floor, 0).abs_().amax((0, 2, 3)) for part in x.split(step, dim=0)
    ]
    return torch.stack(parts).amax(0).float()
