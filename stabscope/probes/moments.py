"""Fast moments of a tensor: mean, rms, absmax and a non-finite flag from three reductions.

On CPU, ``var_mean``/``std``/``vector_norm(inf)``/``isfinite().all()`` are 10-85x slower than
``sum``, ``dot`` and ``aminmax`` (measured on torch 2.13; docs/architecture.md). So a tensor is
reduced to the 4-vector ``[sum, sum of squares, min, max]`` on its device, and everything else
is derived on the host after the step's single sync. NaN and Inf propagate through all three
reductions, so the non-finite flag costs nothing: any NaN makes min/max NaN, any Inf makes one
of them Inf.
"""

from __future__ import annotations

import numpy as np
import torch

from ..record.collector import Collector, Decoder, Rows
from .kernels import host_kernels, host_moments

#: Metric suffixes derived from one moment vector, in emission order.
MOMENT_METRICS = ("mean", "rms", "absmax", "nonfinite")

_NATIVE = (torch.float32, torch.float64)

#: From this size on one ``aminmax`` pass beats ``amin`` + ``amax``: a tensor that no longer
#: fits the 2 MiB per-core L2 is read from memory once instead of twice (1 thread, 4M
#: elements: 0.87 ms against 1.17 ms); below it the two cached passes win (256K: 34 µs vs 50).
AMINMAX_FROM = 1 << 20


def moment_scalars(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(sum, sumsq, min, max)`` of ``t`` as four 0-d tensors on ``t``'s device.

    ``t`` is any floating tensor with at least one element; half types are upcast first so
    the sum of squares does not overflow at 65504. Callers stack many of these at once: one
    ``torch.stack`` per step instead of one per module saves ~4 dispatcher calls per module.
    """
    x = t.detach().reshape(-1)  # (numel,)
    if x.dtype not in _NATIVE:
        x = x.float()
    # All of sum, dot, amin, amax and aminmax propagate NaN.
    if x.numel() >= AMINMAX_FROM:
        lo, hi = torch.aminmax(x)
        return x.sum(), torch.dot(x, x), lo, hi
    return x.sum(), torch.dot(x, x), x.amin(), x.amax()


def stack_moments(scalars: list[torch.Tensor]) -> torch.Tensor:
    """``(R, 4)`` float32 tensor from ``R`` concatenated ``moment_scalars`` tuples."""
    dtypes = {s.dtype for s in scalars}
    if len(dtypes) > 1:  # float64 tensors give float64 sums
        scalars = [s.float() for s in scalars]
    return torch.stack(scalars).view(-1, 4).float()


def moment_vector(t: torch.Tensor) -> torch.Tensor:
    """``[sum, sumsq, min, max]`` of ``t`` as a float32 4-vector on ``t``'s device."""
    return stack_moments(list(moment_scalars(t)))


class MomentRows:
    """Moment vectors of a step's tensors, in the order they were added.

    CPU tensors take the single-pass kernel of ``host_moments`` when numba is installed and
    land straight in a float64 host array; other tensors keep their four 0-d reductions on
    their device. ``hand_over`` queues both with the collector, so the step still has one
    transfer per device and its decoder sees all ``(R, 4)`` vectors in order.
    """

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._host = np.empty((64, 4), np.float64)  # rows of host-reduced tensors
        self._rows = 0
        self._device: list[tuple[torch.Tensor, ...]] = []  # 4 scalars per device tensor
        self._where: list[int] = []  # per entry: host row, or -1 - device tensor index

    def add(self, t: torch.Tensor) -> int:
        """Reduce ``t`` (floating, non-empty) as a new entry; returns the entry's index."""
        # Plain tensors only: a tensor subclass (DTensor, a wrapper without local storage)
        # has no numpy view and keeps torch's reductions, which dispatch through it. Callers
        # hand over module outputs, gradients and detached parameters: all plain tensors.
        if t.device.type == "cpu" and type(t) is torch.Tensor and host_kernels.ready():
            if self._rows == len(self._host):
                self._host = np.concatenate([self._host, np.empty_like(self._host)])
            host_moments.host_moments_into(t, self._host[self._rows])
            self._where.append(self._rows)
            self._rows += 1
        else:
            self._where.append(-1 - len(self._device))
            self._device.append(moment_scalars(t))
        return len(self._where) - 1

    def repeat(self, entry: int) -> None:
        """Add entry ``entry`` again (the same tensor standing for another module)."""
        self._where.append(self._where[entry])

    def hand_over(self, collector: Collector, decode: Decoder) -> None:
        """Queue the vectors; ``decode`` gets them as one float64 ``(R, 4)`` array."""
        where = np.array(self._where, np.int64)
        on_host = where >= 0
        host_part = torch.from_numpy(self._host[where[on_host]]) if on_host.any() else None
        device_part = None
        if not on_host.all():  # the same scalars again for a repeated entry: no gather op
            device_part = stack_moments([s for w in where[~on_host] for s in self._device[-1 - w]])
        self._clear()
        if device_part is None or host_part is None:
            only = device_part if host_part is None else host_part
            collector.add(only, lambda values, rows: decode(values.reshape(-1, 4), rows))
            return
        joined = np.empty((len(where), 4))

        def keep_host(values: np.ndarray, rows: Rows) -> None:
            joined[on_host] = values.reshape(-1, 4)

        def add_device(values: np.ndarray, rows: Rows) -> None:  # decoded after keep_host
            joined[~on_host] = values.reshape(-1, 4)
            decode(joined, rows)

        collector.add(host_part, keep_host)
        collector.add(device_part, add_device)


def decode_moments(vectors: np.ndarray, numel: np.ndarray) -> dict[str, np.ndarray]:
    """Turn an ``(R, 4)`` array of moment vectors and element counts into named metrics."""
    vectors = vectors.reshape(-1, 4)
    total, sumsq, lo, hi = vectors.T
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        nonfinite = ~(np.isfinite(lo) & np.isfinite(hi))
        return {
            "mean": total / numel,
            "rms": np.sqrt(sumsq / numel),
            "absmax": np.where(np.isnan(lo) | np.isnan(hi), np.nan, absmax),
            "nonfinite": nonfinite.astype(np.float64),
        }


def is_moment_tensor(t: object) -> bool:
    """Whether ``t`` is a tensor whose moments we record (floating, non-empty, real), and
    not one of ``torch.func``'s wrappers: inside ``grad``/``vmap`` (per-sample gradients
    through ``functional_call``) a module's output is a wrapper with no storage of its own,
    whose values no reduction outside the transform may read."""
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.numel() > 0
        and not _functorch_wrapped(t)
    )


def _functorch_wrapped(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # Dynamo's tensors are its own, and it cannot trace this
        return False
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(t))
