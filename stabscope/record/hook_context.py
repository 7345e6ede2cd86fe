"""What a hook may ask about the moment it runs in: which tensor stands for a module's output,
whether autograd is running backward (an activation-checkpoint recomputation), whether
Dynamo is tracing, and a context without the probes' TorchFunctionModes. Shared by the
Recorder's hooks, the probes and the zero-code driver's global hooks."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..probes.moments import is_moment_tensor


def primary_tensor(
    output: Any, where: Callable[[torch.Tensor], bool] | None = None
) -> torch.Tensor | None:
    """The tensor that stands for a module's output: the output itself, or the first floating
    tensor inside a tuple, list, mapping (HF ModelOutput) or dataclass; with ``where``, the
    first such tensor that it accepts."""
    if isinstance(output, torch.Tensor):
        return output if is_moment_tensor(output) and (where is None or where(output)) else None
    if isinstance(output, (tuple, list)):
        items: Any = output
    elif isinstance(output, Mapping):
        items = output.values()
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = (getattr(output, f.name) for f in dataclasses.fields(output))
    else:
        return None
    for item in items:
        found = primary_tensor(item, where)
        if found is not None:
            return found
    return None


def outside_modes() -> Any:
    """A context in which torch functions skip every TorchFunctionMode: the recorder's own
    statistics inside an attention module must not pay the attention probe's interception."""
    disable = getattr(torch._C, "DisableTorchFunction", None)
    return disable() if disable is not None else contextlib.nullcontext()


def in_backward() -> bool:
    # Forward hooks also fire when activation checkpointing recomputes a forward inside
    # backward; those calls are not new forward passes and are skipped.
    return torch._C._current_graph_task_id() != -1


def compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def eager(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` run as Python even inside a compiled function: an optimizer step hook in a
    ``torch.compile(opt.step)``. Traced, its host work (a loss read, a row emitted) broke the
    compiled step into pieces and recompiled the recorder's code up to Dynamo's limit, each
    piece fusing the optimizer's update differently (its weights then differed in the last
    bits from step 1 on) and the step ran 9x slower. Disabled for the compiler, the call is
    one clean break around the compiled update."""
    return torch.compiler.disable(hook)


__all__ = ["compiling", "eager", "in_backward", "outside_modes", "primary_tensor"]
