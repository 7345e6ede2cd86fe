"""Compose the component rules into Pre-LN, Post-LN and DeepNorm blocks and run a stack.

pre:      x + Attn(LN(x)),          then x + FFN(LN(x))          (+ a final LN on the output)
post:     LN(α·x + Attn(x)),        then LN(α·x + FFN(x))        (α = 1)
deepnorm: post with DeepNet's α, and β-scaled v/o/FFN init (Wang et al. 2022)

Attn = softmax attention with q, k, v, o projections (``attention.Attention``, dropout on
its output); FFN = Linear(d, ffn·d) → GELU/ReLU → Linear(ffn·d, d) → dropout.
The forward pass runs from the first block's input moments; the backward pass starts from the
gradient at the last block's output (measured, or equal at every position with correlation
``grad_corr``), so gradients are relative to that output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attention import Attention
from .components import Activation, Chain, Component, Dropout, Linear, Norm, Residual, Signal
from .description import ModelDescription


@dataclass
class Propagation:
    """Per-block moments at each block output: forward K (T×T) and gradient G (T×T)."""

    forward: list[Signal]
    gradient: list[np.ndarray]


def _norm(desc: ModelDescription) -> Norm:
    return Norm(desc.width, centred=desc.norm_kind == "layernorm")


def _attention(desc: ModelDescription, block: int) -> Component:
    q, k, v, o = (desc.projection(block, r) for r in ("q", "k", "v", "o"))
    attn = Attention(desc.width, q, k, v, o, causal=desc.causal)
    return Chain([attn, Dropout(desc.dropout)]) if desc.dropout else attn


def _ffn(desc: ModelDescription, block: int) -> Component:
    fc, proj = desc.projection(block, "fc"), desc.projection(block, "proj")
    parts: list[Component] = [
        Linear(desc.width, desc.hidden, fc.std, fc.bias),
        Activation(desc.activation),
        Linear(desc.hidden, desc.width, proj.std, proj.bias),
    ]
    if desc.dropout:
        parts.append(Dropout(desc.dropout))
    return Chain(parts)


def build_block(desc: ModelDescription, block: int) -> Component:
    """One attention + FFN block in the description's norm placement."""
    attn, ffn = _attention(desc, block), _ffn(desc, block)
    if desc.norm == "pre":
        return Chain([Residual(Chain([_norm(desc), attn])), Residual(Chain([_norm(desc), ffn]))])
    alpha = desc.residual_alpha
    return Chain([Residual(attn, alpha, 1.0, _norm(desc)), Residual(ffn, alpha, 1.0, _norm(desc))])


def input_signal(desc: ModelDescription) -> Signal:
    if desc.input_second is not None:
        return Signal(np.asarray(desc.input_second, dtype=float), np.zeros(desc.seq))
    return Signal.exchangeable(desc.seq, desc.input_var, desc.input_corr)


def output_gradient(desc: ModelDescription, x: Signal) -> np.ndarray:
    """(T, T) gradient second moments at the last block's output, ``x`` its forward moments.

    Measured on the first batch when the description carries it (it then already includes any
    final norm). Otherwise every position gets the same variance and the pairs ``grad_corr``,
    through the final norm when there is one. The loss gradient of a softmax head is not
    uncorrelated across tokens: it shares the part of the predicted distribution the tokens
    have in common, and the value path of causal attention adds those gradients up at the
    first positions, so even a small correlation sets how fast Post-LN's gradient grows
    toward the input (docs/theory.md).
    """
    if desc.output_grad is not None:
        G = np.asarray(desc.output_grad, dtype=float)
        return G / float(np.mean(np.diag(G)))
    g = Signal.exchangeable(desc.seq, 1.0, desc.grad_corr).K
    if desc.has_final_norm:
        final = _norm(desc)
        final.forward(x)
        g = final.backward(g)
    return g


def propagate(desc: ModelDescription) -> Propagation:
    """Forward moments after every block, then gradient moments at every block output."""
    blocks = [build_block(desc, i) for i in range(desc.depth)]
    x = input_signal(desc)
    forward = []
    for block in blocks:
        x = block.forward(x)
        forward.append(x)
    g = output_gradient(desc, x)
    gradient = []
    for block in reversed(blocks):
        gradient.append(g)
        g = block.backward(g)
    return Propagation(forward, gradient[::-1])
