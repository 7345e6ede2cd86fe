"""Attaching and removing the per-module hooks of a recorded step, and counting what fired.

Forward hooks are registered with ``with_kwargs=True`` (HF modules take kwargs and return tuples
or ModelOutput objects). Gradients with respect to a module's output are taken with a tensor
hook on that output, registered from the forward hook: full backward hooks break user code that
modifies outputs in place (pitfall 1 in docs/architecture.md). A tensor hook on a view that is
later modified in place never fires (pitfall 2), so every hook's firing is counted and the ones
that never fired are reported instead of trusted.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..probes.moments import is_moment_tensor
from . import grad_calls
from .copy_safe import NotCopied
from .hook_context import compiling, in_backward, outside_modes, primary_tensor
from .tool_faults import guarded

TRAIN, EVAL = 0, 1  # phase codes; names in store.schema.PHASES

ForwardSink = Callable[[int, int, int, torch.Tensor], None]  # (phase, module, call, output)
GradSink = Callable[[list[tuple[int, int]], torch.Tensor], None]  # ([(module, call)], grad)


class ModuleHooks(NotCopied):
    """Forward hooks on selected modules plus tensor hooks on their outputs, per step."""

    def __init__(
        self,
        modules: list[tuple[int, nn.Module]],
        on_forward: ForwardSink,
        on_grad: GradSink | None,
        record_eval: bool = True,
    ) -> None:
        self.modules = modules
        self.on_forward = on_forward
        self.on_grad = on_grad
        self.record_eval = record_eval
        n = 1 + max((code for code, _ in modules), default=-1)
        # Cumulative over recorded steps, indexed by module code.
        self.forward_calls = np.zeros(n, np.int64)
        self.grad_hooks = np.zeros(n, np.int64)
        self.grad_calls = np.zeros(n, np.int64)
        self._calls: dict[tuple[int, int], int] = {}  # (phase, module) -> calls this step
        self._handles: list[RemovableHandle] = []
        self._tensor_handles: list[RemovableHandle] = []
        self.paused = False  # set while a probe runs its own forward pass
        # One tensor hook per output tensor, shared by every module that returned that very
        # tensor (a block returning its last child's output): id -> (weakref, keys).
        self._grad_keys: dict[int, tuple[weakref.ref, list[tuple[int, int]]]] = {}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def counts(self, code: int) -> dict[str, int]:
        """Cumulative fire counts of one module, for its entry in meta.json."""
        return {
            "forward_calls": int(self.forward_calls[code]),
            "grad_hooks": int(self.grad_hooks[code]),
            "grad_calls": int(self.grad_calls[code]),
        }

    def never_fired(self, names: list[str]) -> dict[str, list[str]]:
        """Modules whose forward hook, or whose registered gradient hooks, never fired.

        A module never called whose parameters are all held by modules that were is left
        out of ``forward``: its weights are tied to theirs and ran there (HF's T5 keeps
        ``shared`` beside the ``embed_tokens`` of its encoder and decoder, which hold the
        same weight and are the ones called)."""
        codes = [code for code, _ in self.modules]
        ran = {
            id(p)
            for code, m in self.modules
            if self.forward_calls[code] > 0
            for p in m.parameters(recurse=False)
        }

        def tied(module: nn.Module) -> bool:
            if not ran:  # nothing ran (a compiled model's hooks): nothing to be tied to
                return False
            own = [id(p) for p in module.parameters()]
            return bool(own) and all(i in ran for i in own)

        return {
            "forward": [
                names[c]
                for c, m in self.modules
                if self.forward_calls[c] == 0 and not tied(m) and not holds_only(m)
            ],
            "grad": [names[c] for c in codes if self.grad_hooks[c] > 0 and self.grad_calls[c] == 0],
        }

    def attach(self) -> None:
        if self._handles:
            return
        for code, module in self.modules:
            hook = partial(self._forward_hook, code)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def end_step(self) -> None:
        """Forget this step's call counts and drop tensor hooks that did not fire."""
        self._calls.clear()
        self._grad_keys.clear()
        for handle in self._tensor_handles:
            handle.remove()
        self._tensor_handles.clear()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.end_step()

    @guarded("a module's forward hook")
    def _forward_hook(
        self, code: int, module: nn.Module, args: Any, kwargs: Any, output: Any
    ) -> None:
        # compiling() first: Dynamo cannot trace in_backward() and would break the graph.
        if compiling() or self.paused or in_backward():
            return
        phase = TRAIN if (torch.is_grad_enabled() and module.training) else EVAL
        if phase == EVAL and not self.record_eval:
            return
        key = (phase, code)
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        self.forward_calls[code] += 1
        tensor = primary_tensor(output)
        if tensor is None:
            return
        if tensor.is_inference():
            # An eval pass under torch.inference_mode(): its outputs have no version counter,
            # which the reductions read to tell an in-place change; measure a normal copy.
            with torch.inference_mode(False):
                tensor = tensor.clone()
        with outside_modes():
            self._record_output(phase, code, call, tensor)

    def _record_output(self, phase: int, code: int, call: int, tensor: torch.Tensor) -> None:
        self.on_forward(phase, code, call, tensor)
        if self.on_grad is not None and phase == TRAIN and tensor.requires_grad:
            self.grad_hooks[code] += 1
            shared = self._grad_keys.get(id(tensor))
            if shared is not None and shared[0]() is tensor:
                shared[1].append((code, call))
                return
            keys = [(code, call)]
            self._grad_keys[id(tensor)] = (weakref.ref(tensor), keys)
            self._tensor_handles.append(tensor.register_hook(partial(self._grad_hook, keys)))

    @guarded("a module's gradient hook")
    def _grad_hook(self, keys: list[tuple[int, int]], grad: torch.Tensor) -> None:
        if grad_calls.inside():  # a torch.autograd.grad call's gradient, not the loss's
            return
        for code, _ in keys:
            self.grad_calls[code] += 1
        if self.on_grad is not None and is_moment_tensor(grad):
            self.on_grad(keys, grad)


