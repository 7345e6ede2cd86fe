"""A run killed with SIGKILL mid-training stays readable and loses at most the last part."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import stabscope
from tests.conftest import ROOT
from tests.run_children import mlp_until_killed

CHILD = mlp_until_killed(
    "cfg = RecorderConfig(schedule=Schedule(dense=1, every=1), part_rows=10**9, flush_seconds=0)\n",
    'f"flushed {{rec.writer.parts_written}} {{rec.writer.last_step_written}}"',
)


@pytest.mark.slow
def test_sigkill_loses_at_most_the_last_part(tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    last_flushed_step = -1
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            parts, step = map(int, line.split()[1:])
            last_flushed_step = step
            if parts >= 25:
                break
        os.kill(proc.pid, signal.SIGKILL)  # mid-training, no chance to close anything
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    meta = stabscope.read_meta(run_dir)
    assert meta["status"] == "running"  # never closed: readers see a crashed run as such
    df = stabscope.load_run(run_dir)
    steps = set(df.step.unique().tolist())
    # Every step the child reported as written is there; at most the part after it is lost.
    assert set(range(last_flushed_step + 1)) <= steps
    assert max(steps) <= last_flushed_step + 1
    losses = stabscope.load_run(run_dir, metrics="loss")
    assert len(losses) == losses.step.nunique() >= last_flushed_step + 1
