"""The loss of each step: the scalar(s) on which the training script calls ``.backward()``.

There is no global hook on ``backward``, so ``torch.autograd.backward`` (which
``Tensor.backward`` calls) is wrapped while the script runs. A call counts as a loss when
it starts a backward pass (not one nested in another backward, as reentrant activation
checkpointing does) on a single floating tensor with one element and no explicit gradient.
The step's loss is the *sum* of those scalars: with gradient accumulation the optimizer
steps on the sum of the micro-batch gradients, so the sum is the objective that step
descends (``loss / accum_steps`` per micro-batch sums to the mean loss). A step with any
other top-level backward call (a non-scalar output, an explicit gradient, several tensors)
has no loss row rather than a guessed one. Inside ``optimizer.step(closure)`` only the
closure's first backward counts: LBFGS and line searches evaluate the closure again at
trial parameters, and the first evaluation is the loss at the step's parameters (the value
``step`` returns).

AMP: ``GradScaler.scale(loss)`` is wrapped too, and a backward on its result records the
unscaled loss.

A step with no such backward call whose script took the gradient of a floating scalar
w.r.t. parameters with ``torch.autograd.grad`` (and set ``p.grad`` itself: a loop without
``backward``) has that scalar as its loss, the sum where there are several. Where a step has
both, its backward calls are its loss: a gradient penalty's or MAML's inner
``torch.autograd.grad`` is no loss the optimizer descends.

A ``zero_grad`` (an optimizer's or a module's, outside ``optimizer.step()``) throws away the
gradients of the backward calls since the last optimizer step: their losses are dropped too.
A spike guard that skips a bad batch (``loss.backward(); if bad: opt.zero_grad(); continue``)
so leaves the step's loss to the batches the step descends on.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from ...record import grad_calls
from ...record.constant_loss import constant_read, merge_reads
from ...record.hook_context import compiling, in_backward
from ...record.tool_faults import guarded


def weighted_scalars(tensors: Any, grads: Any) -> torch.Tensor | None:
    """Σ w_i · l_i over the floating scalars ``tensors`` (one, or a list) with the weights
    ``grads`` of a ``backward`` call (None, one, or a list, None meaning 1), detached, on the
    first's device, no host sync; None where any is not a floating scalar (a vector's
    backward with a given gradient is no loss)."""
    many = isinstance(tensors, (tuple, list))
    losses = list(tensors) if many else [tensors]
    weights = list(grads) if isinstance(grads, (tuple, list)) else [grads] * len(losses)
    if not losses or len(weights) != len(losses):
        return None
    total = None
    for loss, weight in zip(losses, weights):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return None
        if not loss.is_floating_point():
            return None
        term = loss.detach().reshape(()).float()
        if weight is not None:
            if not isinstance(weight, torch.Tensor) or weight.numel() != 1:
                return None
            term = term * weight.detach().reshape(()).float().to(term.device)
        total = term if total is None else total + term.to(total.device)
    return total


class LossTap:
    """Collects the loss scalars of the current step; ``take()`` ends the step."""

    def __init__(self, before_backward: Callable[[], None] | None = None) -> None:
        # Called at each top-level backward: a point where no optimizer or module hook runs.
        self.before_backward = before_backward
        self._values: list[torch.Tensor] = []
        self._stepped = 0  # how many of _values an optimizer step has used
        self._unclear = False
        # id(scaled loss) -> (weak reference to it, the loss before scaling, and that loss
        # itself, with its graph: weakly)
        self._unscaled: dict[
            int, tuple[weakref.ref[torch.Tensor], torch.Tensor, weakref.ref[torch.Tensor]]
        ] = {}
        # Told of each scalar that counts as a loss, as the graph tensor before AMP scaling.
        self.on_loss: Callable[[torch.Tensor], None] | None = None
        # Told the first loss with its graph once, then dropped (which loss function it is).
        self.on_first_graph: Callable[[torch.Tensor], None] | None = None
        self.steps_without_loss = 0
        # ids of plain tensors the optimizers train, counted as parameters where a gradient
        # is taken with autograd.grad (an optimizer over raw tensors: loose.py)
        self.loose_ids: set[int] = set()
        # The constant prediction's loss of each of this step's losses, read while
        # ``read_constants`` (record/constant_loss.py); the step's sum is ``step_constant``.
        self.read_constants = False
        self._constants: list[torch.Tensor | None] = []
        self.step_constant: torch.Tensor | None = None
        self._originals: tuple[Any, ...] = ()
        self._zeroing: list[tuple[type, Callable[..., Any]]] = []  # (class, its zero_grad)
        self._in_step = False  # inside optimizer.step(): backward comes from a closure
        # An optimizer stepped between two backward calls of this step (a GAN's
        # discriminator then its generator, where another optimizer steps after it).
        self.backward_after_step = False
        # How many of _values each optimizer step of this step had used, in order.
        self._marks: list[int] = []
        self._closure_counted = False
        self._inside_backward = False  # inside the wrapped torch.autograd.backward
        # This step's scalars whose gradient w.r.t. parameters torch.autograd.grad took, and
        # their constant predictions: its loss where it has no backward call.
        self._grad_values: list[torch.Tensor] = []
        self._grad_constants: list[torch.Tensor | None] = []

    def optimizer_step(self, running: bool) -> None:
        """Told by the optimizer step hooks when a step starts (True) and ends (False)."""
        self._in_step, self._closure_counted = running, False
        if not running:
            self._stepped = len(self._values)
            self._marks.append(self._stepped)

    @property
    def before_last_step(self) -> int:
        """How many of this step's losses the optimizer step before the last one had used
        (0: none): where a step ends that is seen to have ended only at the last."""
        return self._marks[-2] if len(self._marks) > 1 else 0

    def zero_grad(self) -> None:
        """Gradients were thrown away: the losses no optimizer step used since are gone."""
        if not self._in_step:  # a closure zeroes its own gradients before each evaluation
            del self._values[self._stepped :]
            del self._constants[self._stepped :]

    @property
    def count(self) -> int:
        """The loss scalars of the current step so far (micro-batches, with accumulation)."""
        return len(self._values)

    def take(self) -> torch.Tensor | None:
        """The step's loss as a 0-d tensor on its device (no host sync), or None."""
        values, unclear, constants = self._values, self._unclear, self._constants
        if not values and not unclear:  # a step trained by torch.autograd.grad alone
            values, constants = self._grad_values, self._grad_constants
        self.clear()
        return self._sum(values, constants, unclear)

    def take_first(self, count: int) -> torch.Tensor | None:
        """The loss of the first ``count`` losses of this step as a step of their own (one
        that ended at an optimizer step seen only later as a step's end: StepOwners); the
        rest stay this step's."""
        values, constants = self._values[:count], self._constants[:count]
        self._values, self._constants = self._values[count:], self._constants[count:]
        self._stepped -= count
        self._marks = [m - count for m in self._marks if m > count]
        return self._sum(values, constants, self._unclear)

    def _sum(
        self, values: list[torch.Tensor], constants: list[torch.Tensor | None], unclear: bool
    ) -> torch.Tensor | None:
        # A step has a constant only where every one of its losses had one.
        read = [c for c in constants if c is not None]
        whole = not unclear and bool(values) and len(read) == len(values)
        self.step_constant = merge_reads(read) if whole else None
        if unclear or not values:
            self.steps_without_loss += 1
            return None
        device = values[0].device
        return torch.stack([v.to(device) for v in values]).sum()

    def clear(self) -> None:
        """Forget the scalars seen since the last step (steps before the model was found)."""
        self._values, self._unclear, self._stepped = [], False, 0
        self._constants, self._marks, self.backward_after_step = [], [], False
        self._grad_values, self._grad_constants = [], []
        self._unscaled.clear()

    def see_backward(self, tensors: Any, grad_tensors: Any) -> None:
        """Note one top-level ``backward`` call."""
        if self._in_step:
            if self._closure_counted:
                return  # the closure again, at trial parameters
            self._closure_counted = True
        if isinstance(tensors, (tuple, list)) and len(tensors) == 1:
            tensors = tensors[0]
        if isinstance(grad_tensors, (tuple, list)) and all(g is None for g in grad_tensors):
            grad_tensors = None
        if grad_tensors is not None or not isinstance(tensors, torch.Tensor):
            # Several scalars at once, or weights given (``backward(gradient=w)``): the
            # objective the gradients are of is Σ w_i · l_i (w_i = 1 where not given).
            objective = weighted_scalars(tensors, grad_tensors)
            if objective is None:
                self._unclear = True
                return
            self._append(objective, None)
            return
        if tensors.numel() != 1 or not tensors.is_floating_point():
            self._unclear = True
            return
        known = self._unscaled.get(id(tensors))
        scaled = known is not None and known[0]() is tensors
        value = known[1] if known is not None and scaled else tensors.detach()
        graph = known[2]() if known is not None and scaled else tensors
        self._append(value, graph)

    def _append(self, value: torch.Tensor, graph: torch.Tensor | None) -> None:
        """One backward call's loss ``value``, and what is read from its ``graph`` (None: a
        sum of several, or weighted: no loss function, no constant prediction read)."""
        if self._stepped > 0:  # an optimizer already stepped in this step
            self.backward_after_step = True
        self._values.append(value.reshape(()).float())
        if self.on_loss is None and self.on_first_graph is None and not self.read_constants:
            return
        if self.read_constants:  # before its backward frees the targets it saved
            self._constants.append(constant_read(graph) if graph is not None else None)
        if graph is None:
            return
        if self.on_loss is not None:
            self.on_loss(graph)
        if self.on_first_graph is not None:
            told, self.on_first_graph = self.on_first_graph, None
            told(graph)

    @guarded("reading the loss in backward()")
    def _read_loss(self, tensors: Any, grad_tensors: Any) -> None:
        """stabscope's part of a top-level backward, before the pass runs: an error of its
        own here stops the recording, never the script's backward (record/tool_faults.py)."""
        if self.before_backward is not None:
            self.before_backward()
        self.see_backward(tensors, grad_tensors)

    @guarded("reading the loss in torch.autograd.grad()")
    def _read_grad(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """An outermost ``torch.autograd.grad`` call, before it runs: a floating scalar's
        gradient w.r.t. parameters, no ``grad_outputs``, is kept as a possible loss."""
        if compiling() or in_backward() or self._in_step:
            return
        if self.before_backward is not None:  # a safe point, as a backward() call is
            self.before_backward()
        outputs = args[0] if args else kwargs.get("outputs")
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
        given = args[2] if len(args) > 2 else kwargs.get("grad_outputs")
        if isinstance(outputs, (tuple, list)) and len(outputs) == 1:
            outputs = outputs[0]
        if isinstance(given, (tuple, list)) and all(g is None for g in given):
            given = None
        inputs = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        if (
            given is not None
            or not isinstance(outputs, torch.Tensor)
            or outputs.numel() != 1
            or not outputs.is_floating_point()
            or not inputs
            or not all(isinstance(p, torch.nn.Parameter) or id(p) in self.loose_ids for p in inputs)
        ):
            return
        self._grad_values.append(outputs.detach().reshape(()).float())
        self._grad_constants.append(constant_read(outputs) if self.read_constants else None)
        if self.on_first_graph is not None:
            told, self.on_first_graph = self.on_first_graph, None
            told(outputs)

    def see_scaled(self, loss: Any, scaled: Any) -> None:
        if isinstance(loss, torch.Tensor) and isinstance(scaled, torch.Tensor):
            self._unscaled[id(scaled)] = (weakref.ref(scaled), loss.detach(), weakref.ref(loss))

    def install(self) -> None:
        """Wrap ``torch.autograd.backward`` and ``GradScaler.scale`` until ``remove()``."""
        if self._originals:
            return
        original_backward = torch.autograd.backward
        original_scale = torch.amp.GradScaler.scale
        self._originals = (original_backward, original_scale)

        def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> Any:
            # Once per call: torch.autograd.backward hands a call on to a TorchFunctionMode
            # (the loss trace of the first step), which calls it again by its module name.
            if not compiling() and not in_backward() and not self._inside_backward:
                self._read_loss(tensors, grad_tensors)
            entered, self._inside_backward = self._inside_backward, True
            try:
                return original_backward(tensors, grad_tensors, *args, **kwargs)
            finally:
                self._inside_backward = entered

        def scale(scaler: Any, outputs: Any) -> Any:
            scaled = original_scale(scaler, outputs)
            self.see_scaled(outputs, scaled)
            return scaled

        torch.autograd.backward = backward  # type: ignore[assignment]
        torch.amp.GradScaler.scale = scale  # type: ignore[method-assign]
        # Before the script's own imports run: `from torch.autograd import grad` at its top
        # then binds the counting wrapper, so a gradient penalty's pass is told apart.
        grad_calls.watch()
        grad_calls.listen(self._read_grad)
        for owner in _ZEROING:
            original = owner.zero_grad
            self._zeroing.append((owner, original))
            owner.zero_grad = self._zeroing_wrapper(original)  # type: ignore[method-assign]

    def _zeroing_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            self.zero_grad()
            return original(*args, **kwargs)

        return zero_grad

    def remove(self) -> None:
        if self._originals:
            torch.autograd.backward, torch.amp.GradScaler.scale = self._originals  # type: ignore[method-assign]
            self._originals = ()
            grad_calls.unwatch()
            grad_calls.unlisten(self._read_grad)
        while self._zeroing:
            owner, original = self._zeroing.pop()
            owner.zero_grad = original  # type: ignore[method-assign]


#: The classes whose ``zero_grad`` throws gradients away (subclasses that do not override it
#: inherit the wrapper).
_ZEROING = (torch.optim.Optimizer, torch.nn.Module)
