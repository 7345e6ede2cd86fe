"""A probe forward taken from the training itself: the first training call, replayed.

The stability index (probes/sharpness.py) needs ``forward(model)``, the loss on a fixed batch.
A model script has one (``loss(model, batch)``); the framework callbacks and zero-code mode
capture it while training runs: the arguments of the model's first training call (train
mode, gradients on), copied and detached once, replayed at every measurement. The replay
runs where the probe runs its forward: in eval mode, with RNG states and buffers given back
and the recorder's hooks paused (``side_forward``), so training is as it would have been.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .copy_safe import NotCopied
from .hook_context import compiling, in_backward
from .module_table import scripted
from .rng_objects import RNG_TYPES, own_copy, restore, rngs_in, state_of
from .script_warnings import quiet

#: call(model, *args, **kwargs): what the replay runs (default: ``model(*args, **kwargs)``)
Call = Callable[..., Any]

#: Keyword arguments left out of a replay. transformers' Trainer passes a model that takes
#: loss kwargs the token count of all the step's micro-batches: the loss is then this
#: micro-batch's share of the step's mean; without it, its own mean, the scale the step has.
LOSS_SHARE_KWARGS = ("num_items_in_batch",)


def detached_copy(obj: Any, device: torch.device | None = None) -> Any:
    """``obj`` with every tensor in its tuples, lists, mappings and dataclasses detached and
    copied (on ``device`` when given): the user may reuse or change a batch in place."""

    def copy(x: Any) -> Any:
        return detached_copy(x, device)

    if isinstance(obj, torch.Tensor):
        out = obj.detach()
        return out.to(device, copy=True) if device is not None else out.clone()
    if isinstance(obj, RNG_TYPES):
        # A generator the model draws from (a random mask, a noise level): the replay draws
        # from its own, so the user's next draw is the one it would have been.
        return own_copy(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*map(copy, obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map(copy, obj))
    if isinstance(obj, Mapping):
        items = {k: copy(v) for k, v in obj.items()}
        try:
            return type(obj)(items)  # BatchEncoding, OrderedDict, ...
        except Exception:  # a mapping type not built from a dict (defaultdict)
            return items
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: copy(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **fields)
    return obj


def call_model(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


class Replay:
    """``forward(model)``: ``call(model, *args, **kwargs)`` on arguments captured once; a
    generator among them starts each replay in the state it was captured in (the same
    random mask every time)."""

    def __init__(self, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.call, self.args, self.kwargs = call, args, kwargs
        self._generators = [(g, state_of(g)) for g in rngs_in((args, kwargs))]

    def __call__(self, model: nn.Module) -> Any:
        for g, state in self._generators:
            restore(g, state)
        with quiet():  # the script's own call of the model showed its warnings
            return self.call(model, *self.args, **self.kwargs)


def replay_of(
    call: Call, args: tuple[Any, ...], kwargs: dict[str, Any], device: torch.device | None = None
) -> Replay | None:
    """A ``Replay`` on copies of ``args`` and ``kwargs``; None when they cannot be copied (no
    memory left for the batch, an object that will not be rebuilt): this runs inside the
    user's training, which a probe must never stop."""
    try:
        args, kwargs = detached_copy((args, kwargs), device)
    except Exception:
        return None
    return Replay(call, args, kwargs)


def single_device(model: nn.Module) -> torch.device | None:
    """The one device holding all of ``model``'s parameters; None if several or none."""
    devices = {p.device for p in model.parameters()}
    return devices.pop() if len(devices) == 1 else None


class FirstTrainingCall(NotCopied):
    """A forward hook on ``model`` that hands ``on_capture`` a ``Replay`` of the first call
    made in training (train mode, gradients on, outside compiled code and backward) whose
    output ``accept`` takes, then removes itself. The captured keyword arguments leave out
    ``drop``; with ``to_device`` every tensor is moved to the model's device (a DDP wrapper
    moves its inputs inside its own forward; the replay calls the model inside it). With
    ``with_output`` the call's output and module are handed over too: ``on_capture(replay,
    output, module)``."""

    def __init__(
        self,
        model: nn.Module,
        on_capture: Callable[..., None],
        call: Call = call_model,
        drop: Iterable[str] = (),
        accept: Callable[[Any], bool] | None = None,
        to_device: bool = False,
        with_output: bool = False,
    ) -> None:
        self.on_capture, self.call, self.accept = on_capture, call, accept
        self.with_output = with_output
        self.drop = frozenset(drop)
        self.device = single_device(model) if to_device else None
        # A scripted root refuses Python hooks: nothing is captured, and the probes that
        # replay the model's forward are left out (as for a forward that cannot be replayed).
        self._handle: Any = (
            None if scripted(model) else model.register_forward_hook(self._hook, with_kwargs=True)
        )

    def _hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if compiling() or in_backward() or not (module.training and torch.is_grad_enabled()):
            return
        if self.accept is not None and not self.accept(output):
            return
        self.remove()  # safe inside the hook: the call iterates a snapshot of the hooks
        kept = {k: v for k, v in kwargs.items() if k not in self.drop}
        replay = replay_of(self.call, args, kept, self.device)
        if replay is not None:
            self.on_capture(*((replay, output, module) if self.with_output else (replay,)))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


__all__ = [
    "LOSS_SHARE_KWARGS",
    "FirstTrainingCall",
    "Replay",
    "call_model",
    "detached_copy",
    "replay_of",
    "single_device",
]
