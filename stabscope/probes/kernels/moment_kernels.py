"""numba kernels behind ``host_moments``: one pass for sum, sum of squares and absmax.

Imported only when a CPU tensor is first reduced (importing numba costs ~0.2-0.5 s). Kernels
are module-level so numba's on-disk cache finds them again in the next process: the first
compile takes ~3 s, a cached load ~0.1 s.

Two details decide the speed on tensors that come from memory, which is where a training
step's tensors come from (``python bench/moments.py``, "from memory" column):

- The integer max stays in int32 (``np.maximum``/``np.bitwise_and`` keep numpy's types; the
  ``&``/``>`` operators promote to int64, which halved the vector width of the whole loop).
- torch's CPU allocator does not ask for huge pages, so a tensor spans 4 KiB pages and the
  hardware prefetcher stops at every page boundary. Each block issues software prefetches for
  the next block's cache lines before reducing its own: one thread streams 13.5 GB/s instead
  of 7.6 from such memory.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

#: Elements per float32/float64 partial sum, and per prefetch step: 1024 float32 are one
#: 4 KiB page. The partials are added in float64 (1M elements: the result matches a float64
#: reference to ~1e-8, torch's float32 ``dot`` to ~3e-7).
BLOCK = 1024

#: Elements per 64-byte cache line at float32 (one prefetch each; float64 lines are touched
#: twice, which costs little).
_LINE = 16


@intrinsic
def prefetch(typingctx, array, index):
    """Hint the CPU to load the cache line holding ``array[index]`` (read, keep in cache)."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        hint = ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, hint, "llvm.prefetch.p0i8")
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_pointer)
        # (address, read=0, locality=3: keep in all cache levels, data cache=1)
        builder.call(function, [address, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, types.intp), codegen


def use_threads(wanted: int) -> int:
    """Set numba's thread count for this thread to ``wanted`` (capped); returns it."""
    parts = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(parts)
    return parts


_jit = numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True)


@_jit
def span(x, bits, mask, zero):
    # One vectorised pass over a short span: float partial sums, int32 max of |bits|.
    s = zero
    q = zero
    m = np.bitwise_and(bits[0], mask)
    for i in range(x.size):
        v = x[i]
        s += v
        q += v * v
        m = np.maximum(m, np.bitwise_and(bits[i], mask))
    return s, q, m


@_jit
def prefetch_block(x, start, stop):
    for i in range(start, stop, _LINE):
        prefetch(x, i)


@_jit
def reduce_range(x, bits, mask, zero, lo, hi):
    s = 0.0
    q = 0.0
    m = np.bitwise_and(bits[0], mask)  # x[0] belongs to the tensor: a neutral start
    for b in range(lo, hi, BLOCK):
        e = min(b + BLOCK, hi)
        prefetch_block(x, e, min(e + BLOCK, hi))
        bs, bq, bm = span(x[b:e], bits[b:e], mask, zero)
        s += bs
        q += bq
        m = np.maximum(m, bm)
    return s, q, m


@numba.njit(boundscheck=False, nogil=True, cache=True)
def absmax(m, bits, x):
    # The float whose bit pattern is the integer ``m`` (sign bit clear): NaN where a NaN was
    # seen. No fastmath: this value carries the NaN/Inf the statistics report.
    tmp = np.empty(1, bits.dtype)
    tmp[0] = m
    return tmp.view(x.dtype)[0]


@_jit
def write(s, q, m, bits, x, out):
    a = absmax(m, bits, x)
    out[0] = s
    out[1] = q
    out[2] = -a
    out[3] = a


@_jit
def serial(x, bits, mask, zero, out):
    s, q, m = reduce_range(x, bits, mask, zero, 0, x.size)
    write(s, q, m, bits, x, out)


@numba.njit(fastmath=True, boundscheck=False, nogil=True, cache=True, parallel=True)
def reduce_parts(x, bits, mask, zero, parts):
    # ``reduce_range`` over ``parts`` contiguous slices, one thread each; their sums added,
    # their integer maxima combined.
    n = x.size
    width = (n + parts - 1) // parts
    sums = np.zeros(parts)
    squares = np.zeros(parts)
    peaks = np.zeros(parts, bits.dtype)
    for p in numba.prange(parts):
        sums[p], squares[p], peaks[p] = reduce_range(
            x, bits, mask, zero, p * width, min(n, (p + 1) * width)
        )
    return sums.sum(), squares.sum(), peaks.max()


@_jit
def parallel(x, bits, mask, zero, parts, out):
    s, q, m = reduce_parts(x, bits, mask, zero, parts)
    write(s, q, m, bits, x, out)


# The flight ring's cell: ``[sum, sumsq, min, max, numel]`` (float32). These three are compiled
# without fastmath: the cell's NaN and Inf are the data it reports, and fastmath lets LLVM
# assume there are none (an inlined ``isfinite`` folds to true). The reduction they call keeps
# its own fastmath (its vectorised loop).
_exact = numba.njit(boundscheck=False, nogil=True, cache=True)


@_exact
def combine(s, q, m, bits, x, n, cell):
    a = np.float64(absmax(m, bits, x))
    lo, hi = -a, a
    if cell[4] != 0:
        s += cell[0]
        q += cell[1]
        old_lo, old_hi = np.float64(cell[2]), np.float64(cell[3])
        # NaN wins, as np.minimum/np.maximum: a NaN seen by either call stays seen.
        lo = np.nan if lo != lo or old_lo != old_lo else min(lo, old_lo)
        hi = np.nan if hi != hi or old_hi != old_hi else max(hi, old_hi)
    cell[0] = s  # a sum of squares past float32's range is stored as inf: data
    cell[1] = q
    cell[2] = lo
    cell[3] = hi
    cell[4] += n
    return np.isfinite(cell[2]) and np.isfinite(cell[3])


@_exact
def serial_into(x, bits, mask, zero, cell):
    s, q, m = reduce_range(x, bits, mask, zero, 0, x.size)
    return combine(s, q, m, bits, x, x.size, cell)


@_exact
def parallel_into(x, bits, mask, zero, parts, cell):
    s, q, m = reduce_parts(x, bits, mask, zero, parts)
    return combine(s, q, m, bits, x, x.size, cell)
