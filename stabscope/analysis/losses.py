"""The run's loss rows, read for what they say about divergence (the ``nonfinite`` rule and
``stabscope summary`` both ask when the loss first went NaN/Inf)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..store import RUN_MODULE


def first_nonfinite_loss(loss: pd.DataFrame) -> tuple[int, float] | None:
    """The first step whose loss (of the ``loss`` rows given) was NaN or Inf, and that value."""
    loss = loss[(loss.metric == "loss") & (loss.module == RUN_MODULE)].sort_values("step")
    bad = loss[~np.isfinite(loss.value.to_numpy(float))]
    return None if bad.empty else (int(bad.step.iloc[0]), float(bad.value.iloc[0]))
