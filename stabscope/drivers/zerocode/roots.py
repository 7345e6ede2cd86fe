"""Modules called from outside any other module: the candidates for "the model".

Global forward hooks (``register_module_forward_pre_hook`` / ``register_module_forward_hook``)
see every module call. A call that starts while no other module call is running is a *root
call*: the model itself (or its DDP / ``torch.compile`` wrapper), a loss module, a helper.
Which root is the model is decided by the caller (see attach.py), from the optimizers.

Calls are ignored while Dynamo traces (the hooks return before touching any Python state,
so they add no graph break) and during backward (activation-checkpoint recomputation).
"""

from __future__ import annotations

import gc
import re
import sys
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)

from ...record.hook_context import compiling, in_backward
from ...record.module_table import defines_forward, unwrap_model
from .optimizers import parameter_ids


class RootCalls:
    """Calls ``on_root(module)`` at the start of every root call while installed."""

    def __init__(self, on_root: Callable[[nn.Module], None]) -> None:
        self.on_root = on_root
        self.depth = 0  # module calls running now (outside compiled code and backward)
        self._handles: list[Any] = []

    def _pre(self, module: nn.Module, args: Any) -> None:
        if compiling() or in_backward():
            return
        self.depth += 1
        if self.depth == 1:
            self.on_root(module)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        # Also runs when the forward raised (always_call), so the depth stays balanced.
        if compiling() or in_backward():
            return
        self.depth = max(0, self.depth - 1)

    def install(self) -> None:
        if not self._handles:
            self._handles = [
                register_module_forward_pre_hook(self._pre),
                register_module_forward_hook(self._post, always_call=True),
            ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def live_modules() -> list[nn.Module]:
    """Every ``nn.Module`` alive in the process: PyTorch keeps no parent links and no
    registry, so this is one scan of the garbage collector's objects (at the first root call
    only, never per step)."""
    return [obj for obj in gc.get_objects() if _is_module(obj)]


def _size(module: nn.Module, outermost: bool = False) -> tuple[int, int]:
    """Sort key: more parameters first; among equals, the innermost (fewest modules), or with
    ``outermost`` the outermost."""
    modules = sum(1 for _ in module.modules())
    return len(parameter_ids(module)), modules if outermost else -modules


def enclosing_model(module: nn.Module, trained: set[int], live: list[nn.Module]) -> nn.Module:
    """The module that holds ``module`` and the most of the ``trained`` parameters, and none
    that are not trained; ``module`` itself when nothing larger qualifies.

    A root call whose module holds only part of what the optimizers train is a submodule
    reached without its parent's hooks: the script called ``model.forward(x)`` instead of
    ``model(x)``, so the first module the global hooks see is the parent's first child.
    Among equally large candidates the innermost wins, so a container that only adds
    parameter-free helpers around the model does not rename its modules.
    """
    best = module
    for obj in live:
        if obj is module or not parameter_ids(obj) <= trained or _size(obj) <= _size(best):
            continue
        if any(m is module for m in obj.modules()):
            best = obj
    return best


def other_trained_models(
    model: nn.Module, rest: set[int], live: list[nn.Module]
) -> list[nn.Module]:
    """The outermost live modules, outside ``model``, that together hold the ``rest`` of the
    trained parameters: a GAN's discriminator when the generator was called first, a
    decoder trained with an encoder. Modules holding any untrained parameter (a frozen
    teacher, an EMA copy) never qualify; the largest are taken first, so a container of both
    models wins over either of them. Among equally large ones the outermost with a forward
    of its own wins: the discriminator the script calls, not the ``nn.Sequential`` inside
    it that holds the same parameters (a ``ModuleList`` or ``ModuleDict`` is never called)."""
    inside = {id(m) for m in model.modules()}
    candidates = [
        m
        for m in live
        if id(m) not in inside
        and defines_forward(m)
        and (params := parameter_ids(m))
        and params <= rest
    ]
    found: list[nn.Module] = []
    covered: set[int] = set()
    for m in sorted(candidates, key=lambda m: _size(m, outermost=True), reverse=True):
        params = parameter_ids(m)
        if not params & covered:
            found.append(m)
            covered |= params
    return found


def _is_module(obj: object) -> bool:
    # The object's own type, not isinstance: a live ``weakref.proxy`` to a module passes
    # isinstance (it forwards ``__class__``) but is no module (``type(p).forward`` fails), and
    # a dead one raises ReferenceError on any attribute read. type() reads no attribute.
    return issubclass(type(obj), nn.Module)


#: Classes whose name says nothing of which model it is.
GENERIC = frozenset({"Sequential", "Module"})


class TrainedModels(nn.ModuleDict):
    """Several separately called models trained in one script, recorded as one: each under
    its class name in snake case (``generator``, ``discriminator``); where two share a class,
    or the class is generic (``nn.Sequential``), under the script's own variable name for it
    (``user_tower``, ``item_tower``), when a frame of the script holds one. Never called
    itself."""

    def __init__(self, models: list[nn.Module], script: str | None = None) -> None:
        classes = [type(unwrap_model(m)).__name__ for m in models]
        variables = variable_names(models, script)
        names: dict[str, nn.Module] = {}
        for m, cls in zip(models, classes):
            base = re.sub(r"(?<!^)(?=[A-Z])", "_", cls).lower()
            own = variables.get(id(m))
            if (classes.count(cls) > 1 or cls in GENERIC) and own and _free(own, names):
                base = own
            name, k = base, 2
            while name in names:
                name, k = f"{base}_{k}", k + 1
            names[name] = m
        super().__init__(names)


def _free(name: str, taken: dict[str, nn.Module]) -> bool:
    """Whether ``name`` can key a ModuleDict: not taken, and no attribute of one (an
    instance's too: ``training`` is set in ``__init__``)."""
    return name not in taken and not hasattr(nn.ModuleDict(), name) and "." not in name


def variable_names(models: list[nn.Module], script: str | None) -> dict[int, str]:
    """id -> the name the script binds each of ``models`` to: the first variable that holds
    it in the innermost frame of ``script`` on the stack (its locals, then its globals).
    Empty where no frame of the script is running."""
    if script is None:
        return {}
    wanted = {id(m) for m in models}
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename != script:
        frame = frame.f_back
    if frame is None:
        return {}
    found: dict[int, str] = {}
    for scope in (frame.f_locals, frame.f_globals):
        for name, value in scope.items():
            if id(value) in wanted and id(value) not in found and not name.startswith("_"):
                found[id(value)] = name
    return found


def call_unwrapped(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The replay runs the model inside a DDP or ``torch.compile`` wrapper: no collective
    outside the training's own, and a double backward that compiled graphs lack."""
    return unwrap_model(model)(*args, **kwargs)
