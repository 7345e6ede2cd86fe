"""The loss a training script computes outside its model, recorded once and replayed.

The stability index needs the loss on a fixed batch. Zero-code mode replays the model's first
training call (``probe_forward.py``); a model that returns its own loss is then enough. Most
training loops do not: ``logits = model(x)`` and ``loss = F.cross_entropy(logits[:, :-1]
.reshape(-1, V), y.reshape(-1))`` are torch calls in the script. So from the return of the
model's first training call to the first ``backward`` of that step, a ``TorchFunctionMode``
records every torch call (function and arguments) that takes a tensor made from the model's
output or any tensor that requires a gradient (a temperature, an L2 penalty on the weights,
a second call of the model, a side loss the call left on a module). At the backward the
calls the loss depends on are kept as a ``LossTail``: replayed on the probe forward's output
they give the loss of the captured batch.

What keeps the replay honest:

- **Constants.** A tensor the calls took that was not made from the output (the targets, a
  mask) is copied once, detached; a trained leaf (a temperature parameter kept beside the
  model) is kept live, so the index sees its current value. A constant a call changed in
  place (``torch.zeros(()) += ce``) is copied again at each replay.
- **One window.** A second call of the model inside the window (a contrastive loss's other
  view) is recorded through its calls on the trained weights and replayed as recorded (in
  the mode it ran in). A tensor with a gradient history that the model's call left on one of
  its modules (an MoE layer's load-balancing loss kept as ``self.aux``) is read there again
  after the replayed call. Any other constant with a gradient history means the loss
  depends on more than the trace saw: no tail.
- **The output as it was.** A call that writes into the output or a view of it
  (``logits[pad] = 0``) is replayed; the check starts from a copy taken before that first
  write (and only then: the check reads the output itself). A write torch does not see
  (through ``.data`` or a numpy view moves no version counter) changes the output's sum and
  norm, read when the window opens: no tail. A change the trace
  does not see (the version counter moved without a recorded write) means no tail.
- **Checked once.** At the backward the kept calls are replayed on a copy of the real output
  (no gradients, random number generators given back) and must give the script's loss to
  1e-4; a loss made by code the mode cannot see (a value read to Python and used as a
  number, an in-place change through a view) fails the check: no tail.
- **Its precision.** Each call is replayed in the autocast regions it ran in (the standard
  AMP loop computes its loss inside ``torch.autocast`` and calls ``backward`` outside).
- **Its scale.** The loss the script calls ``backward`` on is replayed, unscaled by an AMP
  ``GradScaler`` (the scaler's input is the loss). With gradient accumulation the optimizer
  steps on the sum of the micro-batch losses: the replay is multiplied by the first step's
  count of them (``loss / accum`` per micro-batch replays as the mean loss), the scale a
  model that returns its own loss gives.

The window is the first training step only; the mode is removed at the next optimizer step,
root call or the end of the recording. Calls in it cost a Python dispatch each (microseconds);
their results are the unchanged results of the calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from .hook_context import compiling
from .rng_objects import with_own_copies
from .script_warnings import call_as_script, quiet

#: A trace that records more calls than this is given up (a window that never reaches a backward).
MAX_CALLS = 5000
#: The replayed loss must equal the script's to this relative tolerance.
TOLERANCE = 1e-4
#: Why a loss with a gradient history from outside the trace is not replayed.
NOT_ONE_CALL = (
    "the loss depends on tensors with a gradient history the trace did not see (made before "
    "the model's first training call returned, inside a torch.func transform such as vmap, "
    "or by code outside torch calls)"
)


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A tensor made from the model's output: its slot in the replay's values."""

    slot: int


@dataclasses.dataclass(frozen=True)
class _Fresh:
    """A constant a call changes in place: copied again at each replay."""

    tensor: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Attribute:
    """A tensor the model's call left on one of its modules (an MoE layer's load-balancing
    loss kept as ``self.aux``): read there again after the replayed call."""

    module: nn.Module
    name: str


