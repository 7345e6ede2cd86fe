"""Telling a model script from a training script without running either.

A model script defines ``model``, ``batches`` and ``loss`` at its top level (see
``stabscope.drivers.script``). Importing a file to find out would run an unguarded training script's
loop, so the decision reads the source: names bound at the top level by ``def``, ``class``,
an assignment or an import count as defined.
"""

from __future__ import annotations

from pathlib import Path

# The source reading lives with the model-script convention it reads.
from ..script import missing_entry_points, top_level_names

__all__ = ["follows_model_script_convention", "missing_entry_points", "top_level_names"]


def follows_model_script_convention(path: str | Path) -> bool:
    """Whether ``path`` defines every required entry point of a model script."""
    return not missing_entry_points(path)
