"""Where scripts clip gradients: the global gradient norm *before* clipping, as the clip saw it.

While at least one run is open, torch's clipping functions are wrapped (and restored when the
last run closes); each wrapper hands the parameters it clips and their L2 gradient norm
before clipping (a 0-d float32 tensor, on the device, never read on the host here) to every
open run's listener, then clips as before. Nothing about the clip changes.

- ``clip_grad_norm_`` (nanoGPT, the HF Trainer through accelerate, Lightning's
  ``gradient_clip_val``): on torch >= 2.6 it calls the module globals ``_get_total_norm`` and
  ``_clip_grads_with_norm_`` of ``torch.nn.utils.clip_grad``; those are wrapped, so a
  ``clip_grad_norm_`` imported by name before the run opened is seen too, and so are the
  public ``get_total_norm``/``clip_grads_with_norm_`` (torchtitan's way). The total norm the
  clip computed is the value handed on: no extra pass. On older torch ``clip_grad_norm_``
  itself is wrapped (a copy imported by name before the run opened is then not seen).
- ``clip_grad_value_``: the wrapper takes the L2 norm of the gradients first (one pass over
  the gradients, only in scripts that clip by value). A copy imported by name before the run
  opened is not seen.
- FSDP1's ``FullyShardedDataParallel.clip_grad_norm_`` (when ``torch.distributed.fsdp`` is
  loaded before the run opens): with NO_SHARD (or one rank), its return value.

Sharded gradients (FSDP2's DTensors, FSDP1 sharding over several ranks): the clip's total is
all-reduced, the same full norm on every rank, but a sharded run's rows are each rank's
shards and merge root-sum-square over ranks (``store/ranks.py``). So each rank hands on the
L2 norm of its own shards, measured before the clip (one ``_foreach_norm`` pass over the
local shards: 1/world of the gradients); the merge is the clip's total. Tested on 2 ranks
(gloo, CPU) against both clips' return values. A norm other than L2 (``norm_type=inf``) is
measured the same way. HSDP (shards replicated across groups) would count each shard once
per replica.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.nn.utils import clip_grad

from ..probes.kernels import host_params
from .distributed import fsdp1_shards, local_tensor
from .grad_layout import norm_view
from .tool_faults import guarded

#: A listener: (the clipped parameters, their gradient norm before the clip, 0-d on device).
#: A third argument, when not None, is the norm after the clip, known without a pass over the
#: gradients: a clip by the L2 norm scales them all by one factor.
Listener = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor | None], None]

_listeners: list[Listener] = []
_restore: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) while patched
_state: dict[str, Any] = {"depth": 0, "total": None}  # nesting; the last (total, norm_type)


def l2_norm(grads: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """L2 norm over every tensor of ``grads`` (local shards of DTensors), as a 0-d float32
    tensor on the first one's device; None when there is none. One ``_foreach_norm`` per
    device, no host sync."""
    # A sparse gradient (an embedding's with sparse=True) as its coalesced values: same norm.
    tensors = [norm_view(local_tensor(g.detach())) for g in grads if g is not None]
    if not tensors:
        return None
    if host_params.usable(tensors):
        # CPU: one threaded numba read of all gradients, not one ``_foreach_norm`` call per
        # tensor: the sample GPT's 4.9M gradients in 1.2 ms against 1.8 ms inside a training
        # step (``python bench/flight_share.py``, docs/benchmarks.md). The host holds the
        # value already: no sync to avoid.
        total = float(host_params.squares(tensors).sum())
        return torch.tensor(total**0.5, dtype=torch.float32)
    first = tensors[0].device
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    norms = [
        n.to(first, torch.float32) for ts in by_device.values() for n in torch._foreach_norm(ts)
    ]
    return torch.linalg.vector_norm(torch.stack(norms))


def _as_list(parameters: Any) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return [p.grad for p in params]


def _tell(
    params: list[torch.Tensor], norm: torch.Tensor | None, after: torch.Tensor | None = None
) -> None:
    if norm is None or _state["depth"] > 0:  # inside a wrapped clip that reports for itself
        return
    norm = norm.detach()
    for listener in list(_listeners):
        _tell_one(listener, params, norm, after)


@guarded("reading a gradient clip")  # inside the user's clip_grad_norm_
def _tell_one(
    listener: Listener, params: list[torch.Tensor], norm: torch.Tensor, after: torch.Tensor | None
) -> None:
    listener(params, norm, after)


def _is_plain_l2(total: Any, params: list[torch.Tensor]) -> bool:
    """Whether ``total`` is the L2 norm ``_get_total_norm`` just returned for plain tensors."""
    last = _state["total"]
    plain = not any(callable(getattr(p.grad, "to_local", None)) for p in params)
    return last is not None and last[0] is total and last[1] == 2.0 and plain


def _wrap_total_norm(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_total_norm(tensors: Any, norm_type: float = 2.0, *args: Any, **kw: Any) -> Any:
        total = original(tensors, norm_type, *args, **kw)
        _state["total"] = (total, float(norm_type))
        return total

    return get_total_norm


def _scaled(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The L2 norm after ``_clip_grads_with_norm_`` scales every gradient by its factor,
    ``min(max_norm / (total + 1e-6), 1)``: on the device, no pass over the gradients."""
    total = total.detach()
    return total * torch.clamp(max_norm / (total + 1e-6), max=1.0)


