"""numba kernels behind ``host_moments``: one pass for sum, sum of squares and absmax.

Imported only when a CPU tensor is first reduced (importing numba costs ~0.2-0.5 s). Kernels
are module-level so numba's on-disk cache finds them again in the next process: the first
compile takes ~3 s, a cached load ~0.1 s.
"""

from __future__ import annotations

import numba
import numpy as np

#: Elements per float32/float64 partial sum: short enough that the partial stays exact to
#: ~1e-7 relative, long enough that the vectorised inner loop dominates (1M elements: the
#: result matches a float64 reference to ~1e-8, torch's float32 ``dot`` to ~3e-7).
_BLOCK = 8192


def use_threads(wanted: int) -> int:
    """Set numba's thread count for this thread to ``wanted`` (capped); returns it."""
    parts = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(parts)
    return parts


_jit = numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True)


@_jit
def span(x, bits, mask, zero):
    # One vectorised pass over a short span: float partial sums, integer max of |bits|.
    s = zero
    q = zero
    m = bits[0] & 0  # an integer of the bits' type
    for i in range(x.size):
        v = x[i]
        s += v
        q += v * v
        a = bits[i] & mask
        m = a if a > m else m
    return s, q, m


@_jit
def reduce_range(x, bits, mask, zero, lo, hi):
    s = 0.0
    q = 0.0
    m = bits[0] & 0
    for b in range(lo, hi, _BLOCK):
        e = min(b + _BLOCK, hi)
        bs, bq, bm = span(x[b:e], bits[b:e], mask, zero)
        s += bs
        q += bq
        m = max(m, bm)
    return s, q, m


@_jit
def write(s, q, m, bits, x, out):
    # absmax is the float whose bit pattern is the integer ``m`` (sign bit clear).
    tmp = np.empty(1, bits.dtype)
    tmp[0] = m
    a = tmp.view(x.dtype)[0]
    out[0] = s
    out[1] = q
    out[2] = -a
    out[3] = a


@_jit
def serial(x, bits, mask, zero, out):
    s, q, m = reduce_range(x, bits, mask, zero, 0, x.size)
    write(s, q, m, bits, x, out)


@numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True, parallel=True)
def parallel(x, bits, mask, zero, parts, out):
    n = x.size
    width = (n + parts - 1) // parts
    sums = np.zeros(parts)
    squares = np.zeros(parts)
    peaks = np.zeros(parts, bits.dtype)
    for p in numba.prange(parts):
        sums[p], squares[p], peaks[p] = reduce_range(
            x, bits, mask, zero, p * width, min(n, (p + 1) * width)
        )
    write(sums.sum(), squares.sum(), peaks.max(), bits, x, out)
