"""Read a built model into the theory's description (the torch side of ``stabscope predict``).

What is read: the detected blocks (``stabscope.structure``) and their norm placement and α; the
rms of every projection's weight and bias (q, k, v, o in the attention, the two linear maps of
the feed-forward); the activation, norm kind and dropout; and, from one forward pass on the
script's first batch, the T×T second moments of the first block's input and whether attention
is causal, and, from one backward pass of the loss (when ``forward`` returns one), the T×T
second moments of the gradient at the last block's output. A model outside what the theory
composes (no blocks, encoder-decoder, cross-attention, gated or three-matrix feed-forwards, a
fused projection it cannot split) raises ``NotCovered``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..record.module_table import modules_by_name
from ..record.side_forward import side_forward
from ..structure import Structure
from ..theory import ModelDescription, Projection


class NotCovered(Exception):
    """The theory does not cover this model; the message says why."""


def describe(
    model: nn.Module, structure: Structure, forward: Callable[[nn.Module], Any]
) -> ModelDescription:
    """The description of ``model`` as built (its actual init), or ``NotCovered``."""
    blocks = structure.blocks
    if not structure.recognised or not blocks:
        raise NotCovered("no residual blocks were recognised")
    placements = {b.placement for b in blocks}
    if len(placements) != 1 or next(iter(placements)) not in ("pre", "post", "deepnorm"):
        raise NotCovered(f"blocks of mixed or unknown norm placement: {sorted(placements)}")
    if len({b.stack for b in blocks}) != 1:
        raise NotCovered("encoder-decoder stacks are not composed by the theory")
    # The structure's names: a compiled model's modules sit under ``_orig_mod.``, which they
    # leave out.
    modules = modules_by_name(model)
    projections, activation, norm_kind, dropout = [], None, None, 0.0
    for block in blocks:
        kinds = [br.kind for br in block.branches]
        if kinds != ["attention", "mlp"]:
            raise NotCovered(f"{block.name}: branches {kinds}, the theory composes attention + mlp")
        attn, mlp = (modules[br.name] for br in block.branches)
        ffn = _feed_forward(modules[block.name], attn, mlp)
        roles = {**_attention_projections(block.name, attn), **_mlp_projections(block.name, ffn)}
        projections.append(roles)
        activation = activation or _activation(block.name, ffn, modules[block.name])
        norm = modules.get(block.branches[0].norm or "")
        norm_kind = norm_kind or (
            "rmsnorm" if "rms" in type(norm).__name__.lower() else "layernorm"
        )
        dropout = max([dropout, *(m.p for m in modules[block.name].modules() if _is_dropout(m))])
    width = projections[0]["v"].shape_in
    heads = next((a.heads for a in structure.attention if a.heads), None)
    if heads is None or width % heads:
        raise NotCovered("the number of attention heads could not be read")
    first = modules[blocks[0].name]
    second, causal = _first_input(model, first, forward)
    output_grad = _output_gradient(model, modules[blocks[-1].name], forward)
    if output_grad is not None and output_grad.shape != second.shape:
        output_grad = None  # the loss saw other sequences than the first block (a cache)
    return ModelDescription(
        depth=len(blocks),
        width=width,
        heads=heads,
        ffn=projections[0]["fc"].shape_out / width,
        norm=blocks[0].placement,
        seq=second.shape[0],
        causal=causal,
        dropout=float(dropout),
        activation=activation or "gelu",
        norm_kind=norm_kind or "layernorm",
        final_norm=_final_norm(model, [modules[b.name] for b in blocks]),
        alpha=float(np.mean([b.alpha for b in blocks])),
        beta=1.0,  # the measured init already carries any β scaling
        projections=[{r: p.projection for r, p in roles.items()} for roles in projections],
        input_second=second,
        output_grad=output_grad,
        modules=[b.name for b in blocks],
    )


class _Weight:
    """One projection's measured init and shape (out, in)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().double()
        self.shape_out, self.shape_in = w.shape
        b = 0.0 if bias is None else float(bias.detach().double().pow(2).mean().sqrt())
        self.projection = Projection(float(w.pow(2).mean().sqrt()), b)


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _attention_projections(block: str, attn: nn.Module) -> dict[str, _Weight]:
    if isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None:
        w = attn.in_proj_weight
        b = attn.in_proj_bias
        d = w.shape[1]
        parts = [
            _Weight(w[i * d : (i + 1) * d], None if b is None else b[i * d : (i + 1) * d])
            for i in range(3)
        ]
        return dict(zip("qkv", parts), o=_Weight(attn.out_proj.weight, attn.out_proj.bias))
    lins = _linears(attn)
    if len(lins) == 4 and len({m.weight.shape for _, m in lins}) == 1:
        return {r: _Weight(m.weight, m.bias) for r, (_, m) in zip("qkvo", lins)}
    if len(lins) == 2 and lins[0][1].out_features == 3 * lins[0][1].in_features:
        fused, out = lins[0][1], lins[1][1]
        d = fused.in_features
        parts = [
            _Weight(
                fused.weight[i * d : (i + 1) * d],
                None if fused.bias is None else fused.bias[i * d : (i + 1) * d],
            )
            for i in range(3)
        ]
        return dict(zip("qkv", parts), o=_Weight(out.weight, out.bias))
    raise NotCovered(f"{block}: attention projections not recognised: {_layout(lins)}")