def _wrap_clip_with_norm(original: Callable[..., Any]) -> Callable[..., Any]:
    def clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: Any, *a: Any, **k: Any):
        params = _as_list(parameters)
        if _is_plain_l2(total_norm, params):
            _tell(params, total_norm, _scaled(total_norm, max_norm))
        else:
            _tell(params, l2_norm(_grads(params)))
        _state["total"] = None
        return original(params, max_norm, total_norm, *a, **k)

    return clip_grads_with_norm_


def _wrap_measuring(original: Callable[..., Any]) -> Callable[..., Any]:
    """A clip function whose pre-clip L2 norm is measured before it runs (clip by value; clip
    by norm on torch without ``_clip_grads_with_norm_``)."""

    def clip(parameters: Any, *args: Any, **kw: Any) -> Any:
        params = _as_list(parameters)
        _tell(params, l2_norm(_grads(params)))
        _state["depth"] += 1
        try:
            return original(params, *args, **kw)
        finally:
            _state["depth"] -= 1

    clip.__wrapped__ = original  # type: ignore[attr-defined]
    return clip


def _wrap_fsdp(original: Callable[..., Any]) -> Callable[..., Any]:
    def clip_grad_norm_(self: Any, max_norm: float, norm_type: float = 2.0) -> Any:
        params = list(self.parameters())
        # Sharded, each rank hands on its own shards' norm (the ranks' rows merge
        # root-sum-square): the total, all-reduced, is the same on every rank.
        measured = float(norm_type) != 2.0 or fsdp1_shards(self)
        if measured:
            _tell(params, l2_norm(_grads(params)))
        _state["depth"] += 1  # NO_SHARD clips through torch's clip_grad_norm_: told here
        try:
            total = original(self, max_norm, norm_type)
        finally:
            _state["depth"] -= 1
        if not measured:
            _tell(params, total)
        return total

    return clip_grad_norm_


def _sites() -> list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]]:
    utils = torch.nn.utils
    sites: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = []
    if hasattr(clip_grad, "_clip_grads_with_norm_"):
        sites += [(clip_grad, "_get_total_norm", _wrap_total_norm)]
        sites += [(clip_grad, "_clip_grads_with_norm_", _wrap_clip_with_norm)]
        sites += [(utils, "get_total_norm", _wrap_total_norm)]
        sites += [(utils, "clip_grads_with_norm_", _wrap_clip_with_norm)]
    else:
        sites += [(m, "clip_grad_norm_", _wrap_measuring) for m in (utils, clip_grad)]
    sites += [(m, "clip_grad_value_", _wrap_measuring) for m in (utils, clip_grad)]
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    if cls is not None:
        sites.append((cls, "clip_grad_norm_", _wrap_fsdp))
    return [(owner, name, wrap) for owner, name, wrap in sites if hasattr(owner, name)]


def listen(listener: Listener) -> None:
    """Hand every clip from now on to ``listener`` (the first listener patches torch)."""
    if not _listeners:
        wrapped: dict[int, Any] = {}  # one wrapper per original (a public alias shares it)
        for owner, name, wrap in _sites():
            original = getattr(owner, name)
            if id(original) not in wrapped:
                wrapped[id(original)] = wrap(original)
            _restore.append((owner, name, original))
            setattr(owner, name, wrapped[id(original)])
    _listeners.append(listener)


def unlisten(listener: Listener) -> None:
    """Stop handing clips to ``listener``; the last one restores torch's functions."""
    if listener in _listeners:
        _listeners.remove(listener)
    if not _listeners:
        while _restore:
            owner, name, original = _restore.pop()
            setattr(owner, name, original)
        _state["total"] = None
