"""Extra forward passes on the user's model that leave its training exactly as it was.

Structure discovery, the model-update probe and the theory's description each run the user's
``forward`` once more, in eval mode. ``model.eval()`` then ``model.train(was_training)`` would
put every submodule back into the *root's* mode: a BatchNorm the user froze (``bn.eval()``) or
a dropout switched off would train again for good, and a module's own ``train()`` override
(a LoRA layer that merges its weights on ``eval()``) would run. So ``side_forward``:

- sets each submodule's ``training`` flag to False directly and gives each its own flag back
  (no ``train()``/``eval()`` call, so no override runs);
- restores the random number generators the pass may draw from (torch's CPU and CUDA, Python's
  ``random``, numpy's global one, and the generator objects a module holds as attributes
  or the pass is handed in ``inputs``: a masked autoencoder's own mask generator,
  ``rng_objects.py``): the user's next dropout mask is the one it would have been;
- gives back every buffer the pass replaced or changed in place: each is rebound by identity
  and its value copied back from a copy taken before. Not only where its version counter
  moved: a fused kernel may write a buffer without bumping it (quantization-aware training's
  ``FusedMovingAvgObsFakeQuantize`` updates its observer's min/max and its scale so, and
  observes in eval mode too, by its own ``observer_enabled`` flag);
- gives back each module's plain attributes the pass rebound or added (a counter the forward
  increments, ``self.calls += 1``, to anneal a temperature; a tensor it keeps, ``self.last =
  x``): by identity, so a value changed in place inside a non-buffer tensor is not seen.
  State outside the modules (a global counter) is not either.

Gradient mode is the caller's: most passes run under ``no_grad``, the description takes one
gradient with ``autograd.grad`` (no parameter's ``.grad`` is touched).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .rng_objects import held_by, restore, rngs_in, state_of


@contextlib.contextmanager
def side_forward(*models: nn.Module, keep_modes: bool = False, inputs: Any = ()) -> Iterator[None]:
    """Run the body with every submodule of ``models`` in eval mode (``keep_modes``: in the
    modes they are in, e.g. to replay a training forward); afterwards each module's
    ``training`` flag, the RNG states (the generators in ``inputs`` too), the buffers and the
    weights of embeddings that renormalise in forward (``max_norm``) are what they were
    before."""
    modules = list({id(m): m for model in models for m in model.modules()}.values())
    generators = {id(g): g for g in (*held_by(modules), *rngs_in(inputs))}.values()
    generator_states = [(g, state_of(g)) for g in generators]
    flags = [m.training for m in modules]
    # (module, name, tensor, copy): every buffer, to give back by identity and value. An
    # inference tensor (no copy) cannot change outside inference mode.
    buffers = [
        (m, name, b, None if b.is_inference() else b.detach().clone())
        for m in modules
        for name, b in m._buffers.items()
        if isinstance(b, torch.Tensor)
    ]
    # An embedding with ``max_norm`` renormalises the rows it looks up in place, in forward
    # (``torch.embedding_renorm_``): its weight is given back too, where it changed.
    renormed = [
        (m.weight, m.weight._version, m.weight.detach().clone())
        for m in modules
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    ]
    attributes = [(m, _plain(m)) for m in modules]  # (module, {name: value}) for each
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=_cuda_devices(models)):
            for m in modules:
                m.training = m.training and keep_modes
            yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag
        with torch.no_grad():
            for m, name, b, saved in buffers:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                if saved is not None:  # every one: a kernel may write without a bump
                    if b.shape != saved.shape:
                        b.resize_(saved.shape)
                    b.copy_(saved)
            for weight, version, saved in renormed:
                if weight._version != version:
                    weight.copy_(saved)
        for m, before in attributes:
            _give_back(m, before)
        random.setstate(py_state)
        np.random.set_state(np_state)
        for g, state in generator_states:
            restore(g, state)


def _plain(module: nn.Module) -> dict[str, Any]:
    """The module's own attributes outside torch's bookkeeping (no leading underscore: its
    parameters, buffers, submodules and hooks live in underscored dicts), but ``training``,
    which ``side_forward`` gives back itself."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def _give_back(module: nn.Module, before: dict[str, Any]) -> None:
    """Rebind what the pass rebound, and drop what it added, of ``_plain(module)``."""
    now = _plain(module)
    for k, v in before.items():
        if now.get(k, _MISSING) is not v:
            setattr(module, k, v)
    for k in now.keys() - before.keys():
        delattr(module, k)


_MISSING = object()


def _cuda_devices(models: tuple[nn.Module, ...]) -> list[int]:
    """The CUDA devices holding the models' tensors: their generators are saved and restored."""
    tensors = [t for model in models for t in (*model.parameters(), *model.buffers())]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


__all__ = ["side_forward"]
