"""How the ranks' errors of a multi-rank run merge into its meta, on real run directories
written through the store (the torchrun case itself is in tests/test_zerocode_ddp.py): the
earliest error names the run's only where it is another rank's, and a rank error written
after a check makes findings.json stale."""

from __future__ import annotations

import os
import time

import stabscope
from stabscope.rules import check_run, write_findings
from stabscope.store import new_meta, save_meta
from stabscope.store.findings import findings_state
from stabscope.store.rank_errors import write_rank_error, write_rank_fault
from tests.rule_runs import write


def error(kind: str, message: str, at: float) -> dict:
    return {"type": kind, "message": message, "traceback": [], "time": at}


def test_a_knock_on_after_rank_0s_own_interrupt_does_not_make_the_run_failed(tmp_path):
    """Ctrl-C on every rank: rank 0 closes interrupted at t0, rank 1 fails 0.4 s later in its
    next collective. Rank 0's interrupt came first: the run stays interrupted, its error rank
    0's, and rank_errors lists both in order."""
    t0 = time.time()
    meta = new_meta(status="interrupted", rank=0, world_size=2)
    meta["error"] = error("KeyboardInterrupt", "", t0)
    save_meta(tmp_path, meta)
    write_rank_error(tmp_path, 1, "failed", error("RuntimeError", "Connection closed", t0 + 0.4))
    read = stabscope.read_meta(tmp_path)
    assert read["status"] == "interrupted" and read["error"]["type"] == "KeyboardInterrupt"
    assert [(e["rank"], e["type"]) for e in read["rank_errors"]] == [
        (0, "KeyboardInterrupt"),
        (1, "RuntimeError"),
    ]


def test_another_ranks_earlier_failure_is_the_runs_error(tmp_path):
    """Rank 1 raised first; rank 0 then failed in the all-reduce: the run's error is rank 1's."""
    t0 = time.time()
    write_rank_error(tmp_path, 1, "failed", error("ValueError", "bad batch", t0))
    meta = new_meta(status="failed", rank=0, world_size=2)
    meta["error"] = error("RuntimeError", "Connection closed by peer", t0 + 0.2)
    save_meta(tmp_path, meta)
    read = stabscope.read_meta(tmp_path)
    assert read["status"] == "failed"
    assert (read["error"]["rank"], read["error"]["message"]) == (1, "bad batch")


def test_a_rank_error_written_after_the_check_makes_its_findings_stale(tmp_path):
    run = write(tmp_path / "run", [(s, "__run__", "loss", -1, 1.0) for s in range(5)])
    write_findings(run, check_run(run).findings)
    assert findings_state(run) == "current"
    later = time.time_ns() + 10**9  # a second after the check, whatever the clock's grain
    write_rank_error(run, 1, "failed", error("ValueError", "late", time.time()))
    os.utime(run / "error-rank1.json", ns=(later, later))
    assert findings_state(run) == "stale"


def fault(step: int, message: str) -> dict:
    return {"where": "a step boundary", "step": step, "type": "RuntimeError", "message": message}


def test_the_earliest_rank_fault_is_the_runs_tool_error_unless_rank_0_kept_one(tmp_path):
    """Ranks 2 and 1 stopped recording at steps 7 and 3: the run's tool_error is rank 1's
    (the earlier step), its status stays complete, and run-status names the rank. Rank 0's
    own fault, where it kept one, stays the run's."""
    save_meta(tmp_path, new_meta(status="complete", rank=0, world_size=3, steps=10))
    write_rank_fault(tmp_path, 2, fault(7, "late"))
    write_rank_fault(tmp_path, 1, fault(3, "early"))
    read = stabscope.read_meta(tmp_path)
    assert read["status"] == "complete"
    assert (read["tool_error"]["rank"], read["tool_error"]["message"]) == (1, "early")
    (status,) = [f for f in check_run(tmp_path).findings if f.rule == "run-status"]
    assert status.message.startswith("the recording of rank 1 stopped at step 3")
    own = new_meta(status="complete", rank=0, world_size=3, steps=10)
    own["tool_error"] = fault(5, "rank 0's")
    save_meta(tmp_path, own)
    assert stabscope.read_meta(tmp_path)["tool_error"]["message"] == "rank 0's"
