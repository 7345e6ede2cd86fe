"""Parameter statistics: weight and gradient norms, and the update ratio ||Δθ||/||θ||.

Norms are taken with ``torch._foreach_norm`` (one fused call per list, on device). The update
is measured around ``optimizer.step()``: the pre-step hook keeps a copy of the parameters the
optimizer owns (one extra copy of those weights, on recorded steps only), the post-step hook
takes the norm of the difference. ``update_ratio`` = ||θ_after − θ_before|| / ||θ_before||, the
update relative to the weight it changes (the update-to-weight ratio of CS231n's ~1e-3 rule of
thumb, the inverse of LARS/LAMB's trust ratio); where ||θ_before|| = 0 it is undefined and not
recorded (LAMB likewise drops its ratio for a zero weight norm): a zero-initialised parameter
has ``update_norm`` at its first step, ``update_ratio`` from its second on. A stand-in
max(||θ||, eps) would make every zero-initialised matrix (LoRA's B) an "update too large"
finding at step 0. Metrics, one row per parameter:

``param_norm, param_rms, param_grad_norm, param_grad_rms, update_norm, update_ratio``
and with the ``full`` preset also ``param_{mean,absmax,nonfinite}`` and
``param_grad_{mean,absmax,nonfinite}``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..record.collector import Collector, Rows
from ..record.distributed import full_numel, local_tensor
from ..record.grad_layout import dense_view, norm_view
from .base import BaseProbe, ProbeContext, reached
from .kernels import host_params
from .moments import MomentRows, decode_moments

_TRAIN = "train"


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norms of a list of tensors as one (P,) float32 tensor on the first tensor's device.

    On CUDA ``_foreach_norm`` is one fused kernel for the whole list; on CPU it loops over
    ``vector_norm``, which is ~20% slower than a ``dot`` per contiguous tensor.
    """
    device = tensors[0].device
    if device.type == "cpu" and all(
        t.is_contiguous() and t.dtype == torch.float32 for t in tensors
    ):
        flat = [t.view(-1) for t in tensors]
        return torch.stack([torch.dot(f, f) for f in flat]).sqrt_()
    return torch.stack([n.to(device, torch.float32) for n in torch._foreach_norm(tensors)])


