"""numba kernels behind ``host_params``: the parameter probe's passes over all parameters in one
call, split across threads by chunk rather than by tensor.

A model has many small parameters (biases, norm weights) and a few large ones; one call per
tensor leaves the small ones single-threaded and pays a dispatch each. Here every parameter is
cut into chunks of at most ``CHUNK`` elements, the chunks of all parameters are shared among
the threads, and per-chunk partial sums are added up per parameter at the end. Tensors are
reached through their addresses (``Tensor.data_ptr()``), so one call takes any number of them
without building a typed list.

Imported only when the parameter probe first runs on CPU with numba installed.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from .moment_kernels import _BLOCK, prefetch_block

#: Largest chunk, in elements: 32K float32 (128 KiB) keeps a chunk's weights, gradients and
#: copies within one core's L2 and gives a 1M-element matrix 32 chunks to share out.
CHUNK = 1 << 15

#: Kernel modes. SQUARES: sum of squares of each weight (copying it where a copy address is
#: given) and of each gradient (where one is given). DIFFERENCE: sum of squares of weight minus
#: copy, without writing the difference anywhere. TOTAL: plain sum of each first tensor.
SQUARES, DIFFERENCE, TOTAL = 0, 1, 2


@intrinsic
def _pointer(typingctx, address, like):
    # An int64 address as a typed pointer to ``like``'s dtype, for ``numba.carray``.
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(types.int64, like), codegen


_jit = numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True)


@_jit
def _squares(x, zero):
    s = zero
    for i in range(x.size):
        v = x[i]
        s += v * v
    return s


@_jit
def _copy_squares(x, out, zero):
    # The copy costs a write; the squares come free with the read it needs anyway.
    s = zero
    for i in range(x.size):
        v = x[i]
        out[i] = v
        s += v * v
    return s


@_jit
def _difference_squares(x, y, zero):
    s = zero
    for i in range(x.size):
        d = x[i] - y[i]
        s += d * d
    return s


@_jit
def _total(x, zero):
    s = zero
    for i in range(x.size):
        s += x[i]
    return s


@_jit
def _view(address, fallback, like, size):
    # A 1-d view of ``size`` elements at ``address`` (or at ``fallback`` where it is 0: the
    # view is then never read, but numba wants one array type on both branches).
    return numba.carray(_pointer(address if address != 0 else fallback, like), size)


@_jit
def _chunk(first, second, copies, like, mode, param, lo, hi):
    # Partial sums over elements [lo, hi) of parameter ``param``: (first tensor, second tensor).
    zero = like[0]
    a = _view(first[param], first[param], like, hi)
    b = _view(second[param], first[param], like, hi)
    c = _view(copies[param], first[param], like, hi)
    with_b, with_c = second[param] != 0, copies[param] != 0
    s = 0.0
    t = 0.0
    for start in range(lo, hi, _BLOCK):  # float partials per block, added in float64
        end = min(start + _BLOCK, hi)
        ahead = min(end + _BLOCK, hi)  # the next block's lines, loaded while this one runs
        prefetch_block(a, end, ahead)
        if mode == DIFFERENCE:
            prefetch_block(c, end, ahead)
        elif mode == SQUARES and with_b:
            prefetch_block(b, end, ahead)
        if mode == DIFFERENCE:
            s += _difference_squares(a[start:end], c[start:end], zero)
        elif mode == TOTAL:
            s += _total(a[start:end], zero)
        elif with_c:
            s += _copy_squares(a[start:end], c[start:end], zero)
        else:
            s += _squares(a[start:end], zero)
        if mode == SQUARES and with_b:
            t += _squares(b[start:end], zero)
    return s, t


@_jit
def _add_up(partials, param, out):
    out[:] = 0.0
    for k in range(param.size):
        out[param[k], 0] += partials[k, 0]
        out[param[k], 1] += partials[k, 1]


@_jit
def serial(first, second, copies, like, mode, param, lo, hi, out):
    partials = np.empty((param.size, 2))
    for k in range(param.size):
        partials[k, 0], partials[k, 1] = _chunk(
            first, second, copies, like, mode, param[k], lo[k], hi[k]
        )
    _add_up(partials, param, out)


@numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True, parallel=True)
def parallel(first, second, copies, like, mode, param, lo, hi, out):
    partials = np.empty((param.size, 2))
    for k in numba.prange(param.size):
        partials[k, 0], partials[k, 1] = _chunk(
            first, second, copies, like, mode, param[k], lo[k], hi[k]
        )
    _add_up(partials, param, out)
