"""numba kernels behind ``host_params``: the parameter probe's passes over all parameters in one
call, each tensor split across the threads.

A model has many small parameters (biases, norm weights) and a few large ones; one call per
tensor pays a dispatch each and leaves the small ones single-threaded. Here one call takes them
all: each thread reads its share of every tensor, the share torch's own elementwise ops give
that thread, and per-thread partial sums are added up per parameter at the end. Tensors are
reached through their addresses (``Tensor.data_ptr()``), so one call takes any number of them
without building a typed list.

Imported only when the parameter probe first runs on CPU with numba installed.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from .moment_kernels import BLOCK, prefetch_block

#: torch's grain size for elementwise ops (at::internal::GRAIN_SIZE): tensors up to this
#: many elements are one thread's work, larger ones are split evenly across the threads.
GRAIN = 32768

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
def _squares(x, out, copy, zero):
    # With ``copy`` x is also written to out: the copy costs a write, the squares come free
    # with the read it needs anyway.
    s = zero
    for i in range(x.size):
        v = x[i]
        if copy:
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
    if lo >= hi:
        return 0.0, 0.0
    a = _view(first[param], first[param], like, hi)
    b = _view(second[param], first[param], like, hi)
    c = _view(copies[param], first[param], like, hi)
    with_b, with_c = second[param] != 0, copies[param] != 0
    s = 0.0
    t = 0.0
    for start in range(lo, hi, BLOCK):  # float partials per block, added in float64
        end = min(start + BLOCK, hi)
        ahead = min(end + BLOCK, hi)  # the next block's lines, loaded while this one runs
        prefetch_block(a, end, ahead)
        if mode == DIFFERENCE:
            prefetch_block(c, end, ahead)
        elif mode == SQUARES and with_b:
            prefetch_block(b, end, ahead)
        if mode == DIFFERENCE:
            s += _difference_squares(a[start:end], c[start:end], zero)
        elif mode == TOTAL:
            s += _total(a[start:end], zero)
        else:
            s += _squares(a[start:end], c[start:end], with_c, zero)
        if mode == SQUARES and with_b:
            t += _squares(b[start:end], b[start:end], False, zero)
    return s, t


@_jit
def _share(size, part, parts):
    # Elements [lo, hi) of a tensor of ``size`` that part ``part`` of ``parts`` reads: the
    # split torch's elementwise ops use (at::parallel_for, grain GRAIN). The work is balanced
    # by elements, and a thread tends to read the part of a weight or gradient that the same
    # split of the optimizer step or of backward last wrote.
    used = max(1, min(parts, (size + GRAIN - 1) // GRAIN))
    if part >= used:
        return 0, 0
    width = (size + used - 1) // used
    return part * width, min(size, (part + 1) * width)


@_jit
def _pass(first, second, copies, like, mode, sizes, part, parts, partials):
    # Every tensor's share for this part; partials (P, 2) of this part.
    for i in range(sizes.size):
        lo, hi = _share(sizes[i], part, parts)
        partials[i, 0], partials[i, 1] = _chunk(first, second, copies, like, mode, i, lo, hi)


@_jit
def serial(first, second, copies, like, mode, sizes, out):
    _pass(first, second, copies, like, mode, sizes, 0, 1, out)


@numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True, parallel=True)
def parallel(first, second, copies, like, mode, sizes, parts, out):
    partials = np.zeros((parts, sizes.size, 2))
    for part in numba.prange(parts):
        _pass(first, second, copies, like, mode, sizes, part, parts, partials[part])
    out[:] = partials.sum(axis=0)
