"""``stability_index``: how far the next step is from its optimizer's edge of stability.

S = λ_max(M^½ H M^½), H the Hessian of the loss on the probe batch, M each parameter's step
size in units of its optimizer's stability threshold (``stability_scale``): S < 1 means the
quadratic model of the next step is stable; S > 1 that the step overshoots along the sharpest
direction (Cohen et al. 2021 for SGD, Cohen et al. 2022 for Adam's preconditioned sharpness).
The run-level rows (module ``__run__``) are ``stability_index`` and ``stability_lr``, the
largest param-group lr the index was computed with: the forecast scales S by the planned lr
over it.

How: Lanczos on w -> M^½ H M^½ w with Hessian-vector products by double backward (one
``autograd.grad`` of g·v per iteration, the graph of g built once), on the probe batch in eval
mode (``side_forward``: no dropout, RNG and buffers given back), with the recorder's hooks
paused and scaled-dot-product attention on its math kernel (the fused kernels have no double
backward). ``iterations`` Lanczos steps give the top Ritz value of a k x k tridiagonal matrix;
for the top eigenvalue a handful suffices. One host transfer per measurement.

When: at steps 2, 4, 8, 16, ... (powers of two, the step just finished), so a run of N steps
pays log2(N) measurements whether the step is recorded or not; each costs about ``iterations``
x (forward + double backward) of the probe batch. With ``sharpness_budget`` a measurement that
would take the index's time past that fraction of the training time is skipped and counted
(index_budget.py). No weight, gradient or optimizer state is touched.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..record.collector import Rows
from ..record.config import RecorderConfig
from ..record.hooks import paused
from ..record.side_forward import side_forward
from ..wording import first_line
from .base import BaseProbe, ProbeContext, switched
from .index_budget import IndexBudget
from .stability_scale import participants, scales

ITERATIONS = 8
#: Reasons that hold at one step only: the probe tries again at the next due step.
NONFINITE_LOSS = "the loss is not finite"
NOT_STEPPED = "the optimizer has not stepped yet"
NEGATIVE_LR = "a learning rate is negative"
PASSING = (NONFINITE_LOSS, NOT_STEPPED, NEGATIVE_LR)
#: How the note of a run whose budget skipped measurements begins.
BUDGET_NOTE = "stability_index budget: "
#: The first measurement's cost before one is timed, in training steps: ``iterations`` double
#: backwards at ~2.2 steps each and the gradient's graph (docs/benchmarks.md).
STEPS_PER_PRODUCT = 2.5


def due(step: int) -> bool:
    """Steps 2, 4, 8, 16, ...: log2(N) measurements over N steps."""
    return step >= 2 and step & (step - 1) == 0


def scalar_loss(output: Any) -> torch.Tensor | None:
    """The loss in a probe forward's output, as a 0-d tensor: the output itself when it is a
    one-element tensor that requires grad; a mapping's ``loss`` (a dict, transformers'
    ``ModelOutput``) or another object's ``.loss``; the one such tensor among a tuple's or
    list's items (nanoGPT's ``(logits, loss)``). None for anything else, and for a tuple
    holding two candidates: a loss is never guessed, nor taken from a non-scalar."""
    if isinstance(output, Mapping):
        return _scalar(output.get("loss"))
    if isinstance(output, (tuple, list)):
        found = [t for t in map(_scalar, output) if t is not None]
        return found[0] if len(found) == 1 else None
    if isinstance(output, torch.Tensor):
        return _scalar(output)
    return _scalar(getattr(output, "loss", None))


def _scalar(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.requires_grad:
        return value.reshape(())
    return None


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """SDPA on its math kernel: the only one with a double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the math kernel is chosen on CPU anyway
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def hessian_vector_product(
    loss: torch.Tensor, params: list[torch.Tensor]
) -> tuple[Callable[[list[torch.Tensor]], list[torch.Tensor]], list[torch.Tensor | None]]:
    """(v -> H v, the gradient): H the Hessian of ``loss`` in ``params`` (float32 lists shaped
    like them); the gradient detached (None where ``loss`` does not reach a parameter)."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(vs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not live:
            return [torch.zeros_like(v) for v in vs]
        dot = sum((g * vs[i].to(g.dtype)).sum() for g, i in live)
        out = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(v) if o is None else o.float() for o, v in zip(out, vs)]

    return hvp, [None if g is None else g.detach() for g in grads]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def lanczos_top(
    op: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    like: list[torch.Tensor],
    iterations: int = ITERATIONS,
    seed: int = 0,
) -> float:
    """The largest eigenvalue of the symmetric operator ``op`` on tensors shaped like ``like``:
    the top Ritz value after ``iterations`` Lanczos steps (no reorthogonalisation: a lost
    orthogonality repeats converged Ritz values, it does not move the top one). The start
    vector comes from a private generator: the user's random streams are not drawn from."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, generator=gen).to(t.device) for t in like]
    norm = _dot(v, v).sqrt()
    v = [x / norm for x in v]
    prev: list[torch.Tensor] | None = None
    alphas, betas = [], []
    beta = torch.zeros((), device=like[0].device)
    for _ in range(iterations):
        w = op(v)
        alpha = _dot(w, v)
        w = [wi - alpha * vi for wi, vi in zip(w, v)]
        if prev is not None:
            w = [wi - beta * pi for wi, pi in zip(w, prev)]
        beta = _dot(w, w).sqrt()
        alphas.append(alpha)
        betas.append(beta)
        prev, v = v, [wi / beta.clamp_min(1e-30) for wi in w]
    a = torch.stack(alphas).double().cpu().numpy()  # the one host transfer
    b = torch.stack(betas).double().cpu().numpy()
    # An invariant subspace found early (b ~ 0): the Ritz values up to there are exact.
    scale = max(float(np.abs(a).max()), 1e-300)
    stop = next((i + 1 for i, x in enumerate(b[:-1]) if x <= 1e-7 * scale), len(a))
    a, b = a[:stop], b[: stop - 1]
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        return float("nan")
    tri = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
    return float(np.linalg.eigvalsh(tri)[-1])