def _layout(lins: list[tuple[str, nn.Linear]]) -> str:
    """What the theory saw in an attention module it does not cover, in the user's terms."""
    shapes = ", ".join(f"{n} {m.in_features}->{m.out_features}" for n, m in lins)
    outs = [m.out_features for _, m in lins]
    d = lins[0][1].in_features if lins else 0
    if len(lins) == 4 and outs[0] == d and min(outs[1:3]) < d:
        why = "k and v narrower than q (grouped- or multi-query attention)"
    elif len(lins) == 2 and d < outs[0] < 3 * d:
        why = "a fused projection narrower than q, k and v (multi-query attention)"
    else:
        why = (
            "the theory reads q, k, v and o as four d x d maps, one fused 3d-wide map, "
            "or nn.MultiheadAttention"
        )
    return f"{why}; {len(lins)} linear maps: {shapes}"


def _feed_forward(block: nn.Module, attn: nn.Module, mlp: nn.Module) -> list[nn.Module]:
    """The modules of the block's feed-forward: the MLP branch's module, or, where the branch
    is named by its last projection (torch's ``TransformerEncoderLayer`` runs ``linear1``,
    the activation and ``linear2`` in its own forward, with no module around them), every
    module of the block outside its attention and norms."""
    if len(_linears(mlp)) != 1:
        return list(mlp.modules())
    skip = {id(m) for m in attn.modules()}
    return [
        m
        for m in block.modules()
        if id(m) not in skip and m is not block and "norm" not in type(m).__name__.lower()
    ]


def _mlp_projections(block: str, ffn: list[nn.Module]) -> dict[str, _Weight]:
    lins = [m for m in ffn if isinstance(m, nn.Linear)]
    if len(lins) != 2 or lins[0].out_features != lins[1].in_features:
        raise NotCovered(f"{block}: feed-forward with {len(lins)} linear maps (the theory: 2)")
    return {
        "fc": _Weight(lins[0].weight, lins[0].bias),
        "proj": _Weight(lins[1].weight, lins[1].bias),
    }


def _activation(block: str, ffn: list[nn.Module], module: nn.Module) -> str:
    """GELU or ReLU: a module of the feed-forward, else the block's ``activation`` function
    (torch's transformer layers keep ``F.relu`` / ``F.gelu`` there)."""
    names = [type(m).__name__.lower() for m in ffn]
    function = getattr(module, "activation", None)
    if callable(function) and not isinstance(function, nn.Module):
        names.append(getattr(function, "__name__", "").lower())
    for name in names:
        if "gelu" in name:
            return "gelu"
        if name == "relu":
            return "relu"
    raise NotCovered(f"{block}: feed-forward activation is neither GELU nor ReLU")


