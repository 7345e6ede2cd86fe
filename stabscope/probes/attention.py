"""Attention entropy and max attention logit, per attention module and head.

Metrics (module = the attention module, ``index`` = head):

- ``attn_entropy``: entropy of each query's attention distribution divided by log of the
  number of keys it may attend to (causal, boolean, float and padding masks respected, and
  a mask written as a finite fill: ``kernels.attention_masks``); the
  statistic is its mean over the sampled queries, an estimate of the mean over every query of
  the batch: 1 is uniform attention, 0 a single key (Zhai et al. 2023: entropy collapse goes
  with instability);
- ``attn_logit_max``: max |q·k|·scale over the allowed keys that carry softmax weight
  (``kernels.attention_masks``: a finite mask fill such as -1e9 is not a logit) of the
  sampled queries and, in
  every sequence, of the ``peak`` queries likeliest to hold the maximum (``attention_sample``);
  over every logit where the model wrote them out. A lower bound of the batch's maximum
  (Wortsman et al. 2023: runs whose attention logits passed ~1e4 diverged).

SDPA never materialises the probabilities, so they are recomputed for a sample: ``batch ×
queries`` query rows spread over every sequence of the batch at staggered positions
(``attention_sample``; queries that can see a single key carry no entropy and are left out),
all heads. How far both statistics
are from the full computation: ``bench/attention_sampling.py``. Calls are intercepted only
inside the attention modules of a recorded training step (how: ``attention_routes``):
``F.scaled_dot_product_attention`` (is_causal, boolean and float masks, GQA),
``F.multi_head_attention_forward`` (``nn.MultiheadAttention``; q and k are recomputed from its
projection weights), and softmax over the last dimension of a 4-D tensor (explicit attention,
HF eager), or of a 3-D (B·H, T, S) one in a module whose head count the structure read
(``torch.bmm`` attention: HF's XGLM, older BART/OPT/Whisper). The model's own computation
is never changed. With dropout, the probabilities are those before dropout.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..record.collector import Collector, Rows
from ..record.hooks import ListenerHooks
from ..structure.attention_calls import MHA, SDPA, softmax_over_folded_keys, softmax_over_keys
from .attention_routes import AttentionRoutes
from .attention_sample import (
    entropy_and_max,
    entropy_rows,
    float_mask_allowed,
    query_positions,
    sample_sdpa,
    written_out_peak,
)
from .base import BaseProbe, ProbeContext


@dataclass(frozen=True)
class AttentionSampling:
    """How much of each attention call is recomputed (``attention_sample``): the entropy reads
    ``batch × queries`` query rows, spread over every sequence of the batch and over
    positions; the max logit also reads ``peak`` queries per sequence and head."""

    batch: int = 2
    queries: int = 16
    peak: int = 4

    @property
    def rows(self) -> int:
        return self.batch * self.queries


_MHA_SIGNATURE = inspect.signature(MHA)


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
    if q.dim() == 3:  # unbatched (H, L, E)
        q, k = q.unsqueeze(0), k.unsqueeze(0)
        attn_mask = (
            attn_mask.unsqueeze(0) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        )
    heads, length, source = q.shape[1], q.shape[2], k.shape[2]
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = None
    if attn_mask is not None:  # (B, H, L, S) view, zero strides where broadcast
        # detach: an additive mask can be learned (T5's relative position bias).
        mask = attn_mask.detach().expand(q.shape[0], heads, length, source)
    rows = entropy_rows(q.shape[0], length, sampling.rows, q.device)
    return sample_sdpa(q, k, mask, is_causal, s, rows, sampling.peak)


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
    # q and k of the first ``batch`` sequences only (recomputing them costs projections):
    # both statistics come from those.
    return sdpa_sample(q, k, mask, causal, None, sampling)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.detach()
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


class AttentionProbe(BaseProbe):
    """Samples every attention call inside each attention module's training forward."""

    @classmethod
    def build(cls, ctx: ProbeContext) -> AttentionProbe | None:
        """On the structure's attention modules; ``attn_queries = 0`` turns it off."""
        sampling = AttentionSampling(ctx.config.attn_batch, ctx.config.attn_queries)
        if not ctx.structure.recognised or sampling.queries <= 0 or sampling.batch <= 0:
            return None
        attention = {a.name: ctx.modules[a.name] for a in ctx.structure.attention}
        heads = {a.name: a.heads for a in ctx.structure.attention if a.heads}
        return cls(attention, ctx.codes, ctx.listeners, sampling, heads)

    #: Set to False between steps to stop sampling (and intercepting) until set back; the
    #: overhead bench measures the probe's share of a step this way, on one model.
    enabled = True

    def __init__(
        self,
        modules: dict[str, nn.Module],
        codes: dict[str, int],
        listeners: ListenerHooks,
        sampling: AttentionSampling | None = None,
        heads: dict[str, int] | None = None,
    ) -> None:
        self.sampling = sampling or AttentionSampling()
        self.codes = codes
        # module code -> its head count, where the structure read one: a softmax of
        # (B·H, T, S) logits in that module is attention with the heads folded into dim 0.
        self._heads = {codes[name]: h for name, h in (heads or {}).items()}
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
        heads = self._heads.get(code) if code is not None else None
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
        elif softmax_over_keys(func, args, kwargs, out):
            result = self._from_softmax(args[0])
        elif heads and softmax_over_folded_keys(func, args, kwargs, out, heads):
            logits = args[0]  # (B·H, T, S), sequence-major: row b·H + h is head h of b
            result = self._from_softmax(logits.reshape(-1, heads, *logits.shape[1:]))
        if result is None or code is None:
            return False
        call = self._calls.get(code, 0)
        self._calls[code] = call + 1
        self._results.append((code, call, result))
        return True

    def _from_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Explicit attention: the softmax input holds the (masked) logits; the entropy reads
        the same rows as for SDPA, the max all of them."""
        b, length = logits.shape[0], logits.shape[2]
        rows = entropy_rows(b, length, self.sampling.rows, logits.device)  # (B, r)
        seq = torch.arange(b, device=logits.device)[:, None]
        sample = logits.detach()[seq, :, rows].permute(0, 2, 1, 3).float().contiguous()
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


__all__ = [
    "AttentionProbe",
    "AttentionSampling",
    "entropy_and_max",
    "mha_sample",
    "query_positions",
    "sdpa_sample",
]
