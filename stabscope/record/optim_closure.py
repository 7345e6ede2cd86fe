"""Optimizer steps that compute their own gradients: ``optimizer.step(closure)``.

Lightning's automatic optimization (and LBFGS) pass a closure that runs the forward and
backward pass *inside* ``optimizer.step``, after the step's pre-hooks have fired. Gradients
read in a pre-hook would then be the previous step's (or None). An optimizer-step pre-hook may
return new arguments, so the closure is wrapped: whatever must see this step's gradients runs
right after the closure's first call (LBFGS calls it again during its line search).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def closure_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Any] | None:
    """The closure given to ``optimizer.step``; ``args[0]`` is the optimizer itself."""
    closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
    return closure if callable(closure) else None


def after_first_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], then: Callable[[], None]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of ``optimizer.step`` with the closure wrapped to run ``then`` once,
    right after its first call returns."""
    closure = closure_of(args, kwargs)
    assert closure is not None
    pending = [then]

    def wrapped() -> Any:
        result = closure()
        while pending:
            pending.pop()()
        return result

    if "closure" in kwargs:
        return args, {**kwargs, "closure": wrapped}
    return (args[0], wrapped, *args[2:]), kwargs
