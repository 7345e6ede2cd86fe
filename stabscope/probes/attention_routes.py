"""How the attention probe sees an attention module's calls: a TorchFunctionMode, or patched
``torch.nn.functional`` attributes once a module has shown that they suffice.

A TorchFunctionMode sees every torch call inside the module, however the model reached the
function, but every call pays a trip through Python: ~3 µs each, 14 calls in the sample GPT's
attention, and the module's own forward hooks' calls on top (~0.1 ms a layer in a step).
Most attention code calls ``F.scaled_dot_product_attention`` or
``F.multi_head_attention_forward`` through the module attribute, at call time (the sample
models, ``nn.MultiheadAttention``, HF's sdpa attention); replacing those two attributes while
the module runs costs two assignments.

So each attention module's first recorded forward runs with both, and the patch takes over
for that module only if every sampled call went through it. A module whose calls the patch
missed (explicit softmax attention, HF eager, a function imported by name before recording)
keeps the mode for good; a module in which the patch then sees no call at all (its code path
changed) is looked at with the mode again on its next forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..record.hook_context import outside_modes
from ..structure.attention_calls import MHA, SDPA

#: ``sample(func, args, kwargs, out, patched)``: the probe's handler of one intercepted call;
#: returns whether the call was sampled (it was attention).
Sampler = Callable[[Any, tuple, dict, Any, bool], bool]

_MODE, _PATCH = "mode", "patch"

#: Distinct error messages kept (each with its count).
MAX_ERRORS = 10


class _Mode(TorchFunctionMode):
    def __init__(self, routes: AttentionRoutes) -> None:
        super().__init__()
        self.routes = routes

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is self.routes:
            # F.multi_head_attention_forward called by name, before the patch: its
            # torch-function dispatch names the attribute, now the patch. Run the original.
            func = SDPA if func == self.routes._patched_sdpa else MHA
        out = func(*args, **kwargs)
        self.routes.seen(func, args, kwargs, out, patched=False)
        return out


class AttentionRoutes:
    """Interception around attention modules' forwards: ``enter(code)`` in a forward pre-hook,
    ``exit(code)`` in the forward hook (also on exceptions), ``reset()`` at a step's end."""

    def __init__(self, sample: Sampler) -> None:
        self.sample = sample
        # Distinct error messages caught while sampling, with how often each occurred: a
        # failing sample fails at every call of every step, so only the first few are kept.
        self.errors: dict[str, int] = {}
        self._route: dict[int, str] = {}  # module code -> _MODE or _PATCH, once decided
        self._active: list[tuple[int, _Mode | None, list[int]]] = []  # (code, mode, counts)
        self._saved: tuple[Any, Any] | None = None  # the attributes replaced, to restore
        self._thread = 0  # the thread whose forward installed the patch
        self._inside = 0  # > 0 while a patched function runs (its inner calls are its own)

    @property
    def active_code(self) -> int | None:
        """The innermost attention module being run, if any."""
        return self._active[-1][0] if self._active else None

    def enter(self, code: int) -> None:
        if self._saved is None:
            self._saved = (F.scaled_dot_product_attention, F.multi_head_attention_forward)
            self._thread = threading.get_ident()
            F.scaled_dot_product_attention = self._patched_sdpa
            F.multi_head_attention_forward = self._patched_mha
        mode = None
        if self._route.get(code) != _PATCH:
            mode = _Mode(self)
            mode.__enter__()
        self._active.append((code, mode, [0, 0]))  # counts: [through the patch, mode only]

    def exit(self, code: int) -> None:
        while self._active:
            c, mode, (patched, unpatched) = self._active.pop()
            if mode is not None:
                mode.__exit__(None, None, None)
            if unpatched or self._route.get(c) == _MODE:
                self._route[c] = _MODE
            elif patched:
                self._route[c] = _PATCH
            else:
                self._route.pop(c, None)  # nothing seen: look with the mode next time
            if c == code:
                break
        if not self._active:
            self._restore()

    def reset(self) -> None:
        """A forward that raised may leave modes pushed and the patch in place."""
        while self._active:
            mode = self._active.pop()[1]
            if mode is not None:
                mode.__exit__(None, None, None)
        self._restore()

    def _restore(self) -> None:
        if self._saved is not None:
            F.scaled_dot_product_attention, F.multi_head_attention_forward = self._saved
            self._saved = None

    def seen(self, func: Any, args: tuple, kwargs: dict, out: Any, patched: bool) -> None:
        """A call inside an attention module, from the mode or from a patched function."""
        if not self._active or (not patched and self._inside and func in (SDPA, MHA)):
            return  # the patched function around this call samples it
        try:
            if self.sample(func, args, kwargs, out, patched):
                self._active[-1][2][0 if patched else 1] += 1
        except Exception as err:  # a probe must never break the user's forward
            message = f"{type(err).__name__}: {err}"
            if message in self.errors or len(self.errors) < MAX_ERRORS:
                self.errors[message] = self.errors.get(message, 0) + 1

    def _call_patched(self, which: int, func: Any, args: tuple, kwargs: dict) -> Any:
        original = self._saved[which] if self._saved is not None else func
        if self._inside or threading.get_ident() != self._thread or not self._active:
            return original(*args, **kwargs)
        self._inside += 1
        try:
            out = original(*args, **kwargs)
        finally:
            self._inside -= 1
        with outside_modes():
            self.seen(func, args, kwargs, out, patched=True)
        return out

    def _patched_sdpa(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_patched(0, SDPA, args, kwargs)

    def _patched_mha(self, *args: Any, **kwargs: Any) -> Any:
        return self._call_patched(1, MHA, args, kwargs)