@dataclasses.dataclass
class _Call:
    """One recorded torch call: ``func`` on its flattened arguments (``_Ref`` for tensors made
    from the output), and the slot of each tensor it returned (or changed in place)."""

    func: Callable[..., Any]
    spec: TreeSpec  # of (args, kwargs)
    leaves: list[Any]
    results: list[tuple[int, int]]  # (index among the result's tensors, slot)
    in_place: int | None = None  # __setitem__: the changed tensor's leaf index
    # A write into a view changes its base too: (the base's slot before, its slot after).
    aliases: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # The autocast regions it ran in, (device type, dtype): replayed in the same ones.
    autocast: tuple[tuple[str, torch.dtype], ...] = ()


class LossTail:
    """The kept calls: ``__call__(output)`` gives the loss of a model output shaped like the
    traced one (None when it is not)."""

    def __init__(self, paths: list[Path], calls: list[_Call], loss_slot: int) -> None:
        self.paths = paths  # of the output's tensors, the replay's first slots
        self.calls, self.loss_slot = calls, loss_slot
        self.factor = 1  # the micro-batch losses per optimizer step (set after the first step)

    def __call__(self, output: Any) -> torch.Tensor | None:
        found = output_tensors(output)
        if [path for path, _ in found] != self.paths:
            return None
        loss = self._run([t for _, t in found])
        return loss if self.factor == 1 else loss * self.factor

    def _run(self, sources: list[torch.Tensor]) -> torch.Tensor:
        with quiet():  # the script's own calls showed their warnings
            return self._replay(sources)

    def _replay(self, sources: list[torch.Tensor]) -> torch.Tensor:
        values: dict[int, Any] = dict(enumerate(sources))
        for call in self.calls:
            leaves = [_value(x, values) for x in call.leaves]
            args, kwargs = tree_unflatten(leaves, call.spec)
            with contextlib.ExitStack() as regions:
                for device, dtype in call.autocast:
                    regions.enter_context(torch.autocast(device, dtype=dtype))
                out = call.func(*args, **kwargs)
            tensors = [leaves[call.in_place]] if call.in_place is not None else _tensors(out)
            for index, slot in call.results:
                values[slot] = tensors[index]
            for before, after in call.aliases:
                values[after] = values[before]
        return values[self.loss_slot]


def _value(leaf: Any, values: dict[int, Any]) -> Any:
    if isinstance(leaf, _Ref):
        return values[leaf.slot]
    if isinstance(leaf, _Fresh):
        return leaf.tensor.clone()
    if isinstance(leaf, _Attribute):
        return getattr(leaf.module, leaf.name)
    return leaf


