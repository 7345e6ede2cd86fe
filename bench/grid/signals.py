"""The failure forecast's inputs on each grid run, cached: the signals at each K% window and
the first error step of every other rule.

    signals_and_errors(runs, untils, out, workers) -> {run key: {until: {...}}}

Per run and window ``until``: ``signals`` (name -> value, stabscope.rules.forecast.signals on
the steps before ``until``) and ``error`` (the first step of an error finding of any rule
but the forecast itself, None when none, or "crash: ..." when the check raised). Cached in
OUT/gate-signals.json per stabscope source version, like the gate's verdicts.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

CACHE = "gate-signals.json"
FORECAST_RULE = "failure-forecast"


def job(args: tuple[str, str, list[int]]) -> tuple[str, dict[str, dict[str, Any]]]:
    from stabscope.rules import check_run
    from stabscope.rules.base import RuleSettings
    from stabscope.rules.forecast import learned_by_the_end, signals
    from stabscope.rules.view import RunView

    key, path, untils = args
    out: dict[str, dict[str, Any]] = {}
    others = RuleSettings(disabled={FORECAST_RULE})
    for until in untils:
        entry: dict[str, Any] = {}
        try:
            errors = [
                f
                for f in check_run(path, settings=others, until=until).findings
                if f.severity == "error"
            ]
            entry["error"] = min((f.step or 0) for f in errors) if errors else None
        except Exception as err:  # a crash is no verdict, counted in the table
            entry["error"] = f"crash: {type(err).__name__}: {err}"[:200]
        try:
            view = RunView.open(path, until)
            entry["signals"] = {k: f.value for k, f in signals(view).items()}
            # The product's rule gives way to the outcome at the planned end (forecast.py).
            seen = until if until is not None else view.meta.steps
            entry["outcome_known"] = learned_by_the_end(view, view.meta.budget, seen) is not None
        except Exception as err:
            entry["signals"] = {}
            entry["signal_error"] = f"{type(err).__name__}: {err}"[:200]
        out[str(until)] = entry
    return key, out


def signals_and_errors(runs: list, untils: list[int], out: Path, workers: int) -> dict:
    from bench.grid.score import source_fingerprint

    cache_file = out / CACHE
    version = source_fingerprint()
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    known = cache.get(version, {})
    todo = [(r.key, str(r.path), untils) for r in runs
            if not all(str(u) in known.get(r.key, {}) for u in untils)]  # fmt: skip
    with ProcessPoolExecutor(workers) as pool:
        for key, found in pool.map(job, todo):
            known.setdefault(key, {}).update(found)
    cache_file.write_text(json.dumps({version: known}, indent=1))
    return known
