"""Each parameter's step size in units of its optimizer's stability threshold.

On a quadratic with curvature λ along a direction, an optimizer's iteration is stable while
its effective step times λ stays under a constant (the edge of stability, Cohen et al. 2021,
"Gradient descent on neural networks typically occurs at the edge of stability", ICLR 2021;
Cohen et al. 2022, "Adaptive gradient methods at the edge of stability", arXiv:2207.14484):

    SGD, heavy-ball momentum β (torch's form)   η λ < 2 (1 + β)
    SGD, Nesterov momentum β                    η λ < 2 (1 + β) / (1 + 2 β)
    Adam / AdamW (β1)                           η λ(P⁻¹ H) < (2 + 2 β1) / (1 − β1),
                                                P = (1 − β1^t) diag(√v̂ + ε)   (Cohen 2022)
    RMSprop (momentum β)                        η λ(P⁻¹ H) < 2 (1 + β),  P = diag(√v + ε)

``scales`` returns, per parameter, the diagonal M (same shape as the parameter) with the lr,
the preconditioner and the threshold folded in, so that the stability index

    S = λ_max(M^½ H M^½)

is < 1 exactly when the quadratic model of the next step is stable, whatever the optimizer and
however many param groups with their own lr. Optimizers not listed have no such threshold:
``scales`` says which ones, and the index is not measured for their parameters.

Adaptive optimizers: the preconditioner is the one the *next* step would use on the probe
batch, v' = β2·v + (1 − β2)·g² with g the probe batch's gradient (and t + 1 in the bias
corrections). The stored v alone is ~0 for a coordinate that has not had a gradient yet (an
embedding row of a token not seen so far): √v + ε ~ ε puts a step of lr/ε there in the
quadratic model, while Adam's actual step is ~lr because v adapts within the step. On a
Post-LN encoder-decoder at step 8 this read an index of 856 from the stored v and 0.22 from
v' (the run trains well).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Optimizer class names whose update is Adam's (preconditioned by √v̂ + ε, momentum β1).
ADAM_LIKE = ("Adam", "AdamW")
SUPPORTED = ("SGD", "RMSprop", *ADAM_LIKE)


def supported_kind(opt: torch.optim.Optimizer) -> str | None:
    """The supported optimizer ``opt`` is, or subclasses (a ``ClippedAdam(Adam)`` that clips
    inside ``step`` keeps Adam's update and state): the first class name of its MRO in
    ``SUPPORTED``; None when there is none."""
    return next((c.__name__ for c in type(opt).__mro__ if c.__name__ in SUPPORTED), None)


@dataclass
class Scales:
    params: list[torch.Tensor]
    scales: list[torch.Tensor | float]  # per parameter: its M, a tensor like it or a number
    unsupported: list[str]  # optimizer class names with no stability threshold here
    # An adaptive optimizer before its first step (no √v yet). A parameter that never had
    # a gradient (an unused embedding) has no state either: it does not move, and is left out.
    not_ready: bool = False


def scales(
    optimizers: list[torch.optim.Optimizer], grads: dict[int, torch.Tensor] | None = None
) -> Scales:
    """Per parameter of these optimizers (trainable ones only), its M (module docstring);
    ``grads``: the probe batch's gradient by ``id(param)``, for the adaptive preconditioners."""
    return _walk(optimizers, grads, compute=True)


def participants(optimizers: list[torch.optim.Optimizer]) -> Scales:
    """``scales`` without the M tensors: which parameters an index covers, and whether it can
    be measured yet (no model-sized work)."""
    return _walk(optimizers, None, compute=False)


def _walk(
    optimizers: list[torch.optim.Optimizer],
    grads: dict[int, torch.Tensor] | None,
    compute: bool,
) -> Scales:
    out = Scales([], [], [])
    waiting = False
    for opt in optimizers:
        kind = supported_kind(opt) or type(opt).__name__
        for group in opt.param_groups:
            lr = float(group["lr"])  # a number or a 0-d tensor
            for p in group["params"]:
                # A complex parameter is left out: its Hessian is over the real view's pairs,
                # which the index's real Lanczos vectors do not span.
                if not p.requires_grad or p.is_complex():
                    continue
                if kind not in SUPPORTED:
                    if kind not in out.unsupported:
                        out.unsupported.append(kind)
                    continue
                state = opt.state.get(p, {})
                if not _ready(kind, group, state):
                    waiting = True
                    continue
                out.params.append(p)
                if compute:
                    g = grads.get(id(p)) if grads is not None else None
                    out.scales.append(_scale(kind, group, state, lr, g))
    out.not_ready = waiting and not out.params
    return out


def _average_key(kind: str, group: dict) -> str | None:
    """The state entry an adaptive preconditioner divides by; None for SGD (it needs none)."""
    if kind in ADAM_LIKE:
        return "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    return "square_avg" if kind == "RMSprop" else None


def _ready(kind: str, group: dict, state: dict) -> bool:
    """Whether the parameter has the state its step size needs (Adam keeps none for a
    parameter that never had a gradient)."""
    key = _average_key(kind, group)
    return key is None or (key in state and (kind not in ADAM_LIKE or "step" in state))


def _scale(
    kind: str, group: dict, state: dict, lr: float, g: torch.Tensor | None
) -> torch.Tensor | float:
    """M of one ready parameter of a supported optimizer."""
    if kind == "SGD":
        beta = float(group.get("momentum", 0.0))
        damp = float(group.get("dampening", 0.0)) if beta else 0.0
        if group.get("nesterov"):
            limit = 2 * (1 + beta) / (1 + 2 * beta)
        else:
            # dampening d scales the momentum buffer's input by (1 - d): the step is (1 - d) x.
            limit = 2 * (1 + beta) / (1 - damp) if damp < 1 else float("inf")
        return lr / limit
    v = state[_average_key(kind, group)]
    if kind in ADAM_LIKE:
        t = float(state["step"])
        beta1, beta2 = (float(b) for b in group["betas"])
        v = _next_average(v, g, beta2)
        t += g is not None
        # v̂ = v / (1 − β2^t); the bias-corrected first moment divides by (1 − β1^t).
        denom = (v.float() / (1 - beta2**t)).sqrt_().add_(float(group["eps"]))
        limit = (2 + 2 * beta1) / (1 - beta1)
        return (lr / ((1 - beta1**t) * limit)) / denom
    var = _next_average(v, g, float(group.get("alpha", 0.99)))  # RMSprop
    if group.get("centered") and state.get("grad_avg") is not None:
        var = var - state["grad_avg"].float() ** 2
    beta = float(group.get("momentum", 0.0))
    return (lr / (2 * (1 + beta))) / var.clamp_min(0).sqrt().add(float(group["eps"]))


def _next_average(v: torch.Tensor, g: torch.Tensor | None, beta: float) -> torch.Tensor:
    """β·v + (1 − β)·g², float32: the average the next step divides by (v itself without g)."""
    v = v.float()
    return v if g is None else v * beta + (1 - beta) * g.float().square()


__all__ = ["ADAM_LIKE", "SUPPORTED", "Scales", "participants", "scales", "supported_kind"]
