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

Samples are also drawn by moving inputs along the model's own input gradient
(``input_gradient_step``): an energy-based model's negatives by Langevin dynamics,
x ← x − (ε²/2)·∂E/∂x + ε·noise, which contrastive divergence trains against, E(data) − E(x).
That loss is no error measure either: it compares the model with its own sampler, and it
returns toward 0 as the sampler catches up with the model while the model's likelihood of
held-out data keeps improving (a blind trial's energy MLP: its loss fell from −0.13 to −0.56
and came back to −0.13, while its held-out NLL fell throughout). The same gradient steps make
adversarial examples (PGD), whose loss is a game against an attacker of the model's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import distributions, nn

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


def input_gradient_step(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a ``torch.autograd.grad(outputs, inputs, ...)`` call (its arguments) is a step
    on inputs: its ``inputs`` are one leaf tensor that requires grad and is no
    ``nn.Parameter`` (a batch made to require grad, Langevin chains, a PGD perturbation), and
    it keeps no graph (``create_graph`` false: the gradient moves the inputs and is not
    trained through). Not: a penalty on the input gradient (WGAN-GP, R1, a physics-informed
    loss's derivatives), which keeps the graph to train through it; MAML's inner step, whose
    fast weights are computed from the parameters (no leaves), and a first-order one on
    detached copies, which takes the gradient w.r.t. one tensor per parameter (a weight and
    a bias at least); a loop that trains by ``autograd.grad`` w.r.t. its parameters."""
    inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
    create_graph = kwargs.get("create_graph", args[4] if len(args) > 4 else False)
    if inputs is None or create_graph:
        return False
    # Only a tensor, a list or a tuple is looked into: a generator read here would reach
    # torch empty.
    if isinstance(inputs, torch.Tensor):
        tensors = [inputs]
    elif isinstance(inputs, (list, tuple)):
        tensors = list(inputs)
    else:
        return False
    if len(tensors) != 1:
        return False
    (t,) = tensors
    return (
        isinstance(t, torch.Tensor)
        and not isinstance(t, nn.Parameter)
        and t.requires_grad
        and t.grad_fn is None
    )
