"""Grow a transformer without changing what it computes (Gesmundo & Maile 2023).

    grown = stabscope.grow.expand(model, depth="2x", mlp="2x")

The six composable expansions (MLP, head addition, heads, attention, hidden, layers) work on a
family-free view of the model (``params``) that adapters read and write (``adapters``);
``verify`` checks the outputs on probe batches. See docs/grow.md.

The names below are imported on first use: ``sizes`` (parsing and resolving sizes) and
``table`` (the scaling table from run directories) need no torch, and importing them must not
import it through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "find_adapter": "adapters",
    "Growth": "expansion",
    "expand": "expansion",
    "grow_model": "expansion",
    "Fill": "fill",
    "GrowthSpec": "sizes",
    "Shape": "sizes",
    "parse_size": "sizes",
    "resolve": "sizes",
    "Preservation": "verify",
    "compare": "verify",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stabscope.grow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
