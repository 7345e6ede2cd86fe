"""The files of a run directory: every name a reader or writer of a run uses, in one place.

    RUN/
      meta.json          what the run is and how it ended (store/meta.py writes it)
      parts/part-NNNNNN.parquet   the long table, one part per flush (store/writer.py)
      findings.json      the rules' findings (``stabscope check``, rules/gate.py)
      prediction.json    the theory's profile at init (theory/prediction.py)
      error-rankR.json   how rank R (> 0) of a multi-rank run failed (store/rank_errors.py)
      .lock              the live writer's flock (store/lock.py)
      .reserve           disk space held for the last meta.json (store/atomic.py)

Creating a run directory, refusing one that holds a run, and keeping outputs out of runs is
``store/rundir.py``; this module only names things and imports nothing.
"""

from __future__ import annotations

META_FILE = "meta.json"
PARTS_DIR = "parts"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
FINDINGS_FILE = "findings.json"
#: The theory owns its file format and name (theory/prediction.py, which does not import the
#: store); tests/test_store_layout.py keeps the two names the same.
PREDICTION_FILE = "prediction.json"
#: ``error-rank1.json``: rank 1's error, where only rank 0 writes meta.json.
RANK_ERROR_PREFIX = "error-rank"
#: ``fault-rank1.json``: stabscope's own error that stopped rank 1's recording.
RANK_FAULT_PREFIX = "fault-rank"
LOCK_FILE = ".lock"
RESERVE_FILE = ".reserve"


def rank_error_name(rank: int) -> str:
    """File name of rank ``rank``'s error (``error-rank1.json``)."""
    return f"{RANK_ERROR_PREFIX}{rank}.json"


def rank_fault_name(rank: int) -> str:
    """File name of rank ``rank``'s tool fault (``fault-rank1.json``)."""
    return f"{RANK_FAULT_PREFIX}{rank}.json"


def part_name(number: int) -> str:
    """File name of part ``number`` (``part-000042.parquet``)."""
    return f"{PART_PREFIX}{number:06d}{PART_SUFFIX}"


__all__ = [
    "FINDINGS_FILE",
    "LOCK_FILE",
    "META_FILE",
    "PARTS_DIR",
    "PART_PREFIX",
    "PART_SUFFIX",
    "PREDICTION_FILE",
    "RANK_ERROR_PREFIX",
    "RANK_FAULT_PREFIX",
    "RESERVE_FILE",
    "part_name",
    "rank_error_name",
    "rank_fault_name",
]