def _tensors(out: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


Path = tuple[Any, ...]


def output_tensors(output: Any, path: Path = ()) -> list[tuple[Path, torch.Tensor]]:
    """Every tensor in a model's output with its path: through tuples and lists (named or
    not), mappings (a transformers ``ModelOutput``) and dataclasses, which torch's pytree
    does not open unless registered."""
    if isinstance(output, torch.Tensor):
        return [(path, output)]
    if isinstance(output, Mapping):
        items: Iterable[tuple[Any, Any]] = output.items()
    elif isinstance(output, (tuple, list)):
        items = enumerate(output)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = ((f.name, getattr(output, f.name)) for f in dataclasses.fields(output))
    else:
        return []
    return [found for key, value in items for found in output_tensors(value, (*path, key))]


class TailTrace(TorchFunctionMode):
    """Records the torch calls on tensors made from ``output`` until ``finish``; ``open``
    pushes it on torch's mode stack, ``close`` takes it off where it is on top."""

    def __init__(self, output: Any, model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model  # where side results of the call may be kept (``_Attribute``)
        found = output_tensors(output)
        self.paths = [path for path, _ in found]
        sources = [t for _, t in found]
        # id(tensor) -> (its latest slot, a weak reference that tells a reused id): the
        # window's results are not kept alive by the trace (an LM's float copy of its logits
        # would otherwise live until the backward); the output itself is held.
        self._slots: dict[int, tuple[int, weakref.ref[torch.Tensor]]] = {}
        self._count = 0
        self._sources = sources
        for t in sources:
            self._bind(t)
        # The output's values before the window changed any of it in place: the check
        # replays from them. Versions and fingerprints tell a change the trace did not see
        # (a write through ``.data`` or a numpy view moves no version counter).
        self._versions = [_version(t) for t in sources]
        self._prints = [_fingerprint(t) for t in sources]
        self._source_index = {id(t): i for i, t in enumerate(sources)}
        self._before: dict[int, torch.Tensor] = {}  # source index -> copy before a change
        self.calls: list[_Call] = []
        self.failure: str | None = (
            None
            if sources
            else (
                f"the model's output ({type(output).__name__}) holds no tensor in a tuple, list, "
                "mapping or dataclass"
            )
        )
        self.recording = False
        self._pushed = False

    # -- the window ----------------------------------------------------------------------
    def open(self) -> None:
        if self.failure is None and not self._pushed:
            self.__enter__()
            self._pushed = self.recording = True

    def close(self) -> bool:
        """Take the mode off the stack when it is on top; False when it could not be (some
        other mode above it, or inside one of its own calls): try again later."""
        self.recording = False
        if not self._pushed:
            return True
        stack = _get_current_function_mode_stack()
        if not stack or stack[-1] is not self:
            return False
        self.__exit__(None, None, None)
        self._pushed = False
        return True

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if compiling():  # Dynamo tracing a compiled loss in the window: add nothing to its graph
            return func(*args, **kwargs)
        writes = self.recording and _changes_in_place(func, kwargs)
        if writes:
            self._keep_before(args)
        out = call_as_script(func, *args, **kwargs)
        if self.recording:
            try:
                self._record(func, args, kwargs, out, writes)
            except Exception as err:  # the trace must never break the user's step
                self._give_up(f"{type(err).__name__} while recording {_name(func)}")
        return out

    # -- recording -----------------------------------------------------------------------
    def _bind(self, tensor: torch.Tensor) -> int:
        slot, self._count = self._count, self._count + 1
        self._slots[id(tensor)] = (slot, weakref.ref(tensor))
        return slot

    def _slot(self, x: Any) -> int | None:
        """The latest slot of ``x`` when it is a tensor the trace made or was given."""
        entry = self._slots.get(id(x)) if isinstance(x, torch.Tensor) else None
        return entry[0] if entry is not None and entry[1]() is x else None

    def _keep_before(self, args: Any) -> None:
        """Copy each output tensor among ``args``, or whose view is among them, before its
        first change in place (only then: an LM's logits can be gigabytes)."""
        for x in tree_flatten(args)[0]:
            if not isinstance(x, torch.Tensor):
                continue
            for whole in (x, x._base):
                i = self._source_index.get(id(whole))
                if i is not None and i not in self._before:
                    self._before[i] = self._sources[i].detach().clone()

    def _give_up(self, why: str) -> None:
        self.failure = self.failure or why
        self.recording = False
        self.calls, self._slots, self._sources = [], {}, []

    def _record(self, func: Any, args: Any, kwargs: Any, out: Any, writes: bool) -> None:
        """Keep the call when it takes a tensor of the trace or one that requires a gradient;
        ``writes``: it writes into an argument (``_changes_in_place``)."""
        leaves, spec = tree_flatten((args, kwargs))
        refs = [self._slot(x) for x in leaves]
        if all(r is None for r in refs) and not any(map(_differentiable, leaves)):
            return  # nothing the loss's gradient could flow through
        in_place = 0 if func is torch.Tensor.__setitem__ else None
        results = [leaves[0]] if in_place is not None else _tensors(out)
        if not results:
            name = _name(func)
            if name.endswith("_") and not name.endswith("__"):  # changed in place, no result
                self._give_up(f"{name} changes a tensor of the loss in place without a result")
            return  # a read (.item(), .shape, backward): nothing the loss is made of
        if len(self.calls) >= MAX_CALLS:
            self._give_up(f"over {MAX_CALLS} torch calls before the first backward")
            return
        kept = [_Ref(r) if r is not None else x for x, r in zip(leaves, refs)]
        # A generator the call drew from (a random mask in the loss): the replay draws from a
        # copy, never from the script's own (its draws differ from the recorded ones, so the
        # check gives no tail; the script's next draw is the one it would have been).
        kept = with_own_copies(kept)
        for i, x in enumerate(kept):  # a constant a call changes in place: fresh each replay
            if isinstance(x, torch.Tensor) and any(x is t for t in results):
                kept[i] = _Fresh(x)
        slots = [(i, self._bind(t)) for i, t in enumerate(results)]
        aliases = []
        if writes:
            for base in {id(t._base): t._base for t in results if t._base is not None}.values():
                before = self._slot(base)
                if before is not None and not any(base is t for t in results):
                    aliases.append((before, self._bind(base)))
        self.calls.append(_Call(func, spec, kept, slots, in_place, aliases, _autocast()))

    # -- the end -------------------------------------------------------------------------
    def stop(self) -> None:
        """No loss will come: drop what was recorded."""
        self._give_up("no backward on a scalar loss")

    def finish(self, loss: torch.Tensor) -> LossTail | str:
        """The calls ``loss`` depends on, checked by a replay; or why there is no tail."""
        self.recording = False
        try:
            return self._finish(loss)
        finally:
            self._slots, self._sources = {}, []

    def _finish(self, loss: torch.Tensor) -> LossTail | str:
        if self.failure is not None:
            return self.failure
        slot = self._slot(loss)
        if slot is None or slot < len(self.paths):
            return "the loss is not made from the model's output by torch calls"
        calls = _needed(self.calls, slot)
        sources = []
        for i, (version, printed) in enumerate(zip(self._versions, self._prints)):
            before = self._before.get(i)
            now = before if before is not None else self._sources[i]
            moved = before is None and _version(now) != version
            if moved or not _same(_fingerprint(now), printed):
                return "the model's output was changed in place by code the trace does not see"
            # Without a recorded write the replay only reads the output: no copy of it.
            sources.append(now.detach())
        kept_on = _attributes(self.model)
        for call in calls:
            for i, x in enumerate(call.leaves):
                if isinstance(x, (torch.Tensor, _Fresh)):
                    tensor = x.tensor if isinstance(x, _Fresh) else x
                    kept: Any = _constant(tensor)
                    if kept is None:
                        kept = kept_on.get(id(tensor))
                    if kept is None:
                        return NOT_ONE_CALL
                    call.leaves[i] = _Fresh(kept) if isinstance(x, _Fresh) else kept
        tail = LossTail(self.paths, calls, slot)
        return _checked(tail, sources, loss)


def _differentiable(x: Any) -> bool:
    """A tensor the loss's gradient can flow through (a trained weight, a side loss the call
    left on a module): calls on it are recorded like calls on the output."""
    return isinstance(x, torch.Tensor) and x.requires_grad


def _constant(tensor: torch.Tensor) -> torch.Tensor | None:
    """What a replay uses for a tensor not made from the output: a trained leaf itself, a
    copy of anything else; None for a tensor with a gradient history of its own."""
    if tensor.requires_grad:
        return tensor if tensor.is_leaf else None
    return tensor.detach().clone()


def _attributes(model: nn.Module | None) -> dict[int, _Attribute]:
    """id -> where it is kept, for each tensor with a gradient history that a module of
    ``model`` holds as a plain attribute (not a parameter or buffer)."""
    found: dict[int, _Attribute] = {}
    for module in model.modules() if model is not None else ():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                found.setdefault(id(value), _Attribute(module, name))
    return found


def _needed(calls: list[_Call], loss_slot: int) -> list[_Call]:
    """The calls ``loss_slot`` depends on, in their order."""
    wanted, kept = {loss_slot}, []
    for call in reversed(calls):
        made = [slot for _, slot in call.results] + [after for _, after in call.aliases]
        if any(slot in wanted for slot in made):
            kept.append(call)
            wanted.update(x.slot for x in call.leaves if isinstance(x, _Ref))
            wanted.update(before for before, _ in call.aliases)
    return kept[::-1]


def _checked(tail: LossTail, sources: list[torch.Tensor], loss: torch.Tensor) -> LossTail | str:
    """``tail`` when its replay on copies of the real output gives the script's loss."""
    devices = sorted({t.device.index or 0 for t in sources if t.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            got = tail._run(sources)
    except Exception as err:
        said = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        return f"its replay raised {type(err).__name__}" + (f" ({said})" if said else "")
    want = loss.detach()
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return "its replay gives another shape"
    if not torch.allclose(got.float(), want.float(), rtol=TOLERANCE, atol=1e-6, equal_nan=True):
        return (
            f"its replay gives {got.item():.6g}, the script's loss was {want.item():.6g} (a "
            "random loss, dropout in the loop or in a second call of the model, differs at "
            "each replay)"
        )
    return tail


def _autocast() -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast regions active now (the standard AMP loop computes its loss inside one:
    a cross-entropy of bf16 logits runs in float32 there, in bf16 outside)."""
    try:
        return tuple(
            (device, torch.get_autocast_dtype(device))
            for device in ("cpu", "cuda")
            if torch.is_autocast_enabled(device)
        )
    except (AttributeError, TypeError):  # torch < 2.4: one function per device
        regions = []
        if torch.is_autocast_cpu_enabled():
            regions.append(("cpu", torch.get_autocast_cpu_dtype()))
        if torch.is_autocast_enabled():
            regions.append(("cuda", torch.get_autocast_gpu_dtype()))
        return tuple(regions)


def _changes_in_place(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a torch call writes into an argument: ``add_``, ``__setitem__``, ``__iadd__``,
    ``out=``."""
    name = _name(func)
    if name.startswith("__") and name.endswith("__"):
        return name in _WRITING_DUNDERS
    return name.endswith("_") or "out" in kwargs


_WRITING_DUNDERS = frozenset(
    f"__i{op}__"
    for op in (
        *("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow"),
        *("and", "or", "xor", "lshift", "rshift"),
    )
) | {"__setitem__"}


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """(2,) float64 on the tensor's device: its sum and norm (one read each, no host sync)."""
    t = tensor.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    elif not t.is_floating_point():
        t = t.to(torch.float64)  # token ids, masks: small
    norm = torch.linalg.vector_norm(t, dtype=torch.float64)
    return torch.stack((t.sum(dtype=torch.float64), norm))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal fingerprints; NaN equals NaN (a loss of NaN logits is replayed like any)."""
    return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def _version(tensor: torch.Tensor) -> int | None:
    """The version counter (None for an inference tensor, which has none)."""
    return None if tensor.is_inference() else tensor._version


def _name(func: Any) -> str:
    return getattr(func, "__name__", type(func).__name__)


class TailedReplay:
    """A probe forward: ``replay(model)``, then ``tail`` on its output."""

    def __init__(self, replay: Callable[[nn.Module], Any], tail: LossTail) -> None:
        self.replay, self.tail = replay, tail

    def __call__(self, model: nn.Module) -> Any:
        output = self.replay(model)
        loss = self.tail(output)
        return output if loss is None else loss


__all__ = ["MAX_CALLS", "LossTail", "TailTrace", "TailedReplay"]