def stability_index(
    model: nn.Module,
    forward: Callable[[nn.Module], Any],
    optimizers: list[torch.optim.Optimizer],
    iterations: int = ITERATIONS,
    pause: tuple[Any, ...] = (),
) -> tuple[float, float] | str:
    """(S, the largest lr it used), or why it could not be measured."""
    sc = participants(optimizers)
    if sc.unsupported and not sc.params:
        return f"no stability threshold for {', '.join(sc.unsupported)}"
    if sc.not_ready or not sc.params:
        return NOT_STEPPED
    lrs = [float(g["lr"]) for opt in optimizers for g in opt.param_groups]
    if min(lrs) < 0:  # the preconditioner's square root (M = lr ...) has no real value
        return NEGATIVE_LR
    lr = max(lrs)
    with paused(*pause), side_forward(model), _math_attention(), torch.enable_grad():
        loss = scalar_loss(forward(model))
        if loss is None:
            return "the probe forward returns no scalar loss"
        if not torch.isfinite(loss).item():
            return NONFINITE_LOSS
        hvp, grads = hessian_vector_product(loss, sc.params)
        # The adaptive preconditioners as the next step would use them on this batch.
        probe = {id(p): g for p, g in zip(sc.params, grads) if g is not None}
        sc = scales(optimizers, probe)
        roots = [m.sqrt() if isinstance(m, torch.Tensor) else m**0.5 for m in sc.scales]

        def op(w: list[torch.Tensor]) -> list[torch.Tensor]:
            # (P,) per parameter: M^½ H M^½ w
            hw = hvp([r * x for r, x in zip(roots, w)])
            return [r * x for r, x in zip(roots, hw)]

        like = [p.detach().float() for p in sc.params]
        return lanczos_top(op, like, iterations), lr


def _why_not(err: Exception) -> str:
    """What an error of the index's measurement says to the reader: torch's first line, put
    in words where it names a known cause."""
    first = first_line(str(err)) or "(no message)"
    if "derivative for" in first and "not implemented" in first:
        # torch's own words for an op with no second derivative (CTC's loss, some fused
        # kernels): the index needs Hessian-vector products through the loss.
        return (
            "an op of the loss or model has no second derivative in torch, and the index "
            f"needs one ({first})"
        )
    if "DTensor" in first:
        # FSDP2 (fully_shard) holds each parameter as a DTensor shard: the index's
        # Hessian-vector products mix them with whole tensors.
        return (
            "the model's parameters are sharded DTensors (FSDP2's fully_shard), which the "
            f"index does not read ({first})"
        )
    return f"{type(err).__name__}: {first}"


