"""Optimizers held weakly, by id, in the order they were added.

A script may build a new optimizer every step, or rebuild one to change its settings: the
old one is then freed with its state, and it drops out here. An id may be reused by a new
object once the old one is freed, so membership checks the object, not just its id.
"""

from __future__ import annotations

import weakref

from torch.optim import Optimizer


class WeakOptimizers:
    """An ordered set of optimizers that does not keep them alive."""

    def __init__(self, optimizers: tuple[Optimizer, ...] | list[Optimizer] = ()) -> None:
        self._refs: dict[int, weakref.ref[Optimizer]] = {}
        for optimizer in optimizers:
            self.add(optimizer)

    def __contains__(self, optimizer: object) -> bool:
        ref = self._refs.get(id(optimizer))
        return ref is not None and ref() is optimizer

    def add(self, optimizer: Optimizer) -> None:
        """Hold ``optimizer`` (a no-op when it is held; it replaces a freed one of its id)."""
        if optimizer not in self:
            self._refs.pop(id(optimizer), None)  # a freed optimizer's id: the new one is last
            self._refs[id(optimizer)] = weakref.ref(optimizer)

    def alive(self) -> dict[int, Optimizer]:
        """The optimizers still alive, by id, in the order added; the freed ones dropped."""
        live = {key: ref() for key, ref in self._refs.items()}
        for key in [k for k, optimizer in live.items() if optimizer is None]:
            del self._refs[key]
        return {key: optimizer for key, optimizer in live.items() if optimizer is not None}

    def keep(self, keys: set[int]) -> None:
        """Drop every optimizer whose id is not in ``keys``."""
        self._refs = {k: ref for k, ref in self._refs.items() if k in keys}
