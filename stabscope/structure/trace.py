"""Capturing one forward pass: every module call with its input and output tensors.

Structure discovery needs facts, not names: which tensor a module read, which it produced,
and in which order. ``capture(model)`` records that with temporary pre-/post-forward hooks
and removes them on exit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..record.hook_context import compiling, in_backward, primary_tensor
from ..record.module_table import clean_name, scripted, unwrap_model
from .attention_calls import attention_call

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
    #: (time, index of the innermost module call running) of each attention computation
    #: (attention_calls.py): a block that attends in its own forward has no attention module.
    attending: list[tuple[int, int]] = field(default_factory=list)

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


class _Attending(TorchFunctionMode):
    """Notes each attention call (attention_calls.py) with the module call running it."""

    def __init__(self, trace: Trace, stack: list[int], tick: Callable[[], int]) -> None:
        super().__init__()
        self.trace, self.stack, self.tick = trace, stack, tick

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        if self.stack and attention_call(func, args, kwargs or {}, out):
            self.trace.attending.append((self.tick(), self.stack[-1]))
        return out


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
        push()
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
        pop()

    # Attention calls are seen through a TorchFunctionMode pushed while the outermost module
    # call runs (as the attention probe does around an attention module), not around the
    # whole capture: a capture from a training step spans its backward and optimizer step.
    mode = _Attending(trace, stack, tick)
    owner = threading.get_ident()  # modes are per thread: DataParallel's replicas run apart
    pushed: list[_Attending] = []

    def push() -> None:
        # On the capturing thread only; not inside a backward (activation checkpointing's
        # recomputed forward runs there, where the engine restores its own mode stack after
        # each node), nor while Dynamo traces the hooks.
        if compiling():  # first: Dynamo cannot trace the thread or graph-task builtins
            return
        if not stack and not pushed and threading.get_ident() == owner and not in_backward():
            mode.__enter__()
            pushed.append(mode)

    def pop() -> None:
        if not stack and pushed:
            pushed.pop().__exit__(None, None, None)

    try:
        for raw, module in root.named_modules():
            if scripted(module):
                continue  # TorchScript runs it: a hook would never fire, and its root refuses one
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
        stack.clear()
        pop()  # a forward that raised ran no post-hook
