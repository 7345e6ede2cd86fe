"""Whether a gradient hook runs inside ``torch.autograd.grad``: a gradient that is not the
training loss's.

Module and flight-recorder gradient hooks are tensor hooks on module outputs, and autograd
calls them for every pass that flows through the tensor: ``loss.backward()``, and also
``torch.autograd.grad`` calls a script makes while it trains, for a gradient penalty (WGAN-GP,
R1), the derivatives of a physics-informed loss or an input-gradient regulariser. Those
gradients are of something else than the loss (of a critic's output w.r.t. its input, with
``grad_outputs`` of ones), so the recorder's gradient statistics skip them. PyTorch tells a
hook nothing about the pass that calls it, so ``torch.autograd.grad`` is wrapped while a run
is open and counts how deep the calls are; the zero-code driver wraps it before the script's
imports run. A script that bound the function by name (``from torch.autograd import grad``)
before a ``Recorder`` opened calls the original, which is not seen.

Listeners (``listen``) are told of each outermost call, before it runs, with the call's
arguments: the zero-code driver reads the loss of a script that trains by
``torch.autograd.grad`` alone (``p.grad = g`` for each parameter, no ``backward``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_state: dict[str, Any] = {"depth": 0, "users": 0, "original": None}
Listener = Callable[[tuple[Any, ...], dict[str, Any]], None]
_listeners: list[Listener] = []


def listen(listener: Listener) -> None:
    """Call ``listener(args, kwargs)`` before each outermost ``torch.autograd.grad`` call."""
    _listeners.append(listener)


def unlisten(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def inside() -> bool:
    """Whether a ``torch.autograd.grad`` call is running now."""
    return _state["depth"] > 0


def watch() -> None:
    """Count ``torch.autograd.grad`` calls from now on (the first caller wraps it)."""
    if _state["users"] == 0:
        _state["original"] = torch.autograd.grad
        torch.autograd.grad = _counting(torch.autograd.grad)  # type: ignore[assignment]
    _state["users"] += 1


def unwatch() -> None:
    """The last caller gives torch its function back."""
    if _state["users"] == 0:
        return
    _state["users"] -= 1
    if _state["users"] == 0:
        torch.autograd.grad = _state["original"]
        _state["original"] = None


def _counting(original: Callable[..., Any]) -> Callable[..., Any]:
    def grad(*args: Any, **kwargs: Any) -> Any:
        if _state["depth"] == 0:
            for listener in list(_listeners):
                listener(args, kwargs)
        _state["depth"] += 1
        try:
            return original(*args, **kwargs)
        finally:
            _state["depth"] -= 1

    grad.__wrapped__ = original  # type: ignore[attr-defined]
    grad.__doc__ = original.__doc__
    return grad
