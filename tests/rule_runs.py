"""Runs for the rules, written through the real store: rows ``(rank, step, module, metric,
index, value)`` (or without the rank, for rank 0), phase train, call 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stabscope.rules import check_run, settings_from_mapping
from stabscope.rules.base import CheckResult
from stabscope.store import PartWriter, new_meta, save_meta


def write(run_dir: Path, rows: list[tuple], **meta: Any) -> Path:
    """A complete run of ``rows``, one writer per rank; ``meta`` adds to meta.json."""
    save_meta(run_dir, new_meta(status="complete", **meta))
    rows = [r if len(r) == 6 else (0, *r) for r in rows]
    for rank in sorted({r[0] for r in rows}):
        w = PartWriter(run_dir, rank=rank)
        mine = [r for r in rows if r[0] == rank]
        w.append(
            np.array([r[1] for r in mine]),
            np.full(len(mine), w.phases("train")),
            np.array([w.modules(r[2]) for r in mine]),
            np.zeros(len(mine)),
            np.array([w.metrics(r[3]) for r in mine]),
            np.array([r[4] for r in mine]),
            np.array([r[5] for r in mine]),
        )
        w.flush()
    return run_dir


def checked(run_dir: Path, until: int | None = None, **settings: Any) -> CheckResult:
    """Every rule on the run; none may have raised."""
    result = check_run(run_dir, settings_from_mapping(settings) if settings else None, until)
    assert result.failed == {}, result.failed
    return result


def post_ln_structure(blocks: list[str], placement: str = "post") -> dict[str, Any]:
    """meta.json's ``structure`` of a Post-LN stack (or of another ``placement``): one branch
    per block, its norm ``.ln``."""
    branch = {"kind": "other", "placement": placement, "alpha": 1.0}
    return {
        "recognised": True,
        "blocks": [
            {
                "name": b,
                "stack": "",
                "placement": placement,
                "alpha": 1.0,
                "branches": [{**branch, "name": b, "output": b, "norm": f"{b}.ln"}],
            }
            for b in blocks
        ],
    }
