"""``torch.compile`` in a followed script: which modules run compiled, what the run notes
say about them, and what Dynamo did while the script ran (meta.json's ``run.dynamo``)."""

from __future__ import annotations

import sys
from typing import Any

from torch import nn


def compiled_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` that run under ``torch.compile``."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(dynamo, "OptimizedModule", None)
    return [
        name or "<root>"
        for name, m in model.named_modules()
        if (wrapper is not None and isinstance(m, wrapper))
        or getattr(m, "_compiled_call_impl", None) is not None
    ]


COMPILE_NOTE = (
    "torch.compile: modules that run inside compiled code get no activation or gradient "
    "statistics (hooks return at once while Dynamo traces, so they add no graph break); "
    "parameter and gradient norms, update ratios, loss and lr are recorded. "
    "`stabscope profile --no-compile` runs the script's compiled code eagerly and records "
    "everything."
)

EAGER_NOTE = (
    "torch.compile: disabled by --no-compile; the compiled modules ran eagerly and are "
    "recorded like any other"
)


class DynamoCounts:
    """What ``torch.compile`` did while the script ran: Dynamo's counters, before and after.

    ``graph_breaks`` counts every break Dynamo met while tracing (a break in a function
    compiled three times counts three times); ``graph_break_reasons`` are their distinct
    first lines; ``unique_graphs`` the graphs compiled. None when Dynamo did not run."""

    def __init__(self) -> None:
        self._before = self._read()

    @staticmethod
    def _read() -> tuple[dict[str, int], int]:
        utils = sys.modules.get("torch._dynamo.utils")
        counters = getattr(utils, "counters", None)
        if not counters:
            return {}, 0
        return dict(counters["graph_break"]), int(counters["stats"].get("unique_graphs", 0))

    def since_start(self) -> dict[str, Any] | None:
        (breaks, graphs), (breaks_0, graphs_0) = self._read(), self._before
        new = {reason: n - breaks_0.get(reason, 0) for reason, n in breaks.items()}
        new = {reason: n for reason, n in new.items() if n > 0}
        if graphs == graphs_0 and not new:
            return None
        return {
            "graph_breaks": sum(new.values()),
            "graph_break_reasons": sorted({reason.splitlines()[0] for reason in new}),
            "unique_graphs": graphs - graphs_0,
        }
