"""``grow_model`` / ``expand``: read a model through its family's adapter, apply the
expansions, build a new model. The original is never changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import find_adapter
from .fill import Fill
from .sizes import GrowthSpec, Shape, Size, as_record, describe, resolve
from .transforms import apply_all


@dataclass
class Growth:
    """A grown model and how it came about."""

    model: nn.Module
    family: str
    base: Shape
    shape: Shape
    spec: GrowthSpec
    steps: list[dict[str, Any]] = field(default_factory=list)
    base_params: int = 0
    params: int = 0

    @property
    def summary(self) -> str:
        return describe(self.base, self.shape)

    def record(self) -> dict[str, Any]:
        """JSON-ready: what produced the model (stored in a grown run's meta.json)."""
        return {
            "family": self.family,
            "request": as_record(self.spec),
            "base_shape": self.base.to_dict(),
            "shape": self.shape.to_dict(),
            "params": self.params,
            "base_params": self.base_params,
            "expansions": self.steps,
        }


def grow_model(model: nn.Module, spec: GrowthSpec) -> Growth:
    """Expand ``model`` as ``spec`` asks; see ``expand`` for the keyword form."""
    adapter = find_adapter(model)
    with torch.no_grad():
        view = adapter.read(model)
        base = view.shape
        target = resolve(spec, base)
        adapter.check(model, base, target)
        grown, steps = apply_all(view, target, Fill(spec.init, spec.seed), spec.position)
        new = adapter.build(model, grown)
    params = (sum(p.numel() for p in m.parameters()) for m in (model, new))
    return Growth(new, adapter.family, base, target, spec, steps, *params)


def expand(
    model: nn.Module,
    *,
    depth: Size | None = None,
    width: Size | None = None,
    hidden: Size | None = None,
    mlp: Size | None = None,
    heads: Size | None = None,
    head_dim: Size | None = None,
    key_dim: Size | None = None,
    value_dim: Size | None = None,
    position: str = "interleave",
    init: str = "random",
    seed: int = 0,
) -> nn.Module:
    """A larger copy of ``model`` that computes the same function (Gesmundo & Maile 2023).

    Sizes are factors (``"2x"``, ``2.0``) or absolute (``96``). ``width`` scales hidden, MLP
    and heads together; ``head_dim`` sets key and value sizes together. ``position`` places
    new layers (``interleave``, ``start``, ``end`` or an index); ``init`` chooses the free
    parameters (``random`` or ``copy``, see ``stabscope.grow.fill``).
    """
    spec = GrowthSpec(
        depth, width, hidden, mlp, heads, head_dim, key_dim, value_dim, position, init, seed
    )
    return grow_model(model, spec).model
