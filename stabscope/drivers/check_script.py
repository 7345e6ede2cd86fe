"""``stabscope check SCRIPT``: a short, seeded profile of a model script for the gate to check.

The run goes to ``runs/<script>-check`` (replaced on each check) with a schedule that records
the first ten steps and every fifth after: enough for the rules' early-step verdicts. No
printing: the CLI is told what is about to happen through ``announce``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..record.config import RecorderConfig
from ..record.schedule import Schedule
from ..store.rundir import NestedRunError, RunExistsError, run_dir_error
from .profile import profile_script
from .script import load_script, parse_set

#: Dense over the first steps, where the rules read their early verdicts.
CHECK_SCHEDULE = Schedule(dense=10, every=5)
CHECK_SEED = 0


def check_run_dir(script: Path) -> Path:
    """Where ``check SCRIPT`` records: ``runs/<stem>-check`` under the working directory."""
    return Path("runs") / f"{script.stem}-check"


def profile_for_check(
    script: Path,
    steps: int,
    sets: list[str],
    budget: int | None = None,
    announce: Callable[[str], None] | None = None,
) -> Path:
    """Load ``script`` with the ``--set`` overrides, profile it for ``steps`` (seeded, device
    auto) and return the run directory. ``UsageError`` for a bad script or ``--set``, and when
    another check of the same script holds the directory."""
    loaded = load_script(script, parse_set(sets))
    run_dir = check_run_dir(script)
    if announce is not None:
        announce(f"profiling {script.name} for {steps} steps into {run_dir} (seed {CHECK_SEED})")
    config = RecorderConfig(schedule=CHECK_SCHEDULE)
    try:
        result = profile_script(
            loaded,
            run_dir,
            steps,
            config,
            seed=CHECK_SEED,
            device="auto",
            force=True,
            budget=budget,
        )
    except (RunExistsError, NestedRunError) as e:  # another check of this script is running
        raise run_dir_error(e, run_dir) from None
    return result.run_dir


__all__ = ["CHECK_SCHEDULE", "check_run_dir", "profile_for_check"]
