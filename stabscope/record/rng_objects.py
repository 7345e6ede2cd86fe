"""Random number generators held as objects: a ``torch.Generator``, a numpy ``Generator`` or
``RandomState``, a Python ``random.Random``. A model may draw from one it is handed
(``model(x, gen)``: a masked autoencoder's masks) or holds as an attribute; a pass of
stabscope's own over the model must give its state back, or copy it, so that the user's next
draw is the one it would have been (``side_forward``, ``probe_forward.Replay``). The global
streams (torch's, numpy's, Python's) are ``side_forward``'s own business."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

F = TypeVar("F", bound=Callable[..., Any])
#: The generator types whose state is saved and restored.
RNG_TYPES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def _eager(fn: F) -> F:
    """Run ``fn`` outside any graph Dynamo traces (a compiled optimizer step runs the
    recorder's hooks, and the stability index's ``side_forward`` in them): Dynamo fails on
    ``isinstance`` with ``random.Random`` ("RandomClassVariable() is not a constant") and on
    the generators' state methods."""
    return torch.compiler.disable(fn)  # type: ignore[return-value]


@_eager
def held_by(modules: list[torch.nn.Module]) -> list[Any]:
    """The generators ``modules`` hold as attributes."""
    return [v for m in modules for v in vars(m).values() if isinstance(v, RNG_TYPES)]


@_eager
def rngs_in(obj: Any) -> list[Any]:
    """The generators in ``obj`` and its tuples, lists, mappings and dataclasses."""
    if isinstance(obj, RNG_TYPES):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [g for x in obj for g in rngs_in(x)]
    if isinstance(obj, Mapping):
        return [g for x in obj.values() for g in rngs_in(x)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [g for f in dataclasses.fields(obj) for g in rngs_in(getattr(obj, f.name))]
    return []


@_eager
def state_of(g: Any) -> Any:
    """A copy of ``g``'s state, for ``restore``."""
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, np.random.Generator):
        return copy.deepcopy(g.bit_generator.state)
    return g.get_state() if isinstance(g, np.random.RandomState) else g.getstate()


@_eager
def restore(g: Any, state: Any) -> None:
    if isinstance(g, torch.Generator):
        g.set_state(state)
    elif isinstance(g, np.random.Generator):
        g.bit_generator.state = state
    elif isinstance(g, np.random.RandomState):
        g.set_state(state)
    else:
        g.setstate(state)


@_eager
def with_own_copies(values: list[Any]) -> list[Any]:
    """``values`` with each generator in it replaced by ``own_copy`` of it."""
    return [own_copy(v) if isinstance(v, RNG_TYPES) else v for v in values]


@_eager
def own_copy(g: Any) -> Any:
    """A generator of ``g``'s kind in ``g``'s state that draws apart from it."""
    if isinstance(g, torch.Generator):
        own = torch.Generator(device=g.device)
        own.set_state(g.get_state())
        return own
    return copy.deepcopy(g)


__all__ = [
    "RNG_TYPES",
    "held_by",
    "own_copy",
    "restore",
    "rngs_in",
    "state_of",
    "with_own_copies",
]
