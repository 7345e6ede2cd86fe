"""Capturing one forward pass: every module call with its input and output tensors.

Structure discovery needs facts, not names: which tensor a module read, which it produced,
and in which order. ``capture(model)`` records that with temporary pre-/post-forward hooks
and removes them on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..record.hook_context import primary_tensor
from ..record.module_table import clean_name, unwrap_model

#: Keyword names under which HF-style modules take their main input.
_INPUT_KWARGS = ("hidden_states", "x", "input", "inputs", "query", "src", "tgt")


@dataclass
class Call:
    """One module call in a traced forward pass."""

    index: int  # position in Trace.calls (start order)
    name: str
    module: nn.Module
    parent: int | None
    start: int  # time the call began, on a clock shared with `end`
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    end: int = -1  # time the call returned
    children: list[int] = field(default_factory=list)


def main_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The tensor a module works on: its first floating positional argument, else a known
    keyword such as ``hidden_states``."""
    for arg in args:
        t = primary_tensor(arg) if not isinstance(arg, torch.Tensor) else arg
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    for key in _INPUT_KWARGS:
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    return None


@dataclass
class Trace:
    calls: list[Call] = field(default_factory=list)

    def first_call(self, name: str) -> Call | None:
        return next((c for c in self.calls if c.name == name), None)

    def descendants(self, call: Call) -> list[Call]:
        """Calls made while ``call`` was running, in start order."""
        out, stack = [], list(reversed(call.children))
        while stack:
            c = self.calls[stack.pop()]
            out.append(c)
            stack.extend(reversed(c.children))
        return sorted(out, key=lambda c: c.index)


@contextmanager
def capture(model: nn.Module) -> Iterator[Trace]:
    """Record module calls of forward passes run inside the block."""
    trace = Trace()
    stack: list[int] = []
    clock = {"t": 0}

    def tick() -> int:
        clock["t"] += 1
        return clock["t"]

    handles = []
    root = unwrap_model(model)

    def pre(name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        parent = stack[-1] if stack else None
        call = Call(len(trace.calls), name, module, parent, tick(), main_input(args, kwargs))
        trace.calls.append(call)
        if parent is not None:
            trace.calls[parent].children.append(call.index)
        stack.append(call.index)

    def post(name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        # Pop back to this module's call (a module that raised leaves no post-hook call).
        while stack:
            call = trace.calls[stack.pop()]
            if call.module is module:
                call.output = primary_tensor(output)
                call.end = tick()
                break

    try:
        for raw, module in root.named_modules():
            name = clean_name(raw)
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, k, n=name: pre(n, m, a, k), with_kwargs=True
                )
            )
            handles.append(
                module.register_forward_hook(
                    lambda m, a, k, o, n=name: post(n, m, a, k, o), with_kwargs=True
                )
            )
        yield trace
    finally:
        for h in handles:
            h.remove()
