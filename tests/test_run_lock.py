"""One writer per run directory: real processes started together on one --out, --force against
a live run, two Recorders in one process, and a refused directory left exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabscope
from stabscope import RecorderConfig, Schedule
from stabscope.cli import app
from stabscope.drivers.profile import profile_script
from stabscope.drivers.script import load_script
from stabscope.record.recorder import RunLockedError
from stabscope.store import count_rows
from tests.conftest import batch_maker, mlp, train
from tests.run_children import (
    SLOW_MODEL,
    parts_on_disk,
    start_profile,
    wait_for,
    write_script,
)

runner = CliRunner()
STEPS = 40


def snapshot(run) -> dict[str, bytes]:
    """Every file under ``run`` (dot-files included) with its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def assert_intact(out, seed: int, steps: int, reference_dir) -> None:
    """``out`` holds exactly one complete run of ``seed``: every step's loss once, the values
    of the same training done alone, meta.json's counts equal to the parts on disk."""
    meta = stabscope.read_meta(out)
    assert meta["status"] == "complete" and meta["run"]["seed"] == seed
    assert meta["steps"] == steps
    assert meta["rows"] == count_rows(out) and meta["parts"] == len(parts_on_disk(out))
    loss = stabscope.load_run(out, metrics="loss").sort_values("step")
    assert loss.step.tolist() == list(range(steps))  # none missing, none twice
    config = RecorderConfig(schedule=Schedule(dense=steps, every=0))
    alone = profile_script(load_script(reference_dir / "slow.py"), reference_dir / "ref",
                           steps, config, seed=seed, device="cpu")  # fmt: skip
    ref = stabscope.load_run(alone.run_dir, metrics="loss").sort_values("step")
    np.testing.assert_allclose(loss.value, ref.value, rtol=1e-5)


@pytest.mark.slow
def test_two_profiles_started_together_one_is_refused_and_the_other_is_intact(tmp_path):
    script = write_script(tmp_path, "slow.py", SLOW_MODEL)
    out = tmp_path / "run"
    # Same --out, different seeds: a mixed run would hold losses of both.
    procs = [
        start_profile(script, out, "--steps", str(STEPS), "--seed", str(seed), "--dense", "40")
        for seed in (0, 1)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = next(seed for seed, (code, _) in enumerate(results) if code == 0)
    refused = results[1 - winner][1].strip().splitlines()
    assert refused[0].startswith("error:") and "is being written by another run" in refused[0]
    assert "--force never replaces" in refused[0] and refused[1].startswith("hint:")
    assert_intact(out, winner, STEPS, tmp_path)


@pytest.mark.slow
def test_force_never_touches_a_live_run(tmp_path):
    script = write_script(tmp_path, "slow.py", SLOW_MODEL)
    out = tmp_path / "run"
    proc = start_profile(script, out, "--steps", str(STEPS), "--dense", "40")
    try:
        wait_for(lambda: (out / "meta.json").exists(), what="the live run's meta.json")
        res = runner.invoke(app, ["profile", str(script), "--out", str(out), "--force", "-q"])
        assert res.exit_code == 2, res.output
        assert "is being written by another run" in res.stderr and "pid" in res.stderr
        model = torch.nn.Linear(8, 1)
        with pytest.raises(RunLockedError):  # the library refuses it too
            stabscope.Recorder(model, out, force=True)
    finally:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert_intact(out, 0, STEPS, tmp_path)


def test_a_second_recorder_in_one_process_is_refused_until_the_first_closes(tmp_path):
    out = tmp_path / "run"
    torch.manual_seed(0)
    first = stabscope.Recorder(mlp(), out).start()
    with pytest.raises(RunLockedError, match="being written"):
        stabscope.Recorder(mlp(), out, force=True)
    assert (out / ".lock").exists()
    train(first.model, 3, batch_maker(6, 3), rec=first)
    first.close()
    assert not (out / ".lock").exists()  # released and removed with the run closed
    assert stabscope.read_meta(out)["status"] == "complete"
    with stabscope.Recorder(mlp(), out, force=True) as again:
        train(again.model, 2, batch_maker(6, 3), rec=again)
    assert stabscope.read_meta(out)["steps"] == 2


def test_a_refused_directory_is_left_exactly_as_it_was(tmp_path):
    script = write_script(tmp_path, "slow.py", SLOW_MODEL.replace('"delay": 0.05', '"delay": 0'))
    out = tmp_path / "run"
    assert runner.invoke(app, ["profile", str(script), "--out", str(out), "--steps", "3", "-q"])
    before = snapshot(out)
    assert ".lock" not in before
    res = runner.invoke(app, ["profile", str(script), "--out", str(out), "--steps", "3", "-q"])
    assert res.exit_code == 2 and "already holds a run" in res.stderr
    assert snapshot(out) == before  # not even a lock file is left behind
