"""Residual adds whose added term is no module's output: x + h(w), h elementwise.

``detect`` claims an add t = α·x + f where f *is* a module's output. Many blocks add a
function of it instead: an activation applied inline (a message-passing layer's
``h + gelu(W·m)``), or a gate or scale (adaLN-Zero's ``x + g·attn(h)`` with g per sample
and channel, LayerScale's per-channel γ, ReZero's scalar α), or dropout applied by function
(``x + F.dropout(attn(h), p, self.training)``, as HF's BART, OPT and Whisper layers write
it; the structure of a training script is learned from a training step, where it drops).
Here t = x + h(w) is checked for w a module's output and h either an activation from a
short list, or a product with a gate fitted by least squares over the dims it is shared
along (every element, each channel, or each channel of one sample), or inverted dropout
(``_dropped_out``), to the precision t is stored in. A gate at 0 (adaLN-Zero and ReZero
start there) leaves t equal to x in value but not in storage: a view of x (the same
storage) is never a sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

#: The activations tried for h(w) = act(w).
ACTIVATIONS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    F.gelu,
    partial(F.gelu, approximate="tanh"),
    F.relu,
    F.silu,
    torch.tanh,
    torch.sigmoid,
)
#: A gate fitted per channel must be shared by at least this many rows: with fewer, a
#: per-channel least-squares fit matches almost anything.
MIN_SHARED = 8
#: The rows of the first, strided check.
SAMPLE_ROWS = 64
#: The rows read at most (of one sample, or of a (rows, channels) tensor): bounds the cost
#: of the check on a large stream.
MAX_ROWS = 4096
#: Inverted dropout's scale 1/(1 - p) for the drop rates looked for: p from 1% to 95%.
DROPOUT_SCALES = (1 / 0.99, 20.0)
#: How far the share of dropped elements may stray from p beyond 5 binomial standard
#: errors: a kept element whose s·w is below half a unit in the last place of x (bfloat16
#: keeps 8 bits) adds nothing to t either, and reads as dropped.
DROPPED_SHARE_SLACK = 0.02


def reshaped_alike(t: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether ``others`` hold as many elements as ``t`` and share its last (feature) dim:
    one shape up to a reshape that keeps the features (HF's OPT adds its FFN on the stream
    flattened to (batch·tokens, d), then views the sum back)."""
    return all(v.numel() == t.numel() and v.shape[-1] == t.shape[-1] for v in others)


def transformed_branch(t: torch.Tensor, x: torch.Tensor, w: torch.Tensor, tol: float) -> bool:
    """Whether t = x + h(w), h an activation, a gate or dropout (module docstring), to
    ``tol`` of |t|. The three must have one shape, up to a reshape that keeps the feature
    dimension (``reshaped_alike``); t must not share x's storage. Checked first on a
    strided sample of ``SAMPLE_ROWS`` rows (most candidates fail there, cheaply), then on
    up to ``MAX_ROWS``. Never raises: a tensor that cannot be read so (a subclass without
    a plain storage) is no transformed branch, and detection goes on."""
    if t is x or t is w or t.dim() < 2 or not reshaped_alike(t, x, w):
        return False
    try:
        if t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            return False  # a view or the stream itself: nothing was added
        x, w = (v if v.shape == t.shape else v.reshape(t.shape) for v in (x, w))
        # (rows, channels) of one sample: a gate per sample and channel is one per channel.
        rows = [_rows(v) for v in (t, x, w)]  # (rows, channels) each, in their dtype
        stride = max(1, rows[0].shape[0] // SAMPLE_ROWS)
        sample = (r[::stride].double() for r in rows)
        return _fits(*sample, tol) and _fits(*(r.double() for r in rows), tol)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


#: The most elements ``rearranged_branch`` sorts (two float64 sorts of the sum's size).
MAX_SORTED = 1 << 22


def rearranged_branch(t: torch.Tensor, x: torch.Tensor, w: torch.Tensor, tol: float) -> bool:
    """Whether t = x + r(w), r a rearrangement of w's elements that no module makes: window
    attention's output, computed per window, (B·windows, tokens, C), and reversed onto the
    (B, H, W, C) stream by a view and a permute before the add. The sorted values of t - x
    equal w's, to ``tol`` of |t|. Never raises."""
    if t is x or t is w or t.numel() != w.numel() or t.numel() != x.numel():
        return False
    if t.numel() > MAX_SORTED or t.dim() < 2:
        return False
    try:
        if t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            return False
        tt, xx, ww = (v.detach().reshape(-1).double() for v in (t, x, w))
        scale = float(tt.norm())
        f = tt - xx
        if scale == 0 or abs(float(f.norm()) - float(ww.norm())) >= tol * scale:
            return False  # norms differ: no rearrangement (cheap, before sorting)
        return float((f.sort().values - ww.sort().values).norm()) < tol * scale
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _fits(tt: torch.Tensor, xx: torch.Tensor, ww: torch.Tensor, tol: float) -> bool:
    """t = x + h(w) on (rows, channels) float64 tensors (``transformed_branch``)."""
    scale = float(tt.norm())
    if scale == 0 or not bool(torch.isfinite(tt).all()):
        return False
    f = tt - xx
    if any(float((f - act(ww)).norm()) < tol * scale for act in ACTIVATIONS):
        return True
    shared = [(0, 1)] + ([(0,)] if tt.shape[0] >= MIN_SHARED else [])  # every element; a channel
    for dims in shared:
        den = (ww * ww).sum(dims, keepdim=True)
        gate = (f * ww).sum(dims, keepdim=True) / den.clamp_min(1e-300)  # least squares
        if float((f - gate * ww).norm()) < tol * scale:
            return True
    return _dropped_out(f, ww, tol * scale)


def _dropped_out(f: torch.Tensor, ww: torch.Tensor, bound: float) -> bool:
    """f = m ⊙ s·w, inverted dropout: m a 0/1 mask that keeps each element with probability
    1 - p, s = 1/(1 - p). A dropped element adds exactly 0 (t equals x there, f is 0); the
    kept ones share one scale s, fitted by least squares, within ``bound`` in norm; and the
    share of zeros is p = 1 - 1/s, to a binomial spread. A mask without that scale, or a
    scale without its share of zeros, is no dropout."""
    kept = f != 0
    n, k = f.numel(), int(kept.sum())
    if k == 0 or k == n:
        return False
    fk, wk = f[kept], ww[kept]
    s = float((fk * wk).sum() / (wk * wk).sum().clamp_min(1e-300))
    if not DROPOUT_SCALES[0] <= s <= DROPOUT_SCALES[1] or float((fk - s * wk).norm()) >= bound:
        return False
    p = 1 - 1 / s
    return abs((n - k) / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + DROPPED_SHARE_SLACK


def _rows(v: torch.Tensor) -> torch.Tensor:
    """``v`` as (rows, channels): its first sample where it has 3 dims or more, at most
    ``MAX_ROWS`` rows, in its own dtype (converted once sampled)."""
    v = v.detach()
    if v.dim() >= 3:
        v = v[0]
    return v.reshape(-1, v.shape[-1])[:MAX_ROWS]


__all__ = [
    "ACTIVATIONS",
    "DROPOUT_SCALES",
    "MAX_ROWS",
    "MAX_SORTED",
    "MIN_SHARED",
    "SAMPLE_ROWS",
    "rearranged_branch",
    "reshaped_alike",
    "transformed_branch",
]
