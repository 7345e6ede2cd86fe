"""Attention entropy and max attention logit, per attention module and head.

Metrics (module = the attention module, ``index`` = head):

- ``attn_entropy``: entropy of each query's attention distribution divided by log of the
  number of keys it may attend to (causal, boolean, float and padding masks respected),
  averaged over the sampled queries: 1 is uniform attention, 0 a single key (Zhai et al. 2023:
  entropy collapse goes with instability);
- ``attn_logit_max``: max |q·k|·scale over the sampled queries and allowed keys (Wortsman et
  al. 2023: runs whose attention logits passed ~1e4 diverged).

SDPA never materialises the probabilities, so they are recomputed for a sample: the first
``batch`` sequences, ``queries`` query positions evenly spaced over the sequence (queries that
can see a single key carry no entropy and are left out), all heads. Calls are intercepted only
inside the attention modules of a recorded training step (how: ``attention_routes``):
``F.scaled_dot_product_attention`` (is_causal, boolean and float masks, GQA),
``F.multi_head_attention_forward`` (``nn.MultiheadAttention``; q and k are recomputed from its
projection weights), and softmax over the last dimension of a 4-D tensor (explicit attention,
HF eager). The model's own computation is never changed. With dropout, the probabilities are
those before dropout.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..collector import Collector, Rows
from ..hooks import ListenerHooks
from . import host_kernels
from .attention_peak import (
    NEVER,
    apply_mask,
    candidate_peak,
    float_mask_allowed,
    written_out_peak,
)
from .attention_routes import MHA, SDPA, AttentionRoutes


@dataclass(frozen=True)
class AttentionSampling:
    """How much of each attention call is recomputed: the entropy's rows cost batch × queries;
    the max logit also reads ``peak`` queries per sequence and head of every sequence
    (``attention_peak``)."""

    batch: int = 2
    queries: int = 16
    peak: int = 4


_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
_MHA_SIGNATURE = inspect.signature(MHA)


@functools.lru_cache(maxsize=64)
def _sample_layout(
    length: int, source: int, n: int, causal: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled query positions and the (1, 1, q, S) mask of keys they may see; cached because
    every layer of every recorded step asks for the same ones."""
    qi = query_positions(length, n, device)
    allowed = torch.ones(1, 1, len(qi), source, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (torch.arange(source, device=device) <= qi[:, None])
    return qi, allowed


def query_positions(length: int, n: int, device: torch.device) -> torch.Tensor:
    """``n`` query indices evenly spaced over [1, length-1] (query 0 sees one causal key)."""
    if length <= 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.unique(
        torch.linspace(1, length - 1, min(n, length - 1), device=device).round().long()
    )


def entropy_and_max(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(H, 2) of [mean normalised entropy, max |logit|] from (b, H, q, S) logits.

    ``allowed``: boolean, broadcastable to ``logits``; True where a key may be attended.
    """
    if host_kernels.host_readable([logits]) and logits.dim() == 4:  # one call on CPU
        from .attention_kernels import entropy_and_max as kernel

        out = np.empty((logits.shape[1], 2))
        kernel(logits.numpy(), allowed.expand_as(logits).contiguous().numpy(), out)
        return torch.from_numpy(out)
    allowed = allowed.expand_as(logits)
    masked = logits.float().masked_fill(~allowed, float("-inf"))
    p = masked.softmax(-1)
    ent = torch.special.entr(p).sum(-1)  # (b, H, q) in nats; 0·log 0 = 0
    keys = allowed.sum(-1)  # (b, H, q)
    norm = ent / torch.log(keys.clamp(min=2).float())
    valid = keys > 1  # rows with no choice (one key or none) are left out, not NaN
    mean_ent = torch.where(valid, norm, 0).sum((0, 2)) / valid.sum((0, 2)).clamp(min=1)
    peak = logits.float().abs().masked_fill(~allowed, 0).amax((0, 2, 3))
    return torch.stack((mean_ent, peak), 1)


def sdpa_sample(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    sampling: AttentionSampling,
) -> torch.Tensor:
    """Entropy and max logit of an SDPA call: q (B, H, L, E), k (B, Hk, S, E)."""
    q, k = q.detach(), k.detach()
    b = min(sampling.batch, q.shape[0]) if q.dim() == 4 else 1
    if q.dim() == 3:  # unbatched (H, L, E)
        q, k = q.unsqueeze(0), k.unsqueeze(0)
        attn_mask = (
            attn_mask.unsqueeze(0) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        )
    heads, length, source = q.shape[1], q.shape[2], k.shape[2]
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    full = None
    if attn_mask is not None:  # (B, H, L, S) view, zero strides where broadcast
        # detach: an additive mask can be learned (T5's relative position bias).
        full = attn_mask.detach().expand(q.shape[0], heads, length, source)
    on_host = _sampled_on_host(q, k, full)
    result = _entropy_sample(q, k, None if full is None else full[:b], is_causal, s, b, sampling)
    if sampling.peak > 0:  # the max also over the likeliest queries of every sequence
        peak = candidate_peak(q, k, full, is_causal, s, sampling.peak, on_host)
        result[:, 1] = torch.maximum(result[:, 1], peak.to(result))
    return result


def _entropy_sample(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    s: float,
    b: int,
    sampling: AttentionSampling,
) -> torch.Tensor:
    """(H, 2) [mean entropy, max |logit|] over the sampled rows: the first ``b`` sequences
    (``mask`` is already theirs) at evenly spaced queries."""
    heads, length, source = q.shape[1], q.shape[2], k.shape[2]
    if _sampled_on_host(q, k, mask):
        return _host_sample(q[:b], k[:b], mask, is_causal, s, sampling.queries)
    qi, allowed = _sample_layout(length, source, sampling.queries, is_causal, q.device)
    kk = k[:b]
    if kk.shape[1] != heads:  # grouped-query attention: each kv head serves heads/Hk queries
        kk = kk.repeat_interleave(heads // kk.shape[1], dim=1)
    logits = (q[:b, :, qi].float() @ kk.float().transpose(-2, -1)) * s  # (b, H, q, S)
    if mask is not None:
        logits, allowed = apply_mask(logits, allowed, mask[:, :, qi], torch.float32)
    return entropy_and_max(logits, allowed)


def _sampled_on_host(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernel can read q, k and the mask in place (any strides)."""
    tensors = (q, k) if mask is None else (q, k, mask)
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" for t in tensors):
        return False
    if q.dtype not in host_kernels.HOST_DTYPES or k.dtype != q.dtype:
        return False
    if mask is not None and mask.dtype not in (torch.bool, q.dtype):
        return False
    return host_kernels.ready()


@functools.lru_cache(maxsize=64)
def _host_rows(length: int, n: int) -> np.ndarray:
    return query_positions(length, n, torch.device("cpu")).numpy()


_NO_MASK = {dt: np.zeros((0, 0, 0, 0), dt) for dt in (np.bool_, np.float32, np.float64)}


def _host_sample(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    queries: int,
) -> torch.Tensor:
    """One kernel call: q (b, H, L, E), k (b, Hk, S, E), mask (b, H, L, S) or None."""
    from .attention_kernels import sampled_entropy_and_max

    qn = q.numpy()
    dtype = qn.dtype.type
    allowed, bias = _NO_MASK[np.bool_], _NO_MASK[dtype]
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask.numpy()
    elif mask is not None:
        bias = mask.numpy()
    out = np.empty((q.shape[1], 2))
    floor = dtype(np.finfo(dtype).min * NEVER)  # "never attend", as in float_mask_allowed
    rows = _host_rows(q.shape[2], queries)
    sampled_entropy_and_max(qn, k.numpy(), rows, causal, dtype(scale), allowed, bias, floor, out)
    return torch.from_numpy(out)


def mha_sample(bound: dict[str, Any], sampling: AttentionSampling) -> torch.Tensor | None:
    """Recompute q, k of ``F.multi_head_attention_forward`` (inputs (L, B, E)) and sample."""
    if (
        bound.get("bias_k") is not None
        or bound.get("add_zero_attn")
        or bound.get("static_k") is not None
    ):
        return None
    query, key, heads = bound["query"], bound["key"], bound["num_heads"]
    if query.dim() == 2:  # unbatched (L, E)
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    embed = query.shape[-1]
    if bound.get("use_separate_proj_weight"):
        wq, wk = bound["q_proj_weight"], bound["k_proj_weight"]
    else:
        wq, wk = bound["in_proj_weight"][:embed], bound["in_proj_weight"][embed : 2 * embed]
    bias = bound.get("in_proj_bias")
    bq, bk = (bias[:embed], bias[embed : 2 * embed]) if bias is not None else (None, None)
    b = min(sampling.batch, query.shape[1])
    q = F.linear(query[:, :b].detach(), wq.detach(), None if bq is None else bq.detach())
    k = F.linear(key[:, :b].detach(), wk.detach(), None if bk is None else bk.detach())
    # (L, b, E) -> (b, H, L, E/H)
    q = q.reshape(q.shape[0], b, heads, -1).permute(1, 2, 0, 3)
    k = k.reshape(k.shape[0], b, heads, -1).permute(1, 2, 0, 3)
    # nn.MultiheadAttention's boolean masks mark what is *not* attended (the opposite of
    # SDPA's); both become additive float masks of shape (b, H or 1, L or 1, S).
    mask = _additive(bound.get("attn_mask"), q.dtype)
    if mask is not None and mask.dim() == 3:  # (B*H, L, S)
        mask = mask[: b * heads].reshape(b, heads, *mask.shape[-2:])
    pad = _additive(bound.get("key_padding_mask"), q.dtype)
    if pad is not None:
        pad = pad[:b].reshape(b, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    causal = bool(bound.get("is_causal")) and mask is None
    # q and k of the sampled sequences only: the max's extra queries come from them too.
    return sdpa_sample(q, k, mask, causal, None, AttentionSampling(b, *astuple(sampling)[1:]))


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.detach()
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


class AttentionProbe:
    """Samples every attention call inside each attention module's training forward."""

    #: Set to False between steps to stop sampling (and intercepting) until set back; the
    #: overhead bench measures the probe's share of a step this way, on one model.
    enabled = True

    def __init__(
        self,
        modules: dict[str, nn.Module],
        codes: dict[str, int],
        listeners: ListenerHooks,
        sampling: AttentionSampling | None = None,
    ) -> None:
        self.sampling = sampling or AttentionSampling()
        self.codes = codes
        self.routes = AttentionRoutes(self._sample)
        self._calls: dict[int, int] = {}
        self._results: list[tuple[int, int, torch.Tensor]] = []  # (module code, call, (H, 2))
        for name, module in modules.items():
            code = codes[name]
            # innermost: a user's own hooks on the module (an attention-map visualiser that
            # calls softmax) run outside the interception, not as extra calls.
            listeners.add(
                module, pre=self._pre_hook(code), post=self._post_hook(code), innermost=True
            )

    def _pre_hook(self, code: int) -> Any:
        def enter(module: nn.Module, args: Any, kwargs: Any) -> None:
            if self.enabled:
                self.routes.enter(code)

        return enter

    def _post_hook(self, code: int) -> Any:
        def exit_(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self.enabled:
                self.routes.exit(code)

        return exit_

    @property
    def errors(self) -> dict[str, int]:
        return self.routes.errors

    def _sample(self, func: Any, args: Any, kwargs: Any, out: Any, patched: bool) -> bool:
        code = self.routes.active_code
        result = None
        if func is SDPA:
            bound = dict(
                zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args)
            )
            bound.update(kwargs)
            result = sdpa_sample(
                bound["query"],
                bound["key"],
                bound.get("attn_mask"),
                bool(bound.get("is_causal", False)),
                bound.get("scale"),
                self.sampling,
            )
        elif func is MHA:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            result = mha_sample(dict(bound.arguments), self.sampling)
        elif func in _SOFTMAX and isinstance(out, torch.Tensor) and out.dim() == 4:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, 3):
                result = self._from_softmax(args[0])
        if result is None or code is None:
            return False
        call = self._calls.get(code, 0)
        self._calls[code] = call + 1
        self._results.append((code, call, result))
        return True

    def _from_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Explicit attention: the softmax input holds the (masked) logits; the max is read
        over all of them."""
        b = min(self.sampling.batch, logits.shape[0])
        qi = query_positions(logits.shape[2], self.sampling.queries, logits.device)
        sample = logits.detach()[:b, :, qi].float()
        allowed = float_mask_allowed(sample)
        result = entropy_and_max(sample.masked_fill(~allowed, 0), allowed)
        if self.sampling.peak > 0:
            result[:, 1] = written_out_peak(logits).to(result)
        return result

    def end_step(self, collector: Collector) -> None:
        self.routes.reset()
        self._calls.clear()
        if not self._results:
            return
        results, self._results = self._results, []
        heads = [r.shape[0] for _, _, r in results]
        stacked = torch.cat([r for _, _, r in results])  # (sum of heads, 2)

        def decode(values: np.ndarray, rows: Rows) -> None:
            v = values.reshape(-1, 2)
            start = 0
            for (code, call, _), h in zip(results, heads):
                part = v[start : start + h]
                rows.emit("train", code, call, "attn_entropy", part[:, 0], index=np.arange(h))
                rows.emit("train", code, call, "attn_logit_max", part[:, 1], index=np.arange(h))
                start += h

        collector.add(stacked, decode)
