"""The pieces of the forecast's features (``forecast_features``): a ``Feature``, and the log
ratio of a metric between the first and the last step it was recorded at.

A non-finite input is evidence, never a crash: the feature is +inf and its evidence names
the first non-finite row. NaN means undefined: not recorded, or a trend with fewer than two
recorded steps. A trend leaves out the modules (or heads) whose first value is 0: there is
no growth from nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..store import RUN_MODULE


@dataclass(frozen=True)
class Feature:
    name: str
    value: float  # nan when the run does not have it; +inf for a non-finite input
    evidence: str  # one human line
    step: int | None = None  # the step the evidence is about


def undefined(name: str, why: str) -> Feature:
    return Feature(name, math.nan, why)


def nonfinite(name: str, frame: pd.DataFrame, what: str) -> Feature | None:
    """+inf at the first non-finite row of ``frame``, or None when every value is finite."""
    bad = frame[~np.isfinite(frame.value.to_numpy(float))]
    if bad.empty:
        return None
    row = bad.sort_values("step", kind="stable").iloc[0]
    where = "" if row.module == RUN_MODULE else f" ({row.module})"
    evidence = f"{what} is {row.value} at step {row.step}{where}: +inf"
    return Feature(name, math.inf, evidence, int(row.step))


def ends(per_step: pd.DataFrame, invert: bool = False, floor: float = 0.0) -> pd.DataFrame:
    """Per key of ``per_step`` (columns key, step, value; one row per key and step): the value
    at its first and last step (``first``, ``last``, ``from``, ``to``) and ``log`` =
    log10(last / first), or log10(first / last) with ``invert``; with ``floor``, growth is
    measured from max(first, floor). Keys with one step or a first value of 0 are left out."""
    by_key = per_step.sort_values("step", kind="stable").groupby("key", sort=False)
    out = pd.DataFrame({"first": by_key.value.first(), "last": by_key.value.last(),
                        "from": by_key.step.first(), "to": by_key.step.last()})  # fmt: skip
    out = out[(out["to"] > out["from"]) & (out["first"] != 0)]
    base = np.maximum(out["first"], floor) if floor else out["first"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (base / out["last"]) if invert else (out["last"] / base)
        out["log"] = np.log10(ratio.to_numpy(float))
    return out[~np.isnan(out["log"].to_numpy(float))]


def worst(name: str, found: pd.DataFrame, what: str) -> Feature:
    """The key of ``ends``' result with the largest ``log``, as a feature."""
    if found.empty:
        return undefined(name, f"{what}: fewer than 2 recorded steps")
    key = found["log"].idxmax()
    e = found.loc[key]
    factor = 10 ** e["log"] if np.isfinite(e["log"]) else math.inf
    of = "" if key == "" else f" ({key})"
    return Feature(
        name,
        float(e["log"]),
        f"{what} x{factor:.3g} from step {int(e['from'])} to {int(e['to'])}{of}: "
        f"{e['first']:.3g} -> {e['last']:.3g}",
        int(e["to"]),
    )


def trend(
    name: str,
    frame: pd.DataFrame,
    what: str,
    key: Callable[[pd.DataFrame], pd.Series] = lambda f: f.module,
    agg: str = "max",
    invert: bool = False,
    floor: float = 0.0,
) -> Feature:
    """The largest log ratio (``ends``, from max(first, ``floor``)) of ``frame``'s values over
    ``key`` (the module by default), the values of one key and step combined by ``agg``."""
    if frame.empty:
        return undefined(name, f"{what}: not recorded")
    bad = nonfinite(name, frame, what)
    if bad is not None:
        return bad
    per_step = frame.assign(key=key(frame)).groupby(["key", "step"]).value.agg(agg)
    return worst(name, ends(per_step.reset_index(), invert, floor), what)


def series(name: str, values: pd.Series, what: str) -> Feature:
    """The log ratio of one per-step series (``values`` indexed by step)."""
    return worst(name, ends(values.rename("value").reset_index().assign(key="")), what)


def log10(x: float) -> float:
    """log10 that gives -inf at 0 and NaN below it, without numpy's warnings."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.log10(x))
