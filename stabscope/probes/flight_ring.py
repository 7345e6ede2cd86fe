"""The flight recorder's ring buffer: per-step moments of the watched modules, on the device.

One float32 tensor ``values`` of shape ``(slots, W, 2, 5)``: for each slot (a step), each
watched module (W) and each direction (0: the module's output, 1: the gradient w.r.t. it)
the moment vector ``[sum, sum of squares, min, max, numel]``. The first four are the layout
of ``moments.moment_scalars`` (``decode_moments`` reads them alike, so an every-step rms is
the scheduled ``act_rms`` by the same definition); ``numel`` 0 means "not seen this step".
Several calls in one step (micro-batches, a shared module) add up: sums and counts add, the
extremes combine, so the statistic covers every training call of the step.

The slot written is ``slot``, a 0-d long tensor on the device: code compiled by Dynamo reads
it as a graph input and indexes with it, so a new step needs no recompilation and no host
value. Eager CPU code writes through a numpy view of the same storage with the one-pass numba
kernel (``host_moments``) where it is available. Run-level channels (``(slots, C, 2)``: value,
written) carry one scalar per step each, for values computed elsewhere (``FlightRecorder.
channel``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..record.hook_context import compiling
from .kernels import host_kernels, host_moments

STATS = 5  # sum, sumsq, min, max, numel
_NATIVE = (torch.float32, torch.float64)


def _device_moments(t: torch.Tensor) -> torch.Tensor:
    """``[sum, sumsq, min, max, numel]`` of ``t`` as a float32 5-vector on its device;
    traceable by Dynamo (tensor work only)."""
    x = t.detach().reshape(-1)  # (numel,)
    if x.dtype not in _NATIVE:
        x = x.float()
    count = torch.full((), x.numel(), dtype=x.dtype, device=x.device)
    return torch.stack([x.sum(), torch.dot(x, x), x.amin(), x.amax(), count]).float()


def _combine(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Two moment 5-vectors of one step as one; ``old`` with count 0 is empty."""
    seen = old[4] > 0
    lo = torch.where(seen, torch.minimum(old[2], new[2]), new[2])
    hi = torch.where(seen, torch.maximum(old[3], new[3]), new[3])
    return torch.stack([old[0] + new[0], old[1] + new[1], lo, hi, old[4] + new[4]])


class FlightRing:
    """The ring of one run: ``slots`` steps of ``width`` watched modules, on ``device``."""

    def __init__(self, slots: int, width: int, device: torch.device) -> None:
        self.slots = slots
        self.values = torch.zeros(slots, width, 2, STATS, device=device)  # (S, W, 2, 5)
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # the slot being written
        self.index = 0  # the same, on the host
        self.steps: list[int] = []  # the step of each finished slot
        self.run = torch.zeros(slots, 0, 2, device=device)  # (S, C, 2): value, written
        # On CPU the host reads the storage directly: no transfer, no sync.
        self.host = self.values.numpy() if device.type == "cpu" else None

    # -- writes (from hooks, eager or compiled) ------------------------------------------
    def put(self, w: int, d: int, t: torch.Tensor) -> bool | None:
        """Add tensor ``t`` as module ``w``'s direction ``d`` in the current slot. Returns
        whether it held a NaN/Inf when the host knows it for free (eager CPU), else None."""
        host = self.host
        eager_cpu = host is not None and not compiling()
        on_host = type(t) is torch.Tensor and t.device.type == "cpu"
        if eager_cpu and on_host and host_kernels.ready():
            # One numba call reduces ``t`` and combines it into the cell in host memory.
            return not host_moments.accumulate_into(t, host[self.index, w, d])
        # Index with tensors only: Dynamo reads ``values[slot]`` with a 0-d index as an
        # integer and would recompile at every step.
        at = self.slot.view(1)
        cell = self.values.index_select(0, at)[0, w, d]  # (5,)
        where = (at, _const(w, at), _const(d, at))
        self.values.index_put_(where, _combine(cell, _device_moments(t)).view(1, STATS))
        return not _finite(host[self.index, w, d]) if eager_cpu else None

    def add_channel(self) -> int:
        """A new run-level channel; its index. Grows the run buffer (rare: at setup)."""
        old = self.run
        self.run = torch.zeros(self.slots, old.shape[1] + 1, 2, device=old.device)
        self.run[:, : old.shape[1]] = old
        return old.shape[1]

    def put_run(self, c: int, value: torch.Tensor) -> None:
        """Channel ``c``'s value of the current slot (a 0-d tensor, stays on its device)."""
        v = value.detach().reshape(()).float().to(self.run.device)
        at = self.slot.view(1)
        self.run.index_put_((at, _const(c, at)), torch.stack([v, torch.ones_like(v)]).view(1, 2))

    # -- the host side -------------------------------------------------------------------
    def nonfinite(self) -> np.ndarray | None:
        """``(W, 2)`` flags of the current slot (a NaN/Inf seen), or None off CPU (the host
        would have to wait for the device)."""
        if self.host is None:
            return None
        cell = self.host[self.index]  # (W, 2, 5)
        if np.isfinite(cell[..., 2:4]).all():  # the common case in one pass: nothing to flag
            return np.zeros(cell.shape[:2], bool)
        with np.errstate(invalid="ignore"):
            return (cell[..., 4] > 0) & ~(np.isfinite(cell[..., 2]) & np.isfinite(cell[..., 3]))

    def seen(self) -> bool:
        """Whether anything was written into the current slot (on the host: CPU only)."""
        return self.host is not None and bool((self.host[self.index][..., 4] > 0).any())

    def advance(self, step: int) -> bool:
        """Close the current slot as ``step``'s; whether the ring is now full."""
        self.steps.append(step)
        self.index += 1
        if self.index < self.slots:
            self._clear(self.index)
        return self.index >= self.slots

    def take(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """The finished slots (steps, a copy of their values and channels) and an empty ring;
        the copies stay on the device until the caller's transfer."""
        n = self.index
        steps, values, run = self.steps, self.values[:n].clone(), self.run[:n].clone()
        self.steps, self.index = [], 0
        self._clear(0)
        return steps, values, run

    def drop_current(self) -> None:
        """Forget what the current (unfinished) slot holds."""
        self._clear(self.index)

    def _clear(self, index: int) -> None:
        self.values[index].zero_()
        self.run[index].zero_()
        self.slot.fill_(index)


def _const(i: int, like: torch.Tensor) -> torch.Tensor:
    """The index ``i`` as a 1-element long tensor on ``like``'s device."""
    return torch.full((1,), i, dtype=torch.long, device=like.device)


def _finite(cell: np.ndarray) -> bool:
    return bool(np.isfinite(cell[2]) and np.isfinite(cell[3]))


__all__ = ["STATS", "FlightRing"]
