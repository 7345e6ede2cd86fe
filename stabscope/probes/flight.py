"""The flight recorder: every training step, recorded or not, for every block, stem and head.

Per step and watched module (``flight_search.watched_modules``): the rms and the largest |x| of
its output and of the gradient w.r.t. it, and whether either held a NaN/Inf (``flight_act_*``,
``flight_grad_*``). Hooks stay on the watched modules for the whole run and do tensor work
only, into the ring buffer on the device (``flight_ring.FlightRing``): no ``.item()``, no host
sync inside the step, and Dynamo traces them into compiled graphs with no graph break (forward
statistics only there: see ``COMPILED_NOTE``). The ring (``flight_every`` steps, 50 by default)
is copied to the host in one transfer when it is full, at close, and at once after a step where
a NaN/Inf first appeared; each transfer is written as a part, so a killed process loses at most
the ring's steps. On CPU the ring is in host memory already: ``peek`` lets the online rules
read its finished steps before the transfer (no copy of the ring is consumed).

When a watched module first goes non-finite, the exact leaf module and step are searched
(``flight_search``) and reported through the recorder's ``first_nonfinite`` (meta.json) and a
``first_nonfinite_{forward,backward}`` marker row. On CPU the flags are read straight from the
buffer's memory (free); on CUDA a non-blocking copy of the step's flags lands in pinned memory
and is read at a later step boundary, once its event has completed.

The "every" stage (``probes/base.py``): the recorder calls ``check(step)`` before each
optimizer step, ``boundary(step, collector)`` at every step's end, ``peek(rows)`` when the
online rules are handed the rows in host memory, and ``close(collector)`` when the run
closes. ``channel(metric)`` is the hook point for other per-step scalars (gradient norms
before clipping, update norms): a writer into the same ring, flushed with it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..record import grad_calls
from ..record.collector import Collector, Rows
from ..record.config import RecorderConfig
from ..record.copy_safe import NotCopied
from ..record.hook_context import compiling, in_backward, outside_modes, primary_tensor
from ..record.module_table import unwrap_model
from ..record.tool_faults import guarded
from .base import BaseProbe, ProbeContext
from .flight_ring import FlightRing
from .flight_search import (
    by_gradients,
    by_parameters,
    inputs_nonfinite,
    leaves,
    replay,
    watched_modules,
)
from .moments import decode_moments, is_moment_tensor

DIRECTIONS = ("forward", "backward")
PREFIX = ("flight_act", "flight_grad")
SUFFIXES = ("rms", "absmax", "nonfinite")

COMPILED_NOTE = (
    "flight recorder: the watched modules run compiled; their every-step output statistics "
    "are traced into the graph (no graph break), but not the gradients w.r.t. them (a "
    "gradient hook traced into the graph makes its backward save the ring buffer, which the "
    "next graph's writes invalidate), and the first non-finite leaf of a forward pass is "
    "found from the parameters only (a replay needs the block's inputs, which compiled code "
    "does not hand to Python)"
)


def _no_autograd_note(names: list[str]) -> str:
    """The note for watched modules whose training forward ran without autograd."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"flight recorder: {shown} ran their training forward without autograd (reentrant "
        "activation checkpointing, torch.utils.checkpoint(use_reentrant=True), or a no_grad "
        "forward in training mode): no every-step statistics for them, and a NaN there shows "
        "first in the next watched module; use_reentrant=False keeps them"
    )