def _is_dropout(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0


def _final_norm(model: nn.Module, blocks: list[nn.Module]) -> bool:
    """A norm module outside every block (Pre-LN's final LayerNorm)."""
    inside = {id(m) for b in blocks for m in b.modules()}
    return any(
        "norm" in type(m).__name__.lower() and id(m) not in inside and m is not model
        for m in model.modules()
    )


def _first_input(
    model: nn.Module, first: nn.Module, forward: Callable[[nn.Module], Any]
) -> tuple[np.ndarray, bool]:
    """(T, T) second moments of the first block's input, and whether attention is causal.

    Causality: the forward is run again with the last position of that input perturbed; the
    first position of the first block's output moves only without a mask.
    """
    seen: dict[str, torch.Tensor] = {}

    def grab_input(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        seen["x"] = x.detach()

    def perturb(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not args:
            return None
        x = args[0].clone()
        x[:, -1] += x[:, -1].std() + 1.0  # (B, T, d): move the last token only
        return (x, *args[1:]), kwargs

    def grab_output(_m: nn.Module, _a: tuple, _k: dict, out: Any) -> None:
        y = out[0] if isinstance(out, tuple) else out
        seen.setdefault("y", y.detach())
        seen["y_last"] = y.detach()

    with side_forward(model), torch.no_grad():
        pre = first.register_forward_pre_hook(grab_input, with_kwargs=True)
        post = first.register_forward_hook(grab_output, with_kwargs=True)
        try:
            forward(model)
            moved = first.register_forward_pre_hook(perturb, with_kwargs=True)
            try:
                forward(model)
            finally:
                moved.remove()
        finally:
            pre.remove()
            post.remove()
    x = seen.get("x")
    if x is None or x.dim() != 3:
        raise NotCovered("the first block's input is not a (batch, tokens, width) tensor")
    second = _token_moments(x)
    first_token = (seen["y"][:, 0] - seen["y_last"][:, 0]).abs().max()
    causal = bool(first_token <= 1e-6 * (seen["y"][:, 0].abs().max() + 1e-12))
    if not np.all(np.isfinite(second)) or math.isclose(float(np.trace(second)), 0.0):
        raise NotCovered("the first block's input is not finite and non-zero")
    return second, causal


def _token_moments(x: torch.Tensor) -> np.ndarray:
    """(T, T) per-feature second moments of a (B, T, d) tensor, averaged over the batch."""
    x = x.detach().double()
    return torch.einsum("bid,bjd->ij", x, x).cpu().numpy() / (x.shape[0] * x.shape[2])


def _output_gradient(
    model: nn.Module, last: nn.Module, forward: Callable[[nn.Module], Any]
) -> np.ndarray | None:
    """(T, T) second moments of dL/d(last block's output) on the first batch, or None when
    ``forward`` does not return a differentiable scalar loss (or the gradient is not finite).

    ``autograd.grad`` to that output only: no parameter's ``.grad`` is touched. Eval mode,
    like the input's moments, and the RNG state is restored.
    """
    seen: dict[str, torch.Tensor] = {}

    def grab_output(_m: nn.Module, _a: tuple, out: Any) -> None:
        seen["y"] = out[0] if isinstance(out, tuple) else out

    hook = last.register_forward_hook(grab_output)
    try:
        with side_forward(model), torch.enable_grad():
            loss = forward(model)
            y = seen.get("y")
            if not (
                isinstance(loss, torch.Tensor)
                and loss.numel() == 1
                and loss.requires_grad
                and isinstance(y, torch.Tensor)
                and y.dim() == 3
                and y.requires_grad
            ):
                return None
            (grad,) = torch.autograd.grad(loss, y, allow_unused=True)
    except Exception:  # the measured gradient is a refinement: fall back to the description
        return None
    finally:
        hook.remove()
    if grad is None:
        return None
    moments = _token_moments(grad)
    if not np.all(np.isfinite(moments)) or not np.trace(moments) > 0:
        return None
    return moments


def write_run_prediction(
    model: nn.Module,
    structure: Structure,
    forward: Callable[[nn.Module], Any],
    run_dir: Path,
    rank: int = 0,
) -> str | None:
    """Write ``RUN_DIR/prediction.json`` for the model as built, whose wiring is
    ``structure``; return a note when there is none. Never raises: a model the theory does
    not cover, or any failure, only costs the prediction."""
    from ..store.atomic import write_text_atomically
    from ..theory import PREDICTION_FILE, predict

    if rank != 0:
        return None
    try:
        prediction = predict(describe(model, structure, forward))
        write_text_atomically(Path(run_dir) / PREDICTION_FILE, prediction.to_json())
    except NotCovered as e:
        return f"no theory prediction: {e}"
    except Exception as e:  # the prediction is an extra: it never stops a profile
        return f"no theory prediction: {type(e).__name__}: {e}"
    return None