PreListener = Callable[[nn.Module, Any, Any], None]  # (module, args, kwargs)
PostListener = Callable[[nn.Module, Any, Any, Any], None]  # (module, args, kwargs, output)


def _training_call(module: nn.Module) -> bool:
    if compiling():  # checked first: see ModuleHooks._forward_hook
        return False
    return torch.is_grad_enabled() and module.training and not in_backward()


class ListenerHooks(NotCopied):
    """Extra per-module hooks of the structure-aware probes, attached with the step's hooks.

    Listeners see training-phase calls only (eval passes and checkpoint recomputation are
    skipped), and can be paused, e.g. while a probe runs its own forward pass.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[nn.Module, PreListener | None, PostListener | None, bool]] = []
        self._handles: list[RemovableHandle] = []
        self.paused = False

    def add(
        self,
        module: nn.Module,
        pre: PreListener | None = None,
        post: PostListener | None = None,
        innermost: bool = False,
    ) -> None:
        """``innermost``: ``pre`` runs after every other forward pre-hook of the module and
        ``post`` before every other forward hook, so that between them only the module's own
        ``forward`` runs, not a user's hook (see ``_Innermost``)."""
        self._entries.append((module, pre, post, innermost))
        if self._handles:  # added while attached: attach this one too
            self._attach_one(module, pre, post, innermost)

    def _attach_one(
        self,
        module: nn.Module,
        pre: PreListener | None,
        post: PostListener | None,
        innermost: bool = False,
    ) -> None:
        order = _Innermost(module) if innermost else None
        if pre is not None:

            @guarded("a probe's forward pre-hook")
            def pre_hook(m: nn.Module, args: Any, kwargs: Any, fn: PreListener = pre) -> None:
                if not self.paused and _training_call(m):
                    if order is not None:
                        order.post_first()
                    with outside_modes():
                        fn(m, args, kwargs)

            handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            self._handles.append(handle)
            if order is not None:
                order.pre = handle.id
        if post is not None:

            @guarded("a probe's forward hook")
            def post_hook(
                m: nn.Module, args: Any, kwargs: Any, out: Any, fn: PostListener = post
            ) -> None:
                if not self.paused and _training_call(m):
                    if order is not None:
                        order.pre_last()
                    with outside_modes():
                        fn(m, args, kwargs, out)

            handle = module.register_forward_hook(
                post_hook, with_kwargs=True, always_call=True, prepend=innermost
            )
            self._handles.append(handle)
            if order is not None:
                order.post = handle.id

    def attach(self) -> None:
        if self._handles:
            return
        for entry in self._entries:
            self._attach_one(*entry)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _Innermost:
    """Keeps a listener pair around a module's ``forward`` alone: its pre-hook last among the
    module's forward pre-hooks, its hook first among its forward hooks.

    torch runs a module's pre-hooks, then ``forward``, then its forward hooks, each in
    registration order (``prepend=True`` puts one first). The pair is registered at every
    recorded step's start: the pre-hook appended (after the user's), the hook prepended. A user
    hook registered later could still come in between, so each side moves the other back in
    place: the pre-hook moves the forward hook to the front (torch reads the forward hooks after
    ``forward``, so this call already sees it), the forward hook moves the pre-hook to the end
    (from the next call on). Global hooks (``register_module_forward_hook``) run before every
    module's own and cannot be ordered from here.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.pre: int | None = None
        self.post: int | None = None

    def post_first(self) -> None:
        hooks = self.module._forward_hooks
        if self.post in hooks and next(iter(hooks)) != self.post:
            hooks.move_to_end(self.post, last=False)

    def pre_last(self) -> None:
        hooks = self.module._forward_pre_hooks
        if self.pre in hooks and next(reversed(hooks)) != self.pre:
            hooks.move_to_end(self.pre)


@contextlib.contextmanager
def paused(*hooks: ModuleHooks | ListenerHooks) -> Iterator[None]:
    """The body's forward passes feed none of these hooks (a probe's own forward)."""
    was = [h.paused for h in hooks]
    for h in hooks:
        h.paused = True
    try:
        yield
    finally:
        for h, flag in zip(hooks, was):
            h.paused = flag


def holds_only(module: nn.Module) -> bool:
    """A module that holds tensors for recording and is never meant to be called (zero-code
    mode's ``LooseParameters``, marked ``computes = False``): its silence says nothing."""
    return getattr(type(module), "computes", True) is False