class SharpnessProbe(BaseProbe):
    """Measures ``stability_index`` at the ``due`` steps within its time budget; the first
    reason it cannot is kept in ``note`` and the probe stops trying (a model without double
    backward, a full device)."""

    stage = "due"  # its own steps, recorded or not: the recorder calls ``measure``
    structure_aware = False
    needs_forward = True
    needs_optimizer = True

    @classmethod
    def wanted(cls, config: RecorderConfig, tier: str) -> bool:
        return switched(config.sharpness, config, tier)

    @classmethod
    def build(cls, ctx: ProbeContext) -> SharpnessProbe | None:
        if ctx.forward is None:
            return None
        cfg = ctx.config
        return cls(ctx.model, ctx.forward, ctx.run_code, cfg.sharpness_iters, cfg.sharpness_budget)

    def __init__(
        self,
        model: nn.Module,
        forward: Callable[[nn.Module], Any],
        run_code: int,
        iterations: int = ITERATIONS,
        budget: float | None = None,
    ) -> None:
        self.model, self.forward, self.run_code = model, forward, run_code
        self.iterations = iterations
        unlimited = budget is None or math.isinf(budget)  # inf: no limit, asked for
        self.budget = IndexBudget(
            None if unlimited else budget, first_cost=STEPS_PER_PRODUCT * (iterations + 1)
        )
        self.note: str | None = None
        self.loss_note: str | None = None
        self.last_loss_step: int | None = None  # None: never measured (no optimizer yet)
        # (step, probe_loss) of every reading, for the online loss check, which reads no part
        self.readings: list[tuple[int, float]] = []

    @property
    def measured(self) -> int:
        return self.budget.measured

    @property
    def budget_note(self) -> str | None:
        """The note of a run whose budget skipped measurements (None if it skipped none)."""
        b = self.budget
        if not b.skipped:
            return None
        return (
            f"{BUDGET_NOTE}{b.skipped} scheduled measurement(s) skipped to keep its time "
            f"within {b.fraction:.3g} of the training time (sharpness_budget)"
        )

    def measure(
        self,
        step: int,
        optimizers: list[torch.optim.Optimizer],
        rows: Rows,
        pause: tuple[Any, ...] = (),
        planned: int | None = None,
    ) -> None:
        """At every step boundary (the budget's clock); at a ``due`` step within the budget:
        emit the index as rows of ``step``, and at every ``due`` step the probe batch's loss
        (``probe_loss``). ``pause``: the recorder's hooks, which must not see the probe's
        forward; ``planned``: the run's planned length, when known."""
        self.budget.tick()
        if not due(step) or not optimizers:
            return
        self.measure_loss(step, rows, pause)
        if self.note is not None:
            return
        if not self.budget.allows(planned):
            return
        start = time.perf_counter()
        try:
            found = stability_index(self.model, self.forward, optimizers, self.iterations, pause)
        except Exception as err:  # no double backward, out of memory, a replayed step's error
            # The forward may be the user's code replayed (a training_step, a model call):
            # whatever it raises ends the measurements, never the training.
            self.note = f"stability_index not measured: {_why_not(err)}"
            return
        finally:
            seconds = time.perf_counter() - start
        ok = not isinstance(found, str) and bool(np.isfinite(found[0]))
        self.budget.charge(seconds, measured=ok)
        if isinstance(found, str):
            if found not in PASSING:
                self.note = f"stability_index not measured: {found}"
            return
        if ok:
            value, lr = found
            rows.emit("train", self.run_code, 0, "stability_index", value, step=step)
            rows.emit("train", self.run_code, 0, "stability_lr", lr, step=step)

    def measure_loss(self, step: int, rows: Rows, pause: tuple[Any, ...] = ()) -> None:
        """The probe batch's loss with the weights after ``step`` (``probe_loss``): one
        forward in eval mode on the same batch every time (``side_forward``: no dropout,
        random streams and buffers given back), so it moves only as the model does, never
        with the data. ``loss-divergence`` reads it to tell a model that un-learned from
        batches that got harder (a curriculum, a drifting stream). Once a step; the first
        error ends these measurements, never the training."""
        if self.loss_note is not None or step == self.last_loss_step:
            return  # steps only go forward: the end can be the last due step
        self.last_loss_step = step
        try:
            with paused(*pause), side_forward(self.model), torch.enable_grad():
                loss = scalar_loss(self.forward(self.model))
                value = None if loss is None else float(loss.detach())
        except Exception as err:  # the user's forward replayed: its error ends the probe
            self.loss_note = f"probe_loss not measured: {type(err).__name__}"
            return
        if value is not None and math.isfinite(value):
            rows.emit("train", self.run_code, 0, "probe_loss", value, step=step)
            self.readings.append((step, value))


__all__ = [
    "BUDGET_NOTE",
    "ITERATIONS",
    "SharpnessProbe",
    "due",
    "hessian_vector_product",
    "lanczos_top",
    "scalar_loss",
    "stability_index",
]
