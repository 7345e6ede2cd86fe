"""Sizes of a transformer that the six expansions change, and the requests that change them.

A request is a factor (``"4x"``, ``"1.5x"``, ``2.0``) or an absolute size (``96``, ``"96"``).
The result must be a whole number no smaller than the current size: the expansions only grow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import UsageError

#: A size request: a factor ("2x", 2.0) or an absolute size (96, "96").
Size = int | float | str

#: Where new layers go: spread between the existing ones, all before them, all after them,
#: or (an integer as text) all before the existing layer with that index.
POSITIONS = ("interleave", "start", "end")


@dataclass(frozen=True)
class Shape:
    """The hyper-parameters of Gesmundo & Maile 2023 (Sec. 2): N, h, p, E, k, v.

    ``kv_heads`` is the number of key/value heads (grouped-query attention); it equals
    ``heads`` for ordinary multi-head attention.
    """

    depth: int  # N, transformer layers
    hidden: int  # h, width of the residual stream
    mlp: int  # p, inner width of the MLP
    heads: int  # E, attention (query) heads
    key_dim: int  # k, per-head width of queries and keys
    value_dim: int  # v, per-head width of values
    kv_heads: int  # key/value heads

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class GrowthSpec:
    """What to grow. ``width`` scales hidden, MLP and heads together (head size kept), the
    way model families are widened; an explicit ``hidden``/``mlp``/``heads`` overrides it.
    ``head_dim`` sets ``key_dim`` and ``value_dim`` together."""

    depth: Size | None = None
    width: Size | None = None
    hidden: Size | None = None
    mlp: Size | None = None
    heads: Size | None = None
    head_dim: Size | None = None
    key_dim: Size | None = None
    value_dim: Size | None = None
    position: str = "interleave"
    init: str = "random"
    seed: int = 0

    def with_size(self, axis: str, size: Size) -> GrowthSpec:
        return replace(self, **{axis: size})

    def requested(self) -> dict[str, Size]:
        """The size options that were given, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in SIZE_AXES and getattr(self, f.name) is not None
        }


SIZE_AXES = ("depth", "width", "hidden", "mlp", "heads", "head_dim", "key_dim", "value_dim")


def parse_size(value: Size, current: int, name: str) -> int:
    """The new size for ``name`` given its ``current`` size and a request."""
    factor: float | None = None
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            if text.endswith("x"):
                factor = float(text[:-1])
            else:
                value = int(text)
        except ValueError:
            raise UsageError(
                f"bad size {value!r} for {name}", hint="use a factor like 2x or a size like 96"
            ) from None
    elif isinstance(value, float):
        factor = value
    if factor is not None:
        target = factor * current
        if not math.isfinite(factor):
            raise UsageError(
                f"{name} factor {factor:g} is not a finite number", hint="use a factor like 2x"
            )
        if factor < 1:
            raise UsageError(
                f"{name} factor {factor:g} is below 1",
                hint="the expansions only grow a model; use a factor of at least 1x",
            )
        if abs(target - round(target)) > 1e-9:
            raise UsageError(
                f"{name} {current} x {factor:g} = {target:g} is not a whole number",
                hint=f"choose a factor that gives an integer, or an absolute {name}",
            )
        return round(target)
    size = int(value)
    if size < current:
        raise UsageError(
            f"{name} {size} is smaller than the current {current}",
            hint="the expansions only grow a model; pass a size of at least the current one",
        )
    return size


def resolve(spec: GrowthSpec, base: Shape) -> Shape:
    """The target shape of ``spec`` applied to ``base``."""
    check_position(spec.position)
    if spec.init not in ("random", "copy"):
        raise UsageError(f"unknown --init {spec.init!r}", hint="use random or copy")
    wide = spec.width
    hidden = _pick(spec.hidden, wide, base.hidden, "hidden")
    mlp = _pick(spec.mlp, wide, base.mlp, "mlp")
    heads = _pick(spec.heads, wide, base.heads, "heads")
    key_dim = _pick(spec.key_dim, spec.head_dim, base.key_dim, "key_dim")
    value_dim = _pick(spec.value_dim, spec.head_dim, base.value_dim, "value_dim")
    depth = parse_size(spec.depth, base.depth, "depth") if spec.depth is not None else base.depth
    kv_heads = base.kv_heads
    if base.kv_heads == base.heads:
        kv_heads = heads  # multi-head attention: every new head brings its own keys/values
    elif heads % base.kv_heads:
        raise UsageError(
            f"{heads} heads cannot be split over the model's {base.kv_heads} key/value heads",
            hint=f"grouped-query attention needs a multiple of {base.kv_heads} heads",
        )
    return Shape(depth, hidden, mlp, heads, key_dim, value_dim, kv_heads)


def _pick(own: Size | None, shared: Size | None, current: int, name: str) -> int:
    request = own if own is not None else shared
    return current if request is None else parse_size(request, current, name)


def check_position(position: str) -> None:
    if position in POSITIONS or position.isdigit():
        return
    raise UsageError(
        f"unknown --position {position!r}",
        hint="interleave, start, end, or the index of the layer to insert before",
    )


def describe(base: Shape, grown: Shape) -> str:
    """``depth 2→8, mlp 256→512`` for the sizes that changed."""
    parts = [
        f"{k} {v}→{getattr(grown, k)}"
        for k, v in base.to_dict().items()
        if getattr(grown, k) != v and k != "kv_heads"
    ]
    return ", ".join(parts) or "unchanged"


def as_record(spec: GrowthSpec) -> dict[str, Any]:
    return {**spec.requested(), "position": spec.position, "init": spec.init, "seed": spec.seed}
