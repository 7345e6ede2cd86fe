"""The ``stabscope`` command: parse, call the library, print, exit.

One module per command; each decorates its command onto ``app`` (cli/common.py) when
imported, and the import order below is the order of ``stabscope --help``.
Exit codes: 0 success, 1 the gate found problems, 2 bad input (one line with a hint).
Human-readable output goes to stderr; data goes to stdout or ``--output``.
"""

from __future__ import annotations

from .common import app

# isort: off
from . import profile  # noqa: F401  (first: it leads --help)
from . import summary, report, inspect, check  # noqa: F401
from . import grow, predict, export  # noqa: F401
# isort: on


def main() -> None:
    """Console entry point."""
    app()


__all__ = ["app", "main"]
