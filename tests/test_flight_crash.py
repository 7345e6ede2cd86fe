"""A process killed with SIGKILL between two flight-recorder transfers loses at most the steps
of one ring buffer, and every step on disk has all of its flight rows (never a part of one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import stabscope
from tests.conftest import ROOT
from tests.run_children import mlp_until_killed

RING = 5
CHILD = mlp_until_killed(
    """
    # Only step 0 is on the schedule and parts wait for 10**9 rows or 1000 s: what reaches
    # the disk after step 0 is the flight recorder's transfers, one part per ring.
    cfg = RecorderConfig(schedule=Schedule(dense=1, every=0), part_rows=10**9,
                         flush_seconds=1000, flight_every={ring})
    """,
    'f"{{step}} {{rec.writer.parts_written}}"',
)


@pytest.mark.slow
def test_sigkill_between_two_transfers_loses_at_most_one_ring(tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), ring=RING), str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    last = -1
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            last, parts = map(int, line.split())
            if parts >= 5 and last % RING == 3:  # between two transfers
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    df = stabscope.load_run(run_dir)
    flight = df[df.metric.astype(str).str.startswith("flight_")]
    steps = sorted(set(flight.step.tolist()))
    # Steps 1.. up to the last full ring are on disk; the ring being filled is lost, no more.
    assert steps == list(range(1, steps[-1] + 1))
    assert last - steps[-1] <= RING
    # Every step on disk is whole: 6 metrics for each watched module (the MLP's 5 leaves).
    per_step = flight.groupby("step").size()
    assert set(per_step) == {6 * 5}
    # The losses travel with the flight rows: every step that has them has its loss.
    losses = set(df[df.metric == "loss"].step.tolist())
    assert set(steps) <= losses
