"""Every optimizer the training script constructs, and which of them train a module.

PyTorch has global hooks on ``optimizer.step()`` but none on construction, and the model has
to be known before its first forward pass (step 0 is the step that shows an init problem).
So ``Optimizer.__init__`` is wrapped while the script runs: every optimizer, built-in or
a subclass calling ``super().__init__``, is seen as soon as it exists. The wrapper only keeps
a weak reference and is removed when the script ends.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ...record.weak_optimizers import WeakOptimizers


def trained_parameter_ids(optimizer: Optimizer) -> set[int]:
    """ids of the tensors in the optimizer's param groups (read now: groups can be added)."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def parameter_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


class OptimizerTracker:
    """Weak references to the optimizers alive in the script, in order of construction."""

    def __init__(self) -> None:
        self._built = WeakOptimizers()
        self._original_init: Any = None
        self.constructed = 0  # optimizers built while installed
        #: ids of the parameters any optimizer held when built: read at the script's end,
        #: when the optimizers of its loop may already be freed.
        self.held_when_built: set[int] = set()

    def add(self, optimizer: Optimizer) -> None:
        self._built.add(optimizer)
        self.held_when_built |= trained_parameter_ids(optimizer)

    def alive(self) -> list[Optimizer]:
        return list(self._built.alive().values())

    def training(self, params: set[int]) -> list[Optimizer]:
        """The live optimizers that update at least one of ``params``."""
        return [opt for opt in self.alive() if trained_parameter_ids(opt) & params]

    def ever_held(self, params: set[int]) -> bool:
        """Whether an optimizer held any of ``params``, when built or now (alive)."""
        return bool(params & self.held_when_built) or bool(self.training(params))

    def install(self) -> None:
        """Wrap ``Optimizer.__init__`` so that every new optimizer is added, until ``remove()``."""
        if self._original_init is not None:
            return
        original = self._original_init = Optimizer.__init__
        tracker = self

        @functools.wraps(original)
        def init(self: Optimizer, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            tracker.constructed += 1
            tracker.add(self)

        Optimizer.__init__ = init  # type: ignore[method-assign]

    def remove(self) -> None:
        if self._original_init is not None:
            Optimizer.__init__ = self._original_init  # type: ignore[method-assign]
            self._original_init = None


class StepOwners:
    """The optimizers that train the model (its *owners*), and where a step ends: once every
    owner has stepped since the last step ended. An optimizer that starts training the
    model's parameters later joins; an owner that steps twice before another stepped at all
    drops the silent one (it is not training)."""

    def __init__(
        self, owners: list[Optimizer], model_params: set[int], model: nn.Module | None = None
    ) -> None:
        # Weakly: an optimizer the script replaced (a new one each step, or once to change its
        # settings) is freed, and a step no longer waits for it.
        self._owners = WeakOptimizers(owners)
        self.model_params = model_params
        # The model, to read its parameters again for an optimizer over none of those it
        # had (adapters put into it later: LoRA); ids of optimizers found outside it.
        self._model = model
        self._outside: set[int] = set()
        self._stepped: set[int] = set()  # owners that stepped since the last step ended
        # The parameters the owners of the current training phase train, and of each owner
        # that joined since (by id) the step it joined at and the parameters it trains: a
        # phase ends where only joiners that train other parameters are left (``new_phase``).
        self._phase_params = set().union(*(trained_parameter_ids(o) for o in owners))
        self._joined: dict[int, tuple[int, set[int]]] = {}
        # The last optimizer step was an owner's second since the last step's end (the
        # owners that never stepped were dropped then): the step had ended already, at
        # the optimizer step before it (attach.py ends it there).
        self.repeated = False

    @property
    def names(self) -> dict[int, str]:
        """The live owners' class names, by id."""
        return {key: type(o).__name__ for key, o in self._owners.alive().items()}

    def _trains_the_model(self, optimizer: Optimizer) -> bool:
        """Whether ``optimizer`` trains parameters of the model: those it had when found, or
        those it holds now (read once per optimizer: adapters put into its modules later)."""
        trained = trained_parameter_ids(optimizer)
        if trained & self.model_params:
            return True
        if self._model is None or id(optimizer) in self._outside:
            return False
        now = parameter_ids(self._model)
        if not trained & now:
            self._outside.add(id(optimizer))
            return False
        self.model_params = self.model_params | now  # the parameters that joined it
        return True

    def owns(self, optimizer: Optimizer) -> bool:
        """Whether ``optimizer`` is one of the live owners."""
        return optimizer in self._owners

    def stepped(self, optimizer: Optimizer, step: int) -> bool:
        """Note that ``optimizer`` stepped in the run's step ``step``; whether that ended a
        step of the model."""
        key = id(optimizer)
        self.repeated = False
        if optimizer not in self._owners:
            if not self._trains_the_model(optimizer):
                return False
            self._stepped.discard(key)  # a freed owner's id, now another optimizer's
            self._owners.add(optimizer)
            self._joined[key] = (step, trained_parameter_ids(optimizer))
        if key in self._stepped:
            self._owners.keep(self._stepped)
            # The owners left behind never stepped: the step had ended before this one.
            self.repeated = True
            self._stepped.clear()
        self._stepped.add(key)
        owners = self._owners.alive().keys()
        self._stepped &= owners  # the freed owners dropped
        if self._stepped >= owners:
            self._stepped.clear()
            return True
        return False

    def new_phase(self) -> tuple[int, list[int]] | None:
        """Where a new training phase began, once: the step the first of its owners joined
        at (an owner left alive but silent is dropped only at a joiner's second step), and
        their ids. A phase begins where every owner of the phase before is gone (freed, or
        dropped for not stepping) and those left joined since and train other parameters (a
        fine-tune's optimizer over adapters after a pretraining's over the whole model).
        None otherwise; an optimizer rebuilt over the same parameters (to change its
        settings, or every step) continues the phase."""
        owners = set(self._owners.alive())
        self._joined = {k: v for k, v in self._joined.items() if k in owners}  # the freed gone
        if not owners or not owners <= self._joined.keys():
            return None
        joined = [self._joined.pop(k) for k in owners]
        params = set().union(*(p for _, p in joined))
        began = params != self._phase_params
        self._phase_params = params
        return (min(s for s, _ in joined), sorted(owners)) if began else None
