"""A full disk never gives a `complete` run, and never ends the training it watches: real
filesystems that run out of space.

The disk is a real tmpfs of a few hundred KiB (mounted here, as root). Where mounting is not
allowed (an unprivileged CI runner) the same child runs under ``RLIMIT_FSIZE`` with SIGXFSZ
ignored instead: the kernel refuses to grow any file past the limit with EFBIG, the closest
real write failure an unprivileged process can get. Both modes run where both are possible.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

import stabscope
from stabscope.store import count_rows
from tests.conftest import ROOT
from tests.run_children import (
    SLOW_MODEL,
    child_env,
    parts_on_disk,
    run_python_child,
    write_script,
)

pytestmark = pytest.mark.slow

#: argv: out, mode (tmpfs|rlimit), when (close: the last flush fails | midrun: a part in the
#: middle of training fails). Prints one JSON line: how the training ended.
CHILD = textwrap.dedent(
    """
    import contextlib, io, json, os, resource, signal, sys, torch, warnings
    sys.path.insert(0, {root!r})
    import stabscope
    import stabscope.store.writer as writer
    from stabscope import RecorderConfig, Schedule
    from tests.conftest import batch_maker, mlp

    out, mode, when = sys.argv[1:4]
    writer.FIRST_FLUSH_SECONDS = 1e9  # parts by size only: what is buffered is known
    part_rows = 10**9 if when == "close" else 4000
    if mode == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # meta.json (~4 KB) fits, a part of 200 steps (~60 KB) does not; midrun parts of
        # 4000 rows (~12 KB) fit until one grows past it.
        limit = 32_000 if when == "close" else 10_000
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    make = batch_maker(6, 3)
    # close: the flight recorder hands its ring over once, at the end (a ring of 50 steps
    # would write a part every 50 steps, each small enough to fit).
    flight_every = 1000 if when == "close" else 50
    cfg = RecorderConfig(
        schedule=Schedule(dense=1, every=1), part_rows=part_rows, flight_every=flight_every
    )

    def fill(leave):
        st = os.statvfs(out)
        with open(os.path.join(out, "..", "filler"), "wb") as f:
            f.write(os.urandom(max(st.f_bavail * st.f_frsize - leave, 0)))

    ended, rec = "returned", None
    warnings.simplefilter("error")  # a test suite's filter: the tool's warning must not raise
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), stabscope.Recorder(model, out, cfg) as rec:
            for step in range(200):
                if mode == "tmpfs" and when == "midrun" and step == 50:
                    fill(1024)  # after the first parts: not even room for meta.json
                x, y = make(step)
                loss = (model(x) - y).pow(2).mean()
                opt.zero_grad(); loss.backward(); opt.step()
                rec.step(loss=loss)
            if mode == "tmpfs":
                fill(16384)  # meta.json fits, the buffered part does not
    except OSError as err:
        ended = f"{{type(err).__name__}}: {{err}}"
    at = rec.step_index if rec else None
    print(json.dumps({{"ended": ended, "at": at, "stderr": said.getvalue()}}))
    """
)


def mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture(params=["tmpfs", "rlimit"])
def disk(request, tmp_path):
    """(mode, directory whose writes run out of space)."""
    mode = request.param
    where = tmp_path / "disk"
    if mode == "tmpfs":
        if not mount_tmpfs(where, "384k"):
            pytest.skip("mounting a tmpfs is not allowed here; the rlimit mode covers it")
        yield mode, where
        subprocess.run(["umount", "-l", str(where)], check=False)
    else:
        where.mkdir()
        yield mode, where


def record_until_full(mode: str, where, when: str) -> tuple[dict, dict]:
    out = where / "run"
    child = run_python_child(CHILD.format(root=str(ROOT)), str(out), mode, when, timeout=300)
    return stabscope.read_meta(out), child


def assert_consistent(run) -> None:
    """meta.json counts exactly the parts on disk, each readable, and nothing half-written
    (no dot-file: no .part-*.tmp, no .meta.json.tmp, no lock of a closed run) is left."""
    meta = stabscope.read_meta(run)
    parts = parts_on_disk(run)
    for part in parts:
        pq.read_table(part)
    assert meta["parts"] == len(parts) and meta["rows"] == count_rows(run)
    assert [p.name for p in run.rglob(".*")] == []


@pytest.mark.parametrize("when", ["close", "midrun"])
def test_a_full_disk_marks_the_run_failed_and_keeps_meta_consistent(disk, when):
    mode, where = disk
    meta, child = record_until_full(mode, where, when)
    reason = "No space left on device" if mode == "tmpfs" else "File too large"
    assert child["ended"] == "returned" and child["at"] == 200  # the training went on
    assert meta["status"] == "failed"  # never `complete` with rows missing
    assert_consistent(where / "run")
    assert reason in meta["error"]["message"] and reason in meta["write_error"]["message"]
    loss = stabscope.load_run(where / "run", metrics="loss")
    steps = sorted(loss.step.tolist())
    assert steps == list(range(len(steps)))  # what is on disk is a prefix of the run
    if when == "close":  # the last flush failed, the first part is kept
        assert steps == [0]
    else:  # a part in the middle of training failed: the run recorded on, unwritten
        assert len(steps) < 200
        if mode == "tmpfs":  # the parts before the disk filled are kept
            assert meta["parts"] >= 2 and len(steps) >= 40
    # Said once, on stderr (the filter turns a warning into an error, so not as a warning).
    assert child["stderr"].count(f"warning: writing the run {where / 'run'} failed") == 1


def test_profile_on_a_full_disk_says_so_in_one_line(disk, tmp_path):
    mode, where = disk
    script = write_script(tmp_path, "fast.py", SLOW_MODEL.replace('"delay": 0.05', '"delay": 0'))
    out = where / "run"

    def small_files():  # in the child, before exec: files stop growing at 8 KB (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    if mode == "tmpfs":  # leave room for meta.json and a few parts, not for 300 steps
        st = os.statvfs(where)
        (where / "filler").write_bytes(os.urandom(max(st.f_bavail * st.f_frsize - 24576, 0)))
    cmd = [sys.executable, "-m", "stabscope", "profile", str(script), "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--steps", "300", "--dense", "300", "-q"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=small_files if mode == "rlimit" else None,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith(f"error: writing the run in {out} failed: ")
    assert lines[-1].startswith("hint: free disk space")
    meta = stabscope.read_meta(out)
    assert meta["status"] == "failed" and "write_error" in meta
    assert_consistent(out)


#: argv: out. A failed run's meta with two long tracebacks; the file size limit sits halfway
#: between what the indented document and the compact one take. Prints the two sizes.
COMPACT_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    sys.path.insert(0, {root!r})
    from stabscope.store.meta import new_meta, save_meta

    out = sys.argv[1]
    frame = '  File "/somewhere/deep/in/a/library/module.py", line 123, in f\\n    g()\\n'
    error = {{"type": "RunWriteError", "message": "File too large",
              "traceback": [frame] * 40 + ["RunWriteError: File too large\\n"]}}
    meta = new_meta(["train.py"], status="failed", error=error, write_error=error,
                    notes=[f"note {{i}}" for i in range(100)])
    full = len(json.dumps(meta, indent=1)) + 1
    compact = len(json.dumps(meta, separators=(",", ":"))) - 2 * 40 * (len(frame) + 3)
    limit = (full + compact) // 2
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    save_meta(out, meta)
    print(json.dumps({{"meta": meta, "limit": limit, "full": full}}))
    """
)


def test_a_meta_that_does_not_fit_is_written_compact(tmp_path):
    """On a disk without room for the indented meta.json, the run still says how it ended:
    every field is kept, only the tracebacks are cut to the line that names the error."""
    out = tmp_path / "run"
    child = run_python_child(COMPACT_CHILD.format(root=str(ROOT)), str(out))
    written = (out / "meta.json").stat().st_size
    assert written <= child["limit"] < child["full"]
    meta, want = stabscope.read_meta(out), child["meta"]
    for key in ("error", "write_error"):
        assert meta[key]["traceback"] == want[key]["traceback"][-1:]
        want[key]["traceback"] = want[key]["traceback"][-1:]
    assert meta == want
