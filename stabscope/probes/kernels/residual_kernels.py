"""numba kernels behind the residual probe on CPU: every statistic of a branch in one read of
its stream ``x`` and its output ``f``.

torch needs five passes for them (per-token norms of ``x`` and ``f``, two sums, one cross dot
product) and, for a Post-LN branch, one more to write ``x = (t − f)/α`` from the norm's input
``t``. Here each token row is read once: its sum, sum of squares and cross term with ``f``
together, ``x`` derived on the fly where the stream is only known as ``t``.

Output per call, float64: ``[Σ_tokens rms(f)/rms(x), Σx, Σf, Σx², Σf², Σx·f]``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .moment_kernels import prefetch_block

#: Statistics per call, see the module docstring.
FIELDS = 6

_jit = numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True, error_model="numpy")


@_jit
def _row(stream, f, inv_alpha, from_sum, zero):
    # One token: (Σx, Σf, Σx², Σf², Σx·f) over its hidden dimension. x is the stream itself,
    # or with ``from_sum`` (t - f)/α: the norm's input t of a Post-LN branch is α·x + f.
    sx = zero
    sf = zero
    qx = zero
    qf = zero
    c = zero
    for j in range(f.size):
        b = f[j]
        a = (stream[j] - b) * inv_alpha if from_sum else stream[j]
        sx += a
        sf += b
        qx += a * a
        qf += b * b
        c += a * b
    return sx, sf, qx, qf, c


@_jit
def _rows(stream, f, inv_alpha, from_sum, width, lo, hi, out):
    # Rows [lo, hi) of the (tokens, width) tensors, flattened; adds into out (FIELDS,).
    # A zero of the tensors' dtype: ``f[0] * 0`` would be float64 (numba promotes float32 times
    # an integer), and the row sums with it, which measured 1.6x slower (converted, half-width
    # vectors). inv_alpha is finite, so this is an exact 0.
    zero = inv_alpha - inv_alpha
    for r in range(lo, hi):
        start, stop = r * width, (r + 1) * width
        prefetch_block(stream, stop, min(stop + width, stream.size))
        prefetch_block(f, stop, min(stop + width, f.size))
        sx, sf, qx, qf, c = _row(stream[start:stop], f[start:stop], inv_alpha, from_sum, zero)
        out[0] += math.sqrt(qf / qx)  # this token's rms(f)/rms(x)
        out[1] += sx
        out[2] += sf
        out[3] += qx
        out[4] += qf
        out[5] += c


@_jit
def serial(stream, f, inv_alpha, from_sum, width, out):
    out[:] = 0.0
    _rows(stream, f, inv_alpha, from_sum, width, 0, f.size // width, out)


@numba.njit(
    fastmath=True, boundscheck=False, nogil=True, cache=True, error_model="numpy", parallel=True
)
def parallel(stream, f, inv_alpha, from_sum, width, parts, out):
    tokens = f.size // width
    share = (tokens + parts - 1) // parts
    partial = np.zeros((parts, FIELDS))
    for p in numba.prange(parts):
        _rows(
            stream,
            f,
            inv_alpha,
            from_sum,
            width,
            p * share,
            min(tokens, (p + 1) * share),
            partial[p],
        )
    out[:] = partial.sum(axis=0)


@_jit
def token_correlation(x, positions, batch, seq_dim):
    """Mean off-diagonal over mean diagonal of the Gram matrix of the sampled tokens, per
    sequence, added over the first ``batch`` sequences. x: (B, T, D), or (T, B, D) with
    ``seq_dim`` 0; positions: (n,) int64 token indices.

    Σ_{i≠j} <x_i, x_j> = ||Σ_i x_i||² − Σ_i ||x_i||², so no (n, n) matrix is formed: one read
    of the n sampled rows, accumulated in float64.
    """
    n = positions.size
    width = x.shape[2]
    total = np.zeros(width)
    diagonal = 0.0
    off = 0.0
    for b in range(batch):
        total[:] = 0.0
        for i in range(n):
            row = x[b, positions[i]] if seq_dim == 1 else x[positions[i], b]
            for d in range(width):
                v = float(row[d])
                total[d] += v
                diagonal += v * v
        for d in range(width):  # np.dot would need scipy's BLAS
            off += total[d] * total[d]
    off -= diagonal
    return (off / max(batch * n * (n - 1), 1)) / (diagonal / (batch * n))