class ParameterProbe(BaseProbe):
    """Weight/gradient norms once per recorded step, update ratios around optimizer steps."""

    stage = "model"
    structure_aware = False
    needs_optimizer = True
    needs_backward = True

    @classmethod
    def build(cls, ctx: ProbeContext) -> ParameterProbe:
        full = reached(ctx.config.preset, "full")  # the weight and gradient moments
        probe = cls(ctx.params, updates=ctx.config.grads, full=full)
        # Ids of parameters that left the model mid-run (record/model_changes.py).
        probe.departed = ctx.shared.setdefault("departed_params", set())
        probe.step = ctx.shared.get("step", probe.step)
        return probe

    def __init__(self, params: list[tuple[int, nn.Parameter]], updates: bool, full: bool) -> None:
        self.departed: set[int] = set()
        self.codes = np.array([c for c, _ in params], np.int64)
        # Weight norms measured this step: parameter index -> (norms tensor, position in it).
        self._weight_norms: dict[int, tuple[torch.Tensor, int]] = {}
        self._unseen: set[int] = set()  # parameters whose optimizer step began unseen
        # Those whose step began unseen in the step before and that step belongs to the next
        # (``before_optimizer_step``): (the next step's index, parameter indices).
        self._unseen_next: tuple[int, set[int]] = (-1, set())
        self.step: Callable[[], int] = lambda: -1  # the step being run (the recorder's)
        # Per optimizer: copy buffers for the parameters it owns. On CPU they are kept across
        # steps: allocating a model-sized copy each time costs ~6x the copy itself in page
        # faults. Elsewhere (CUDA's caching allocator) they are freed after each step.
        self._buffers: dict[int, list[torch.Tensor]] = {}
        self.params = [p for _, p in params]
        self.numel = np.array([full_numel(p) for p in self.params], np.float64)
        self.updates = updates
        self.full = full
        self._before: dict[int, tuple[list[int], list[torch.Tensor], torch.Tensor]] = {}
        self._collector: Collector | None = None

    def begin_step(self, collector: Collector) -> None:
        self._collector = collector
        self._weight_norms.clear()
        at, unseen = self._unseen_next
        self._unseen = unseen if at == self.step() else set()
        self._unseen_next = (-1, set())
        self._before.clear()

    def _owned(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """Indices into ``self.params`` of the parameters ``optimizer`` steps."""
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [i for i, p in enumerate(self.params) if id(p) in owned]

    def _unmeasured(self, which: list[int]) -> list[int]:
        return [i for i in which if i not in self._weight_norms and i not in self._unseen]

    def _measure(
        self,
        collector: Collector,
        which: list[int],
        copy_into: dict[int, torch.Tensor] | None = None,
    ) -> bool:
        """Weight norms of the parameters ``which`` (indices into ``self.params``) and gradient
        norms of those that have a gradient, read now: just before the optimizer that owns
        them steps (with several optimizers, each one's gradients exist only from its own
        backward on), or at the step boundary for parameters no optimizer stepped.

        ``copy_into`` maps a parameter's index to a buffer that should receive its weights
        before the optimizer step. Where the numba kernels apply (CPU, ``fast`` extra) the
        copies are made in the same read of the weights as their norms; returns whether they
        were, else the caller copies.
        """
        if not which:
            return False
        # A sharded (FSDP) parameter contributes its local shard; ``numel`` stays the full
        # tensor's, so the squares of the ranks' norms and rms add up to the full tensor's.
        params = [self.params[i] for i in which]
        weights = [local_tensor(p.detach()) for p in params]
        raw = [None if p.grad is None else local_tensor(p.grad.detach()) for p in params]
        # Sparse gradients (embeddings with sparse=True) as their coalesced values for the
        # norms, densified for the moments over every element (record/grad_layout.py).
        grads = [None if g is None else norm_view(g) for g in raw]
        with_grad = [k for k, g in enumerate(grads) if g is not None]
        copies: list[torch.Tensor | None] = [(copy_into or {}).get(i) for i in which]
        # The kernel reads each gradient as its weight's size: a sparse one's values are not.
        alike = all(g is None or g.shape == w.shape for w, g in zip(weights, grads))
        copied = alike and host_params.usable(weights, grads, copies)
        if copied:
            norms = torch.from_numpy(np.sqrt(host_params.squares_and_copy(weights, grads, copies)))
            weight_norms, grad_norms = norms[:, 0], norms[with_grad, 1]
        else:
            weight_norms = _norms(weights)
            grad_norms = _norms([grads[k] for k in with_grad]) if with_grad else None
        for k, i in enumerate(which):
            self._weight_norms[i] = (weight_norms, k)
        codes, numel = self.codes[which], self.numel[which]
        collector.add(weight_norms, lambda v, rows: _emit_norms(rows, "param", codes, numel, v))
        if grad_norms is not None:
            g_codes, g_numel = codes[with_grad], numel[with_grad]
            collector.add(
                grad_norms, lambda v, rows: _emit_norms(rows, "param_grad", g_codes, g_numel, v)
            )
        if self.full:
            self._add_moments(collector, "param", which, weights)
            if with_grad:
                got = [which[k] for k in with_grad]
                dense = [dense_view(g) for g in raw if g is not None]  # with_grad's order
                self._add_moments(collector, "param_grad", got, dense)
        return copied

    def _norms_of(self, which: list[int]) -> torch.Tensor:
        """The weight norms measured this step of the parameters ``which``, as one tensor."""
        first = self._weight_norms[which[0]][0]
        entries = [self._weight_norms[i] for i in which]
        if len(first) == len(which) and all(
            t is first and k == j for j, (t, k) in enumerate(entries)
        ):
            return first  # measured together, in this order (one optimizer: the usual case)
        return torch.stack([t[k] for t, k in entries])

    def _add_moments(
        self, collector: Collector, prefix: str, which: list[int], tensors: list[torch.Tensor]
    ) -> None:
        codes, numel = self.codes[which], self.numel[which]
        moments = MomentRows()
        for t in tensors:
            moments.add(t)

        def decode(values: np.ndarray, rows: Rows) -> None:
            metrics = decode_moments(values, numel)
            for suffix in ("mean", "absmax", "nonfinite"):
                rows.emit(_TRAIN, codes, 0, f"{prefix}_{suffix}", metrics[suffix])

        moments.hand_over(collector, decode)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        collector = self._collector
        if collector is None or id(optimizer) in self._before:
            return
        which = self._owned(optimizer)
        todo = self._unmeasured(which)
        if not self.updates:
            self._measure(collector, todo)
            return
        params = [local_tensor(self.params[i].detach()) for i in which]
        old = self._buffers.get(id(optimizer))
        if old is None or len(old) != len(params):
            old = [torch.empty_like(p) for p in params]
        buffers = dict(zip(which, old))
        copied = self._measure(collector, todo, {i: buffers[i] for i in todo})
        if any(i in self._unseen for i in which):
            # Its step already began unseen in this step (the run opened inside it, and
            # another owner never stepped): this second step belongs to the next step, which
            # the owners end this one before, and it began unseen too: at that next step's
            # boundary its weights are already the step after's. Nothing of it is read.
            self._unseen_next = (self.step() + 1, set(which))
            return
        if which:
            if not copied or len(todo) != len(which):
                torch._foreach_copy_(old, params)
            self._before[id(optimizer)] = (which, old, self._norms_of(which))

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        entry = self._before.get(id(optimizer))
        if self._collector is not None and entry is None:
            # Its step began before this step was armed (the run opened inside it: a model
            # first called in a closure): its weights are already the next step's, and its
            # gradients a later evaluation's. Nothing of them is read at the step boundary.
            self._unseen.update(self._owned(optimizer))
        if self._collector is None or entry is None or not entry[0]:
            return
        which, old, old_norm = entry
        new = [local_tensor(self.params[i].detach()) for i in which]
        if host_params.usable(new, old):  # one read of each, the difference never written
            delta_norm = torch.from_numpy(np.sqrt(host_params.difference_squares(new, old)))
        else:
            torch._foreach_sub_(old, new)  # old - new, in place
            delta_norm = _norms(old)
        if old[0].device.type == "cpu":
            self._buffers[id(optimizer)] = old
        del self._before[id(optimizer)]
        self._before[id(optimizer)] = ([], [], old_norm)  # done for this step
        codes = self.codes[which]

        def decode(values: np.ndarray, rows: Rows) -> None:
            delta, base = values.reshape(2, -1)
            rows.emit(_TRAIN, codes, 0, "update_norm", delta)
            # ||θ|| = 0 (a zero-initialised bias or LoRA B before its first update): the ratio
            # is undefined, not infinite; no row (update_norm has the step). NaN stays data.
            defined = base != 0
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = delta / base
            rows.emit(_TRAIN, codes[defined], 0, "update_ratio", ratio[defined])

        self._collector.add(torch.stack((delta_norm.double(), old_norm.double())), decode)

    def release(self) -> None:
        """Free the kept copy buffers (the recorder is closing)."""
        self._buffers.clear()
        self._before.clear()
        self._weight_norms.clear()

    def end_step(self, collector: Collector) -> None:
        # Parameters no optimizer stepped (frozen ones, a custom update rule): measured at
        # the step boundary; not those that left the model (their last gradient, stale).
        rest = self._unmeasured(list(range(len(self.params))))
        if self.departed:
            rest = [i for i in rest if id(self.params[i]) not in self.departed]
        self._measure(collector, rest)
        self._collector = None
        self._before.clear()
        self._weight_norms.clear()
        self._unseen.clear()


def _emit_norms(rows: Rows, prefix: str, codes: np.ndarray, numel: np.ndarray, v: np.ndarray):
    rows.emit(_TRAIN, codes, 0, f"{prefix}_norm", v)
    rows.emit(_TRAIN, codes, 0, f"{prefix}_rms", v / np.sqrt(numel))
