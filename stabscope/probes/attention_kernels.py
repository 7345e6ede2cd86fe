"""numba kernel behind ``attention.entropy_and_max`` on CPU.

The sampled logits of one attention call are small, (b, H, q, S) with b·q ≈ 32 rows per head,
so torch's dozen elementwise ops over them (mask, softmax, entr, sums, max) cost their dispatch,
~0.4 ms a layer on CPU, not their arithmetic. One call here does all of it: per row, the max
over the allowed keys, then log Z and the entropy as log Z − Σ p·(l − max).
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(boundscheck=False, nogil=True, cache=True, error_model="numpy")
def entropy_and_max(logits, allowed, out):
    """logits (b, H, q, S) float32/64 and allowed (b, H, q, S) bool, both contiguous;
    out (H, 2) float64 <- [mean normalised entropy over the rows with at least two allowed
    keys, max |logit| over the allowed entries (0 if none)]."""
    b, heads, rows, keys = logits.shape
    for h in range(heads):
        total = 0.0
        counted = 0
        peak = 0.0
        saw_nan = False  # a NaN logit makes both NaN, as torch's softmax and amax do
        for i in range(b):
            for r in range(rows):
                row, ok = logits[i, h, r], allowed[i, h, r]
                top = -np.inf
                n = 0
                for s in range(keys):
                    if ok[s]:
                        v = float(row[s])
                        saw_nan = saw_nan or math.isnan(v)
                        n += 1
                        top = max(top, v)
                        peak = max(peak, abs(v))
                if n < 2:
                    continue  # one key (or none): no choice to measure
                z = 0.0
                weighted = 0.0
                for s in range(keys):
                    if ok[s]:
                        d = float(row[s]) - top
                        e = math.exp(d)
                        if e > 0.0:  # a -inf logit weighs nothing (0·log 0 = 0)
                            z += e
                            weighted += e * d
                total += (math.log(z) - weighted / z) / math.log(n)
                counted += 1
        out[h, 0] = np.nan if saw_nan else total / max(counted, 1)
        out[h, 1] = np.nan if saw_nan else peak
