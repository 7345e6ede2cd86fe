"""A recorded run in a notebook: ``stabscope.open_run(path)`` returns a ``Run`` with its
table, meta, findings, the report's figures and a rich display. No torch."""

from .run import Run, open_run

__all__ = ["Run", "open_run"]
