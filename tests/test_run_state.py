"""What readers make of a run that never closed: a process killed with SIGKILL is `killed` in
`check` (which fails on it unless --allow-incomplete), `summary` and `report`; one written on
another host is `unfinished`. And the first part of a run reaches the disk within seconds."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app
from stabscope.report.build import build_report
from stabscope.store import PartWriter
from stabscope.store.rundir import run_state
from tests.conftest import batch_maker, mlp, train
from tests.run_children import parts_on_disk, start_library_writer, wait_for

runner = CliRunner()


def run_status(out, *args: str) -> tuple[int, dict]:
    res = runner.invoke(app, ["check", str(out), "--format", "json", *args])
    (finding,) = [f for f in json.loads(res.stdout)["findings"] if f["rule"] == "run-status"]
    return res.exit_code, finding


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A library Recorder killed with SIGKILL after 8 steps: status `running`, no writer."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = start_library_writer(out, "with", wait_at=8)
    try:
        wait_for(lambda: proc.stdout.readline().startswith("waiting"), what="8 steps")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    return out


@pytest.mark.slow
def test_a_killed_run_fails_the_gate_unless_incomplete_runs_are_allowed(killed_run):
    meta = stabscope.read_meta(killed_run)
    assert meta["status"] == "running" and (killed_run / ".lock").exists()  # left by the kill
    state = run_state(killed_run, meta)
    assert state.status == "killed" and f"pid {meta['pid']} on this host" in state.detail
    code, finding = run_status(killed_run)
    assert code == 1 and finding["severity"] == "error"
    assert "incomplete: killed: status running" in finding["message"]
    code, finding = run_status(killed_run, "--allow-incomplete")
    assert finding["severity"] == "warning"
    table = runner.invoke(app, ["check", str(killed_run)])
    assert table.exit_code == 1 and "killed" in table.stderr


@pytest.mark.slow
def test_summary_and_report_say_killed(killed_run, tmp_path):
    res = runner.invoke(app, ["summary", str(killed_run)])
    assert res.exit_code == 0, res.output
    first = res.stderr.splitlines()[0]
    assert "killed" in first and "running" not in first
    assert "its writer (pid" in res.stderr
    result = build_report([killed_run], tmp_path / "r.html")
    assert any("killed: status running" in w for w in result.warnings)
    assert 'class="status status-killed"' in (tmp_path / "r.html").read_text()


@pytest.mark.slow
def test_a_run_left_running_on_another_host_is_unfinished(killed_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "parts").mkdir()
    for part in parts_on_disk(killed_run):
        (copy / "parts" / part.name).write_bytes(part.read_bytes())
    meta = stabscope.read_meta(killed_run)
    meta["host"] = "a-training-node"  # as synced from the node that wrote it, no lock file
    (copy / "meta.json").write_text(json.dumps(meta))
    state = run_state(copy, meta)
    assert state.status == "unfinished" and "written on a-training-node" in state.detail
    code, finding = run_status(copy)
    assert code == 1 and finding["severity"] == "error"


def test_a_closed_run_is_what_its_status_says(tmp_path):
    with stabscope.Recorder(mlp(), tmp_path / "ok") as rec:
        train(rec.model, 3, batch_maker(6, 3), rec=rec)
        live = run_state(rec.run_dir, stabscope.read_meta(rec.run_dir))
        assert live.status == "running" and "still running" in live.detail  # this process
    meta = stabscope.read_meta(tmp_path / "ok")
    assert run_state(tmp_path / "ok", meta).status == "complete"


@pytest.mark.slow
def test_the_first_part_is_written_within_seconds_not_flush_seconds(tmp_path):
    writer = PartWriter(tmp_path, flush_seconds=30.0)

    codes = [writer.phases("train"), writer.modules("m"), 0, writer.metrics("x"), -1]

    def rows(step):
        writer.append([step] * 10, *([c] * 10 for c in codes), [float(step)] * 10)

    rows(0)
    assert writer.parts_written == 0
    time.sleep(1.05)  # the first interval: one second
    rows(1)
    assert writer.parts_written == 1 and len(parts_on_disk(tmp_path)) == 1
    time.sleep(1.05)  # the interval doubled to two seconds
    rows(2)
    assert writer.parts_written == 1
    time.sleep(1.0)
    rows(3)
    assert writer.parts_written == 2


def test_the_first_recorded_step_is_on_disk_and_counted_in_meta(tmp_path):
    with stabscope.Recorder(mlp(), tmp_path / "r") as rec:
        train(rec.model, 1, batch_maker(6, 3), rec=rec)
        meta = stabscope.read_meta(rec.run_dir)
        assert len(parts_on_disk(rec.run_dir)) == 1 == meta["parts"]
        assert meta["rows"] == stabscope.store.count_rows(rec.run_dir) > 0
