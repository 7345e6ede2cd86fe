"""SIGTERM and SIGINT close a run: real signals sent to real processes (`stabscope profile` on
a model script and on a training script, and the library Recorder), and which handlers the
Recorder takes in a user's process."""

from __future__ import annotations

import json
import signal
import threading

import pytest
import torch
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app
from stabscope.store import count_rows
from stabscope.store.rundir import run_state
from tests.conftest import batch_maker, mlp, train
from tests.run_children import (
    ENDLESS_TRAINING,
    SLOW_MODEL,
    parts_on_disk,
    start_library_writer,
    start_profile,
    wait_for,
    write_script,
)

runner = CliRunner()
SIGNALS = [signal.SIGTERM, signal.SIGINT]


def run_status_finding(out, *args: str) -> tuple[int, dict]:
    """Exit code of `check --format json` and its run-status finding."""
    res = runner.invoke(app, ["check", str(out), "--format", "json", *args])
    doc = json.loads(res.stdout)
    (finding,) = [f for f in doc["findings"] if f["rule"] == "run-status"]
    return res.exit_code, finding


def assert_closed_by(out, sig: int) -> dict:
    """The run is `interrupted` by ``sig``, every step taken is on disk, meta.json counts the
    parts on disk, and the writer's lock and reserve are gone."""
    meta = stabscope.read_meta(out)
    assert meta["status"] == "interrupted"
    assert meta["interrupted_by"] == signal.Signals(sig).name
    assert meta["rows"] == count_rows(out) and meta["parts"] == len(parts_on_disk(out))
    loss = stabscope.load_run(out, metrics="loss")
    assert sorted(loss.step.tolist()) == list(range(meta["steps"]))  # buffered rows flushed
    assert meta["steps"] >= 3
    assert [p.name for p in out.rglob(".*")] == []
    return meta


def interrupt_profile(proc, out, sig: int) -> list[str]:
    """Wait for the first part (seconds, not 30 s), then a second one; send ``sig``. Returns
    stderr's lines."""
    try:
        wait_for(lambda: (out / "meta.json").exists(), what="meta.json")
        assert wait_for(lambda: parts_on_disk(out), timeout=60, what="a part") < 5
        wait_for(lambda: len(parts_on_disk(out)) >= 2, timeout=60, what="a second part")
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + sig, proc.stderr.read()
    return proc.stderr.read().strip().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_closes_a_profiled_model_script(tmp_path, sig):
    script = write_script(tmp_path, "slow.py", SLOW_MODEL)
    out = tmp_path / "run"
    proc = start_profile(script, out, "--steps", "100000", "--dense", "3", "--every", "5")
    try:
        wait_for(lambda: parts_on_disk(out), timeout=120, what="the first part")
        # While it runs: the gate says it is still running (a warning), not killed.
        state = run_state(out, stabscope.read_meta(out))
        assert state.status == "running" and "still running" in state.detail
        _, finding = run_status_finding(out)
        assert finding["severity"] == "warning" and "still running" in finding["message"]
    except BaseException:
        proc.kill()  # a failed check must not leave a 100,000-step profile running
        raise
    lines = interrupt_profile(proc, out, sig)
    name = signal.Signals(sig).name
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith(f"interrupted by {name}: ") and str(out) in lines[-1]
    assert "status interrupted" in lines[-1]
    meta = assert_closed_by(out, sig)
    # The gate fails an interrupted run and says by what, unless asked otherwise.
    code, finding = run_status_finding(out)
    assert code == 1 and finding["severity"] == "error"
    assert (
        f"interrupted by {name} after {meta['steps']} steps ({meta['recorded_steps']} of them "
        "with the full probes)" in (finding["message"])
    )
    assert "pass --allow-incomplete" in finding["remedy"]
    _, finding = run_status_finding(out, "--allow-incomplete")
    assert finding["severity"] == "warning"
    assert "--allow-incomplete" not in finding["remedy"]  # taken: not asked for again


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_closes_a_profiled_training_script(tmp_path, sig):
    script = write_script(tmp_path, "endless.py", ENDLESS_TRAINING)
    out = tmp_path / "run"
    proc = start_profile(script, out, "--dense", "3", "--every", "5", "--json")
    lines = interrupt_profile(proc, out, sig)
    name = signal.Signals(sig).name
    assert lines[-1].startswith(f"interrupted by {name}: ")
    meta = assert_closed_by(out, sig)
    # --json: stdout is one JSON object that says so too, with the run as `summary` reads it.
    record = json.loads(proc.stdout.read())
    assert record["error"] == f"interrupted by {name}" and record["exit_code"] == 128 + sig
    assert record["summary"]["status"] == "interrupted"
    assert record["summary"]["steps"] == meta["steps"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, mode, code",
    [(signal.SIGTERM, "with", 143), (signal.SIGTERM, "start", 143), (signal.SIGINT, "with", -2)],
    ids=["SIGTERM-with", "SIGTERM-never-closed", "SIGINT-with"],
)
def test_a_signal_closes_a_library_recorder(tmp_path, sig, mode, code):
    """SIGTERM ends the process with 143 (128 + 15) after closing the run, also when the
    script never closes the Recorder (closed at exit); SIGINT keeps Python's own ending: a
    KeyboardInterrupt traceback, then death by SIGINT."""
    out = tmp_path / "run"
    proc = start_library_writer(out, mode, wait_at=12)
    try:
        wait_for(lambda: proc.stdout.readline().startswith("waiting"), what="12 steps")
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    meta = assert_closed_by(out, sig)
    assert meta["steps"] == 12


def default_handlers() -> dict[int, object]:
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return saved


def test_the_recorder_takes_only_default_handlers_and_gives_them_back(tmp_path):
    saved = default_handlers()
    try:
        with stabscope.Recorder(mlp(), tmp_path / "a") as rec:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # taken
            train(rec.model, 2, batch_maker(6, 3), rec=rec)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        def users_own(signum, frame):
            pass

        signal.signal(signal.SIGTERM, users_own)
        with stabscope.Recorder(mlp(), tmp_path / "b") as rec:
            assert signal.getsignal(signal.SIGTERM) is users_own  # left alone
            train(rec.model, 2, batch_maker(6, 3), rec=rec)
        assert signal.getsignal(signal.SIGTERM) is users_own
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_a_recorder_off_the_main_thread_takes_no_handler(tmp_path):
    saved = default_handlers()
    seen = {}

    def record():
        with stabscope.Recorder(mlp(), tmp_path / "t") as rec:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            train(rec.model, 2, batch_maker(6, 3), rec=rec)

    try:
        worker = threading.Thread(target=record)
        worker.start()
        worker.join()
        assert seen["handler"] is signal.SIG_DFL
        assert stabscope.read_meta(tmp_path / "t")["status"] == "complete"
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_keyboard_interrupt_in_a_with_block_closes_the_run_as_interrupted(tmp_path):
    torch.manual_seed(0)
    model = mlp()

    def stop(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), stabscope.Recorder(model, tmp_path / "k") as rec:
        train(model, 10, batch_maker(6, 3), rec=rec, before_step=stop)
    meta = stabscope.read_meta(tmp_path / "k")
    assert meta["status"] == "interrupted" and meta["interrupted_by"] == "SIGINT"
    assert sorted(stabscope.load_run(tmp_path / "k", metrics="loss").step) == [0, 1, 2, 3]
