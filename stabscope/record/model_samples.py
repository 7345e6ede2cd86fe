"""Whether the script draws samples from its model's own outputs: an on-policy objective.

A policy gradient (REINFORCE, actor-critic, the score-function estimator of a discrete
latent) draws its actions from the distribution the model outputs and trains a surrogate,
−log π(a)·A plus an entropy bonus, whose value is not the model's error: it sits near zero
over centred advantages, and the entropy bonus rises as the policy sharpens, which is the
policy learning. A rule reading that loss as a training loss calls a healthy policy
diverged (``loss-divergence`` reads meta.json's ``samples_model`` and says so instead).

What is seen: ``torch.multinomial`` (``Categorical.sample``), ``torch.bernoulli``
(``Bernoulli.sample``) and ``torch.normal`` (a Gaussian policy's ``Normal.sample``) called on
a tensor that requires grad, i.e. one computed from the model's parameters. Sampling for
evaluation under ``no_grad`` (a language model's generations) draws from tensors that do not
require grad and is not counted; neither is a reparameterised draw (``rsample``: noise from
``randn`` moved by the model's output), which trains the loss it reads. The functions are
wrapped while a run is open (the first listener wraps, the last unwraps); a script that
bound one by name before the run opened calls the original, which is not seen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .hook_context import compiling

#: The sampling functions of ``torch.distributions``' discrete and Gaussian ``sample()``.
SAMPLERS = ("multinomial", "bernoulli", "normal")

Listener = Callable[[str], None]
_listeners: list[Listener] = []
_originals: dict[str, Callable[..., Any]] = {}


def listen(listener: Listener) -> None:
    """Call ``listener(name)`` at every draw from a tensor that requires grad (the first
    listener wraps torch's functions)."""
    if not _listeners:
        for name in SAMPLERS:
            _originals[name] = getattr(torch, name)
            setattr(torch, name, _watching(name, _originals[name]))
    _listeners.append(listener)


def unlisten(listener: Listener) -> None:
    """The last listener gives torch its functions back."""
    if listener in _listeners:
        _listeners.remove(listener)
    if not _listeners:
        for name, original in _originals.items():
            setattr(torch, name, original)
        _originals.clear()


def _watching(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def sample(*args: Any, **kwargs: Any) -> Any:
        if not compiling() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in (*args[:2], *kwargs.values())
        ):
            for listener in list(_listeners):
                listener(name)
        return original(*args, **kwargs)

    sample.__wrapped__ = original  # type: ignore[attr-defined]
    sample.__doc__ = original.__doc__
    return sample
