"""numba kernels behind the attention probe's sample on CPU.

The sampled logits of one attention call are small, (b, H, q, S) with b·q ≈ 32 rows per head,
so torch's dozen elementwise ops over them (mask, softmax, entr, sums, max) cost their dispatch,
~0.4 ms a layer on CPU, not their arithmetic. One call here does all of it: per row, the max
over the allowed keys, then log Z and the entropy as log Z − Σ p·(l − max).

``sampled_entropy_and_max`` also forms the logits itself from q and k, in whatever strides the
model left them (q is usually a transposed view of a projection's output), and under a causal
mask computes only the keys a query may see: about half of them. On the sample GPT's layer
(b=2, 4 heads, 16 queries, 128 keys, head width 64; ``python bench/moments.py``, "probe call"
table): the whole sample 198 µs on torch's path, 85 µs with this kernel (~70 µs of it the
kernel). The exponentials are libm calls (no SVML in pip's llvmlite); a vectorisable
polynomial saved only ~15 µs a layer.
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: Lets LLVM reorder the dot products' sums so that they vectorise; NaN and inf keep their
#: meaning (no ``nnan``/``ninf``): a NaN logit still shows as NaN.
_REORDER_SUMS = {"reassoc", "contract"}


_jit = numba.njit(boundscheck=False, nogil=True, cache=True, error_model="numpy")


@_jit
def _add_row(kept, m, typed, acc):
    # One query's logits over its m allowed keys, kept[:m], into the head's running
    # acc = [Σ normalised entropy, rows counted, max |logit|, any NaN]. The entropy is
    # log Z − Σ p·(l − max), over log m; rows with fewer than two keys carry none.
    top = typed[1]
    peak = acc[2]  # locals in the loop: acc may alias kept as far as LLVM knows
    saw_nan = False
    for j in range(m):
        v = kept[j]
        saw_nan = saw_nan or math.isnan(v)  # NaN makes both results NaN, as in torch
        top = v if v > top else top
        peak = max(peak, abs(float(v)))
    acc[2] = peak
    if saw_nan:
        acc[3] = 1.0
    if m < 2:
        return
    z = 0.0
    weighted = 0.0
    for j in range(m):
        d = kept[j] - top
        weight = math.exp(d)
        z += weight
        weighted += weight * d
    acc[0] += (math.log(z) - weighted / z) / math.log(m)
    acc[1] += 1.0


@_jit
def _write_head(acc, out, h):
    # out[h] <- [mean normalised entropy, max |logit|], both NaN if a logit was; acc reset.
    out[h, 0] = np.nan if acc[3] else acc[0] / max(acc[1], 1.0)
    out[h, 1] = np.nan if acc[3] else acc[2]
    acc[:] = 0.0


@_jit
def entropy_and_max(logits, allowed, out):
    """logits (b, H, q, S) float32/64 and allowed (b, H, q, S) bool, both contiguous;
    out (H, 2) float64 <- [mean normalised entropy over the rows with at least two allowed
    keys, max |logit| over the allowed entries (0 if none)]."""
    b, heads, rows, keys = logits.shape
    typed = np.array([0.0, -np.inf], logits.dtype)
    kept = np.empty(keys, logits.dtype)  # one row's allowed logits
    acc = np.zeros(4)
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


@numba.njit(boundscheck=False, nogil=True, cache=True, error_model="numpy", fastmath=_REORDER_SUMS)
def sampled_entropy_and_max(q, k, rows, causal, scale, allowed, bias, floor, out):
    """What ``entropy_and_max`` gives for the logits ``scale·q·kᵀ + bias`` of the sampled
    query positions, without forming them in torch.

    q (b, H, L, E) and k (b, Hk, S, E), any strides, one float dtype; head h reads kv head
    h // (H / Hk) (grouped-query attention). rows (n,) int64: the sampled query positions,
    ascending. causal: key s is allowed for query p only if s ≤ p. allowed (b, H, L, S) bool
    and bias (b, H, L, S) of q's dtype, any strides (zero for broadcast dimensions), or empty
    arrays for "no mask" and "no bias": a key is allowed where ``allowed`` is True and its bias
    lies in (floor, inf). out (H, 2) float64.
    """
    b, heads, _, width = q.shape
    group = heads // k.shape[1]
    keys = k.shape[2]
    n = rows.shape[0]
    span = 0 if n == 0 else min(keys, rows[n - 1] + 1) if causal else keys  # keys seen
    has_allowed = allowed.shape[0] > 0
    has_bias = bias.shape[0] > 0
    typed = np.array([0.0, -np.inf], q.dtype)  # 0 and -inf in q's dtype: sums stay in it
    kbuf = np.empty((span, width), q.dtype)  # one (batch, kv head)'s keys, contiguous
    qrow = np.empty(width, q.dtype)
    kept = np.empty(span, q.dtype)  # one query's logits over its allowed keys
    acc = np.zeros(4)
    for h in range(heads):
        for i in range(b):
            kh = k[i, h // group]
            for s in range(span):
                for e in range(width):
                    kbuf[s, e] = kh[s, e]
            for r in range(n):
                p = rows[r]
                last = min(p + 1, keys) if causal else keys
                for e in range(width):
                    qrow[e] = q[i, h, p, e] * scale
                m = 0
                for s in range(last):
                    add = bias[i, h, p, s] if has_bias else typed[0]
                    if has_allowed and not allowed[i, h, p, s]:
                        continue
                    if has_bias and not (floor < add < np.inf):
                        continue
                    dot = typed[0]
                    for e in range(width):
                        dot += qrow[e] * kbuf[s, e]
                    kept[m] = dot + add
                    m += 1
                _add_row(kept, m, typed, acc)
        _write_head(acc, out, h)


@numba.njit(boundscheck=False, nogil=True, cache=True, error_model="numpy", fastmath=_REORDER_SUMS)
def peak_candidates(
    q, q_heads_first, k, k_heads_first, causal, scale, allowed, bias, floor, n, out
):
    """out (H,) float64 <- max |logit| over, in every sequence and head, the ``n`` queries with
    the largest ‖q_p‖ · max_{s allowed} ‖k_s‖ (a bound on their |q·k|, so the likeliest to
    hold the maximum); NaN if one of those logits is.

    q and k C-contiguous, (b, H, L, E) and (b, Hk, S, E) if ``*_heads_first`` else
    (b, L, H, E) and (b, S, Hk, E) (the projections' own layout, before the transpose):
    every row is then a contiguous vector, and the norms and dot products vectorise. Masks
    as in ``sampled_entropy_and_max``, over (b, H, L, S). The ranking ignores the masks (it
    only picks rows); the logits respect them. Cost per sequence and kv head: one read of its
    keys and queries, and ``n`` rows of logits.
    """
    b, width = q.shape[0], q.shape[3]
    heads, length = (q.shape[1], q.shape[2]) if q_heads_first else (q.shape[2], q.shape[1])
    kv_heads, keys = (k.shape[1], k.shape[2]) if k_heads_first else (k.shape[2], k.shape[1])
    group = heads // kv_heads
    has_allowed = allowed.shape[0] > 0
    has_bias = bias.shape[0] > 0
    zero = q.dtype.type(0)
    reach = np.empty(length)  # per query: the largest key norm it may see
    best_u = np.empty(n)
    best_p = np.empty(n, np.int64)
    peak = np.zeros(heads)
    nan = np.zeros(heads, np.bool_)
    for i in range(b):
        for g in range(kv_heads):
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
                best_u[:] = -1.0
                low = 0  # the slot of the smallest kept bound
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
                        for r in range(n):
                            if best_u[r] < best_u[low]:
                                low = r
                for r in range(n):
                    if best_u[r] < 0:
                        continue
                    p = best_p[r]
                    qr = q[i, h, p] if q_heads_first else q[i, p, h]
                    for s in range(min(p + 1, keys) if causal else keys):
                        add = bias[i, h, p, s] if has_bias else zero
                        if has_allowed and not allowed[i, h, p, s]:
                            continue
                        if has_bias and not (floor < add < np.inf):
                            continue
                        kr = k[i, g, s] if k_heads_first else k[i, s, g]
                        dot = zero
                        for e in range(width):
                            dot += qr[e] * kr[e]
                        v = dot * scale + add
                        nan[h] = nan[h] or math.isnan(v)
                        peak[h] = max(peak[h], abs(float(v)))
    for h in range(heads):
        out[h] = np.nan if nan[h] else peak[h]
