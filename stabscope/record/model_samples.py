"""Whether the script draws samples from its model's own outputs: an on-policy objective.

A policy gradient (REINFORCE, actor-critic, the score-function estimator of a discrete
latent) draws its actions from the distribution the model outputs and trains a surrogate,
−log π(a)·A plus an entropy bonus, whose value is not the model's error: it sits near zero
over centred advantages, and the entropy bonus rises as the policy sharpens, which is the
policy learning. A rule reading that loss as a training loss calls a healthy policy
diverged (``loss-divergence`` reads meta.json's ``samples_model`` and says so instead).

What is seen: ``sample()`` of a ``torch.distributions`` ``Categorical``, ``Bernoulli`` or
``Normal`` whose parameters (logits or probabilities; mean or scale) require grad, i.e. were
computed from the model's parameters, as ``Categorical(logits=policy(x)).sample()`` is.
``OneHotCategorical`` and ``Multinomial`` sample through ``Categorical``. A reparameterised
draw (``rsample``: noise moved by the model's output) trains the loss it reads and is not
counted; neither is ``torch.multinomial`` on probabilities computed under ``no_grad`` (a
policy sampled that way, or a language model's generations), which carry nothing to tell
them from data. The methods are wrapped on their classes while a run is open (the first
listener wraps, the last unwraps): torch's functions themselves stay as they are, so
``torch.jit.script`` and pickling see torch's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import distributions

from .hook_context import compiling

#: The classes whose ``sample`` is watched, and the attributes that hold their parameters.
WATCHED: tuple[tuple[type, tuple[str, ...]], ...] = (
    (distributions.Categorical, ("_param",)),
    (distributions.Bernoulli, ("_param",)),
    (distributions.Normal, ("loc", "scale")),
)

Listener = Callable[[str], None]
_listeners: list[Listener] = []
_originals: dict[type, Callable[..., Any]] = {}


def listen(listener: Listener) -> None:
    """Call ``listener(class name)`` at every draw from a distribution whose parameters
    require grad (the first listener wraps the classes' ``sample``)."""
    if not _listeners:
        for cls, attrs in WATCHED:
            _originals[cls] = cls.sample
            cls.sample = _watching(cls.__name__, attrs, cls.sample)  # type: ignore[method-assign]
    _listeners.append(listener)


def unlisten(listener: Listener) -> None:
    """The last listener gives the classes their ``sample`` back."""
    if listener in _listeners:
        _listeners.remove(listener)
    if not _listeners:
        for cls, original in _originals.items():
            cls.sample = original  # type: ignore[method-assign]
        _originals.clear()


def _watching(
    name: str, attrs: tuple[str, ...], original: Callable[..., Any]
) -> Callable[..., Any]:
    def sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not compiling():
            # vars(): a Categorical built from logits computes its probs lazily; read what
            # was given, never trigger that.
            given = vars(self)
            if any(getattr(given.get(a), "requires_grad", False) for a in attrs):
                for listener in list(_listeners):
                    listener(name)
        return original(self, *args, **kwargs)

    sample.__wrapped__ = original  # type: ignore[attr-defined]
    sample.__doc__ = original.__doc__
    return sample
