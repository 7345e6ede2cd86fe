"""The global gradient norm of a run as the rules read it: before clipping where recorded.

Runs record ``grad_norm`` (module ``__run__``) at every step: the norm before the script's
clip. Older runs have only ``param_grad_norm`` per parameter at the recorded steps, read just
before ``optimizer.step()`` and so after any clip; their global norm is the root-sum-square
over parameters. Either way one value per step.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..store import RUN_MODULE
from .view import Request, RunView

#: What ``grad_norm_rows`` reads (for the rules that plan it).
READS = (Request(("grad_norm",)), Request(("param_grad_norm",)))


def grad_norm_rows(view: RunView) -> pd.DataFrame:
    """``grad_norm`` rows where the run has them, else its ``param_grad_norm`` rows."""
    pre = view.metrics("grad_norm")
    pre = pre[pre.module == RUN_MODULE]
    return pre if not pre.empty else view.metrics("param_grad_norm")


def total_by_step(rows: pd.DataFrame) -> pd.Series:
    """The global norm per step (float, indexed by step, in step order) of ``grad_norm_rows``:
    the value itself, or the root-sum-square of the parameters' norms (NaN when one is)."""
    if rows.empty:
        return pd.Series(dtype=float, index=pd.Index([], name="step"))
    values, steps = rows.value.to_numpy(float), pd.Index(rows.step.to_numpy(), name="step")
    if (rows.metric.astype(str) == "grad_norm").all():
        return pd.Series(values, index=steps).groupby(level=0).first()
    squares = pd.Series(values**2, index=steps).groupby(level=0)
    return np.sqrt(squares.sum().where(squares.count() == squares.size()))
