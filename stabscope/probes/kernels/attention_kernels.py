"""numba kernels behind the attention probe's sample on CPU.

The recomputed logits of one attention call are small, a few rows per sequence and head, so
torch's dozen elementwise ops over them (mask, softmax, entr, sums, max) cost their dispatch,
not their arithmetic. One call here does all of it: per row, the max over the allowed keys,
then log Z and the entropy as log Z − Σ p·(l − max).

``sample_attention`` also forms the logits itself from q and k where the model left them (the
projection's (B, L, H, E) layout, whose rows are contiguous vectors, or (B, H, L, E)), under
a causal mask only over the keys a query may see, and reads each sequence's keys and queries
once: for the entropy's rows of that sequence and for the max's likeliest queries (their
norms). The exponentials are libm calls (no SVML in pip's llvmlite); a vectorisable
polynomial saved only ~15 µs a layer.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .attention_masks import MASKED_ROW, NO_WEIGHT

#: Lets LLVM reorder the dot products' sums so that they vectorise; NaN and inf keep their
#: meaning (no ``nnan``/``ninf``): a NaN logit still shows as NaN.
_REORDER_SUMS = {"reassoc", "contract"}


_jit = numba.njit(boundscheck=False, nogil=True, cache=True, error_model="numpy")
_fast = numba.njit(
    boundscheck=False, nogil=True, cache=True, error_model="numpy", fastmath=_REORDER_SUMS
)


@_jit
def _carried_peak(kept, m, top, peak):
    # max(peak, |l|) over the logits kept[:m] that carry softmax weight (within NO_WEIGHT of
    # the row's largest, ``top``: attention_masks.NO_WEIGHT), none of a row wholly masked
    # by a finite fill (MASKED_ROW); a NaN is not below anything, so it stays in (the
    # callers flag it).
    for j in range(m):
        v = kept[j]
        if not v < top - NO_WEIGHT and not top < -MASKED_ROW:
            peak = max(peak, abs(float(v)))
    return peak


@_jit
def _add_row(kept, m, typed, acc):
    # One query's logits over its m allowed keys, kept[:m], into the head's running
    # acc = [Σ normalised entropy, rows counted, max |logit|, any NaN, ...]. The entropy is
    # log Z − Σ p·(l − max), over the log of the keys that are not a finite fill's
    # (attention_masks); rows with fewer than two such keys, or all fill, carry none.
    top = typed[1]
    saw_nan = False
    for j in range(m):
        v = kept[j]
        saw_nan = saw_nan or math.isnan(v)  # NaN makes both results NaN, as in torch
        top = v if v > top else top
    acc[2] = _carried_peak(kept, m, top, acc[2])
    if saw_nan:
        acc[3] = 1.0
    if m < 2 or top < -MASKED_ROW:  # a row all fill holds no attention of the model's
        return
    z = 0.0
    weighted = 0.0
    own = 0  # the keys the normalisation counts: not a finite fill's (attention_masks)
    for j in range(m):
        v = kept[j]
        d = v - top
        weight = math.exp(d)
        z += weight
        weighted += weight * d
        if not (v < -MASKED_ROW and d < -NO_WEIGHT):
            own += 1
    if own < 2:
        return
    acc[0] += (math.log(z) - weighted / z) / math.log(own)
    acc[1] += 1.0


@_jit
def _write_head(acc, out, h):
    # out[h] <- [mean normalised entropy, max |logit|], both NaN if a logit was; acc reset.
    out[h, 0] = np.nan if acc[3] else acc[0] / max(acc[1], 1.0)
    out[h, 1] = np.nan if acc[3] or acc[4] else acc[2]
    acc[:] = 0.0


@_jit
def entropy_and_max(logits, allowed, out):
    """logits (b, H, q, S) float32/64 and allowed (b, H, q, S) bool, both contiguous;
    out (H, 2) float64 <- [mean normalised entropy over the rows with at least two allowed
    keys, max |logit| over the allowed entries (0 if none)]."""
    b, heads, rows, keys = logits.shape
    typed = np.array([0.0, -np.inf], logits.dtype)
    kept = np.empty(keys, logits.dtype)  # one row's allowed logits
    acc = np.zeros(5)
    for h in range(heads):
        for i in range(b):
            for r in range(rows):
                m = 0
                for s in range(keys):
                    if allowed[i, h, r, s]:
                        kept[m] = logits[i, h, r, s]
                        m += 1
                _add_row(kept, m, typed, acc)
        _write_head(acc, out, h)


@_jit
def _add_peak(kept, m, typed, acc):
    # The max |logit| of one of the likeliest queries' rows into acc; a NaN there makes the
    # max NaN (acc[4]), not the entropy, whose rows it is not.
    top = typed[1]
    saw_nan = False
    for j in range(m):
        v = kept[j]
        saw_nan = saw_nan or math.isnan(v)
        top = v if v > top else top
    acc[2] = _carried_peak(kept, m, top, acc[2])
    if saw_nan:
        acc[4] = 1.0


@_fast
def _row_logits(qr, k, i, g, k_heads_first, p, keys, causal, scale, allowed, bias, floor, h, kept):
    # Query row qr's logits scale·q·k + bias over the keys it may attend, into kept; how many.
    has_allowed = allowed.shape[0] > 0
    has_bias = bias.shape[0] > 0
    zero = kept.dtype.type(0)
    m = 0
    for s in range(min(p + 1, keys) if causal else keys):
        if has_allowed and not allowed[i, h, p, s]:
            continue
        add = bias[i, h, p, s] if has_bias else zero
        if has_bias and not (floor < add < np.inf):
            continue
        kr = k[i, g, s] if k_heads_first else k[i, s, g]
        dot = zero
        for e in range(qr.shape[0]):
            dot += qr[e] * kr[e]
        kept[m] = dot * scale + add
        m += 1
    return m


@_fast
def sample_attention(
    q, q_heads_first, k, k_heads_first, causal, scale, allowed, bias, floor, rows, peak, out
):
    """out (H, 2) float64 <- [mean normalised entropy over the entropy rows, max |logit| over
    those and the ``peak`` likeliest queries of every sequence], NaN where a logit is.

    q and k C-contiguous, (b, H, L, E) and (b, Hk, S, E) if ``*_heads_first`` else
    (b, L, H, E) and (b, S, Hk, E) (a projection's own layout before the transpose): every
    query and key is then a contiguous vector and the dot products vectorise. Head h reads kv
    head h // (H / Hk) (grouped-query attention). rows (b, r) int64: the query positions of
    each sequence the entropy reads. causal: key s is allowed for query p only if s ≤ p.
    allowed (b, H, L, S) bool and bias (b, H, L, S) of q's dtype, any strides, or empty for
    "no mask"/"no bias": a key is allowed where ``allowed`` is True and its bias lies in
    (floor, inf). The likeliest queries of a sequence and head are those with the largest
    ‖q_p‖ · max_{s ≤ p} ‖k_s‖ (max over all keys without a causal mask): a bound on their
    |q·k|. Keys and queries are read once per sequence.
    """
    b, width = q.shape[0], q.shape[3]
    heads, length = (q.shape[1], q.shape[2]) if q_heads_first else (q.shape[2], q.shape[1])
    kv_heads, keys = (k.shape[1], k.shape[2]) if k_heads_first else (k.shape[2], k.shape[1])
    group = heads // kv_heads
    zero = q.dtype.type(0)
    typed = np.array([0.0, -np.inf], q.dtype)
    kept = np.empty(keys, q.dtype)  # one row's allowed logits
    reach = np.empty(length)  # per query: the largest key norm it may see
    best_u = np.empty(max(peak, 1))
    best_p = np.empty(max(peak, 1), np.int64)
    # Per head: Σ entropy, rows, max |logit|, a NaN in an entropy row (both results NaN),
    # a NaN in a likeliest query's row (the max NaN).
    acc = np.zeros((heads, 5))
    for i in range(b):
        for g in range(kv_heads):
            if peak > 0:
                top = 0.0
                for s in range(keys):
                    kr = k[i, g, s] if k_heads_first else k[i, s, g]
                    sq = zero
                    for e in range(width):
                        sq += kr[e] * kr[e]
                    top = max(top, math.sqrt(float(sq)))
                    if causal and s < length:
                        reach[s] = top
                if not causal:
                    reach[:] = top
                elif keys < length:
                    reach[keys:] = top
            for h in range(g * group, (g + 1) * group):
                for j in range(rows.shape[1]):
                    p = rows[i, j]
                    qr = q[i, h, p] if q_heads_first else q[i, p, h]
                    m = _row_logits(
                        qr, k, i, g, k_heads_first, p, keys, causal, scale, allowed, bias,
                        floor, h, kept,
                    )  # fmt: skip
                    _add_row(kept, m, typed, acc[h])
                if peak == 0:
                    continue
                best_u[:] = -1.0
                low = 0  # the slot of the smallest bound kept
                for p in range(length):
                    qr = q[i, h, p] if q_heads_first else q[i, p, h]
                    sq = zero
                    for e in range(width):
                        sq += qr[e] * qr[e]
                    u = math.sqrt(float(sq)) * reach[p]
                    if math.isnan(u):
                        u = np.inf  # a NaN query is picked: its logits show the NaN
                    if u > best_u[low]:
                        best_u[low] = u
                        best_p[low] = p
                        for r in range(peak):
                            if best_u[r] < best_u[low]:
                                low = r
                for r in range(peak):
                    if best_u[r] >= 0:
                        p = best_p[r]
                        qr = q[i, h, p] if q_heads_first else q[i, p, h]
                        m = _row_logits(
                            qr, k, i, g, k_heads_first, p, keys, causal, scale, allowed, bias,
                            floor, h, kept,
                        )  # fmt: skip
                        _add_peak(kept, m, typed, acc[h])
    for h in range(heads):
        _write_head(acc[h], out, h)
