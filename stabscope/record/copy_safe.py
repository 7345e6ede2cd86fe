"""Hook owners that a ``copy.deepcopy`` of the model leaves behind.

``copy.deepcopy(model)`` copies the module's hook dicts with it, and a hook that is a bound
method (or a ``partial`` of one) is copied with the object it belongs to: the recorder, its
writer, its locks. That raised ``TypeError: cannot pickle '_thread.lock' object`` inside the
script's own ``best = copy.deepcopy(model)`` (early stopping, an EMA copy, a checkpoint
kept in memory). Every object whose methods stabscope registers as module hooks derives
from ``NotCopied``: its deep copy is a stand-in whose every method does nothing, so the
copied model's hooks do nothing and the copy is the script's own, not recorded. The hooks
themselves stay what they were (a ``partial`` of a bound method, which Dynamo traces).
"""

from __future__ import annotations

from typing import Any


def _nothing(*args: Any, **kwargs: Any) -> None:
    """A copied model's hook: a forward or pre-hook that returns None changes nothing."""
    return None


class _Detached:
    """What a hook owner becomes in a copy of the model: every attribute a no-op."""

    def __getattr__(self, name: str) -> Any:
        return _nothing

    def __deepcopy__(self, memo: dict[int, Any]) -> _Detached:
        return self


DETACHED = _Detached()


class NotCopied:
    """A hook owner: ``copy.deepcopy`` of it (through a copied model's hooks) is
    ``DETACHED``."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return DETACHED
