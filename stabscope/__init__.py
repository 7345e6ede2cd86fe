"""stabscope: stability diagnostics for PyTorch models, transformers first.

The recording side (``Recorder``) imports torch; the reading side (``load_run``,
``read_meta``, ``open_run`` for notebooks) does not, so reports and CI gates run where no
GPU stack is installed.
"""

from __future__ import annotations

from typing import Any

from .errors import OptionError, RunExistsError
from .store import RUN_MODULE, SCHEMA_VERSION, MetaError, NotARunError, load_run, read_meta
from .version import __version__

_LAZY = {
    "Run": ("stabscope.notebook", "Run"),
    "open_run": ("stabscope.notebook", "open_run"),
    "Recorder": ("stabscope.record.recorder", "Recorder"),
    "RecorderConfig": ("stabscope.record.config", "RecorderConfig"),
    "Schedule": ("stabscope.record.schedule", "Schedule"),
}

__all__ = [
    "RUN_MODULE",
    "SCHEMA_VERSION",
    "MetaError",
    "NotARunError",
    "OptionError",
    "Recorder",
    "RecorderConfig",
    "Run",
    "RunExistsError",
    "Schedule",
    "__version__",
    "load_run",
    "open_run",
    "read_meta",
]


def __getattr__(name: str) -> Any:
    # Torch-side names are imported on first use so `import stabscope` stays torch-free,
    # and the notebook's Run (rules, report, plotly) only when a notebook asks for it.
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'stabscope' has no attribute {name!r}")