class FlightRecorder(BaseProbe, NotCopied):
    """Every-step statistics of the blocks, stem and head, and the exact first non-finite."""

    stage = "every"
    structure_aware = False
    needs_backward = True

    @classmethod
    def wanted(cls, config: RecorderConfig, tier: str) -> bool:
        return config.flight

    @classmethod
    def build(cls, ctx: ProbeContext) -> FlightRecorder | None:
        root = unwrap_model(ctx.model)
        watched = watched_modules(root, ctx.structure)
        if not watched:
            return None
        device = next((p.device for p in root.parameters()), torch.device("cpu"))
        return cls(watched, ctx, device)

    def __init__(
        self, watched: list[tuple[str, nn.Module]], ctx: ProbeContext, device: torch.device
    ) -> None:
        self.watched = watched
        self.names = ctx.names  # module name -> code
        self.codes = np.array([ctx.names(n) for n, _ in watched], np.int32)  # (W,)
        self.run_code = ctx.run_code
        self.ring = FlightRing(ctx.config.flight_every, len(watched), device)
        self.on_nonfinite = ctx.on_nonfinite
        self.pause = tuple(h for h in (ctx.module_hooks, ctx.listeners) if h is not None)
        self.step = 0  # the step being run; the recorder sets the first
        self.paused = False  # a probe's own forward (``record.hooks.paused``)
        self.found: dict[str, dict[str, Any]] = {}  # direction -> first non-finite entry
        self.note: str | None = None  # for meta.json's notes
        self.order = list(range(len(watched)))  # forward order (learned from eager calls)
        self._fired: list[int] = []  # this step's first calls, in order (eager only)
        self._without_grad: set[int] = set()  # watched, called in training mode, no autograd
        self._markers: list[tuple[int, int, str]] = []  # (step, module code, metric)
        self._flush = False  # a trigger fired: hand the ring over at this step's end
        self._channels: list[str] = []
        self._pending: list[tuple[int, torch.Tensor, Any]] = []  # CUDA flags on their way
        self._handles: list[Any] = []

    # -- hooks ---------------------------------------------------------------------------
    def start(self) -> None:
        for w, (_, module) in enumerate(self.watched):
            hook = partial(self._forward_hook, w)
            # First among the module's hooks: the recorded steps' hooks come and go after it
            # in one order, so compiled code sees one hook order more, not two.
            handle = module.register_forward_hook(hook, with_kwargs=True, prepend=True)
            self._handles.append(handle)

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @guarded("the flight recorder's forward hook")
    def _forward_hook(self, w: int, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if compiling():  # tensor work only: Dynamo traces it into the graph
            tensor = primary_tensor(out)
            if tensor is not None and torch.is_grad_enabled() and module.training:
                self.ring.put(w, 0, tensor)
            # No gradient hook: one traced into the graph reads the ring in the compiled
            # backward, which autograd then saves from the forward; the next graph's write
            # bumps its version and that backward fails ("modified by an inplace operation").
            return
        if self.paused or not module.training or in_backward():
            return
        if not torch.is_grad_enabled():
            self._without_grad.add(w)  # a training forward without autograd
            return
        tensor = primary_tensor(out)
        if tensor is None:
            return
        if w not in self._fired:
            self._fired.append(w)
        with outside_modes():
            bad = self.ring.put(w, 0, tensor)
        if bad and "forward" not in self.found:
            self._search_forward(w, args, kwargs)
        if tensor.requires_grad:
            tensor.register_hook(partial(self._grad_hook, w))

    @guarded("the flight recorder's gradient hook")
    def _grad_hook(self, w: int, grad: torch.Tensor) -> None:
        if is_moment_tensor(grad) and not grad_calls.inside():  # not a torch.autograd.grad's
            self.ring.put(w, 1, grad)

    # -- the first non-finite ------------------------------------------------------------
    def _search_forward(self, w: int, args: Any, kwargs: dict[str, Any]) -> None:
        """Eager, with the block's inputs in hand: replay it to find the leaf."""
        name, module = self.watched[w]
        leaf, how = None, "replay"
        if inputs_nonfinite(tuple(args), kwargs):
            leaf, how = name, "input"
        elif not any(module.children()):
            leaf, how = name, "output"
        else:
            try:
                leaf = replay(name, module, tuple(args), kwargs, (*self.pause, self))
            except Exception as err:  # the user's code raised on a replay: never a crash
                self.note = f"flight recorder: replay of {name} failed: {type(err).__name__}"
        if leaf is None:
            leaf, how = self._by_parameters(w)
        self._found("forward", self.step, leaf, name, how)

    def _by_parameters(self, w: int) -> tuple[str, str]:
        name, module = self.watched[w]
        leaf = by_parameters(name, module)
        return (leaf, "parameters") if leaf is not None else (name, "block")

    def _judge(self, flags: np.ndarray, step: int) -> None:
        """``flags``: the ``(W, 2)`` non-finite flags of ``step``."""
        if flags[:, 0].any() and "forward" not in self.found:
            w = next(w for w in self.order if flags[w, 0])
            leaf, how = self._by_parameters(w)
            self._found("forward", step, leaf, self.watched[w][0], how)
        if flags[:, 1].any() and "backward" not in self.found:
            at = max(i for i, w in enumerate(self.order) if flags[w, 1])
            name, module = self.watched[self.order[at]]
            # The gradient w.r.t. this output went bad in what consumes it: a leaf of the
            # watched modules after it (forward order) whose parameter gradients hold a NaN/Inf.
            later = (leaf for v in self.order[at + 1 :] for leaf in leaves(*self.watched[v]))
            leaf, how = by_gradients(later), "gradients"
            if leaf is None and not any(module.children()):  # a watched leaf: itself
                leaf, how = name, "output"
            elif leaf is None:  # no later leaf to blame: the last bad one inside the block
                leaf = by_gradients(iter(leaves(name, module)))
                how = "gradients" if leaf is not None else "block"
            self._found("backward", step, leaf or name, name, how)

    def _found(self, direction: str, step: int, leaf: str, block: str, how: str) -> None:
        code = self.names(leaf)
        self.found[direction] = {"step": step, "module": leaf, "block": block, "found_by": how}
        self._markers.append((step, code, f"first_nonfinite_{direction}"))
        self._flush = True
        if self.on_nonfinite is not None:
            self.on_nonfinite(direction, code, 0, step, {"block": block, "found_by": how})

    def check(self, step: int) -> None:
        """Before an optimizer step (gradients in place, weights not yet changed) and at the
        step's end: judge the step when its flags are on the host for free (CPU)."""
        if len(self.found) == 2:
            return  # both directions found: nothing left to judge
        flags = self.ring.nonfinite()
        if flags is not None and flags.any():
            self._judge(flags, step)

    def _poll_device(self, step: int) -> None:
        """Off CPU: send this step's flags on their way, judge those that have arrived."""
        flags = ~torch.isfinite(self.ring.values[self.ring.index][..., 2:4]).all(-1)  # (W, 2)
        flags &= self.ring.values[self.ring.index][..., 4] > 0
        if self.ring.values.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step, host, event))
        else:  # another accelerator: no events to poll, read now (one small transfer)
            self._pending.append((step, flags.cpu(), None))
        while self._pending and (self._pending[0][2] is None or self._pending[0][2].query()):
            at, host, _ = self._pending.pop(0)
            if len(self.found) < 2 and bool(host.any()):
                self._judge(host.numpy(), at)

    # -- the step boundary ---------------------------------------------------------------
    def boundary(self, step: int, collector: Collector) -> None:
        """The end of ``step``: judge it, close its slot, hand the ring over when it is full
        or a trigger fired."""
        if self.ring.host is not None:
            self.check(step)
        else:
            self._poll_device(step)
        silent = self._without_grad.difference(self._fired)
        if silent and self.note is None:
            self.note = _no_autograd_note([self.watched[w][0] for w in sorted(silent)])
        self._without_grad.clear()
        if self._fired:
            self.order = self._fired + [w for w in self.order if w not in self._fired]
            self._fired = []
        elif self.note is None and self.ring.seen():
            self.note = COMPILED_NOTE  # statistics arrived with no eager hook call
        full = self.ring.advance(step)
        self.step = step + 1
        if full or self._flush:
            self._hand_over(collector)

    def close(self, collector: Collector) -> None:
        """Hand over the finished steps; an unfinished step's values are dropped."""
        self.release()
        self.ring.drop_current()
        if self.ring.steps or self._markers:
            self._hand_over(collector)

    def _hand_over(self, collector: Collector) -> None:
        self._flush = False
        steps, values, run = self.ring.take()
        markers, self._markers = self._markers, []
        decode, decode_run = self._decoders(steps, markers)
        if steps or markers:
            collector.add(values, decode)
        if steps and self._channels:
            collector.add(run, decode_run)

    def peek(self, rows: Rows) -> None:
        """Emit the rows of the ring's finished steps into ``rows`` where they are in host
        memory (CPU: no transfer), without handing them over: the online rules read them
        before the ring is full (``record/verdicts.py``). Off CPU nothing: they wait."""
        ring = self.ring
        if ring.host is None or not (ring.steps or self._markers):
            return
        n = len(ring.steps)
        decode, decode_run = self._decoders(list(ring.steps), list(self._markers))
        decode(ring.host[:n].reshape(-1).astype(np.float64), rows)  # (S*W*2*5,)
        if n and self._channels:
            decode_run(ring.run[:n].numpy().reshape(-1).astype(np.float64), rows)

    def _decoders(
        self, steps: list[int], markers: list[tuple[int, int, str]]
    ) -> tuple[Callable[[np.ndarray, Rows], None], Callable[[np.ndarray, Rows], None]]:
        """The decoders of the ring's values and channels of ``steps`` (flat float64)."""
        codes, channels, run_code = self.codes, list(self._channels), self.run_code
        step_of = np.array(steps, np.int32)  # (S,)

        def decode(flat: np.ndarray, rows: Rows) -> None:
            cells = flat.reshape(len(steps), len(codes), 2, 5)  # (S, W, 2, 5)
            for d, prefix in enumerate(PREFIX):
                seen = cells[:, :, d, 4] > 0  # (S, W)
                s, w = np.nonzero(seen)
                if not len(s):
                    continue
                metrics = decode_moments(cells[s, w, d, :4], cells[s, w, d, 4])
                for suffix in SUFFIXES:
                    rows.emit(
                        "train", codes[w], 0, f"{prefix}_{suffix}", metrics[suffix], step=step_of[s]
                    )
            for at, code, metric in markers:
                rows.emit("train", code, 0, metric, 1.0, step=at)

        def decode_run(flat: np.ndarray, rows: Rows) -> None:
            cells = flat.reshape(len(steps), len(channels), 2)  # (S, C, 2): value, written
            for c, metric in enumerate(channels):
                s = np.nonzero(cells[:, c, 1] > 0)[0]
                if len(s):
                    rows.emit("train", run_code, 0, metric, cells[s, c, 0], step=step_of[s])

        return decode, decode_run

    # -- the hook point for other per-step scalars ---------------------------------------
    def channel(self, metric: str) -> Callable[[torch.Tensor], None]:
        """A writer of one run-level value per step under ``metric`` (module ``__run__``):
        call it with a 0-d tensor during the step; it stays on the device and is flushed
        with the ring. The metric needs a catalogue entry like any other."""
        c = self.ring.add_channel()
        self._channels.append(metric)
        return partial(self.ring.put_run, c)


__all__ = ["COMPILED_NOTE", "FlightRecorder"]
