"""Training scripts that end badly: one error line with a hint, exit code 2 (or the script's
own exit status), and a run directory that ``load_run`` still reads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import stabscope
from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.record.recorder import RunExistsError
from stabscope.rules import check_run
from tests.conftest import ROOT
from tests.scripts.harness import SCRIPTS, read_log
from tests.test_cli import assert_one_line_error, invoke

MLP = SCRIPTS / "train_mlp.py"


def profile(tmp_path, *script_args, script=MLP):
    out, log = tmp_path / "run", tmp_path / "log.jsonl"
    res = invoke("profile", script, "--out", out, "-q", "--", *script_args, "--log", log)
    return res, out, read_log(log)


def test_script_that_raises_partway_keeps_its_steps(tmp_path):
    res, out, log = profile(tmp_path, "--steps", "6", "--raise-at", "3")
    assert_one_line_error(
        res, "train_mlp.py raised RuntimeError at train_mlp.py:", "after 3 optimizer steps"
    )
    meta = stabscope.read_meta(out)
    assert meta["status"] == "failed" and meta["error"]["type"] == "RuntimeError"
    df = stabscope.load_run(out, metrics=["loss"])
    assert sorted(df.step) == [0, 1, 2]
    assert df.sort_values("step").value.tolist() == pytest.approx([r["loss"] for r in log])
    # `summary` shows where the script raised, as Python prints it: the script's own frames
    # (the raise's source line, read from the file), none of the code that ran it.
    shown = invoke("summary", out).output
    raise_line = next(
        line.strip() for line in MLP.read_text().splitlines() if "raise RuntimeError" in line
    )
    assert f'File "{MLP}"' in shown and raise_line in shown
    assert "Traceback (most recent call last):" in shown
    assert "runpy" not in shown and "stabscope/drivers" not in shown


def test_a_raise_after_max_steps_says_where_the_recording_ended(tmp_path):
    """--max-steps 2 closes the run complete and the script trains on; its raise at step 3
    is the script's failure (exit 2), said as after the recording ended at step 2, not as
    "after 2 optimizer steps", and the complete run keeps exactly its 2 steps."""
    out, log = tmp_path / "run", tmp_path / "log.jsonl"
    args = ("--steps", "6", "--raise-at", "3", "--log", log)
    res = invoke("profile", MLP, "--out", out, "-q", "--max-steps", "2", "--", *args)
    assert_one_line_error(
        res, "raised RuntimeError", "after the recording ended at step 2; that run is complete"
    )
    assert len(read_log(log)) == 3  # the script ran on past the recording
    assert stabscope.read_meta(out)["status"] == "complete"
    assert sorted(stabscope.load_run(out, metrics=["loss"]).step) == [0, 1]


def test_script_that_never_steps_an_optimizer(tmp_path):
    res, out, log = profile(tmp_path, "--steps", "3", "--no-step")
    assert_one_line_error(res, "train_mlp.py ended without calling optimizer.step()")
    assert len(log) == 3  # the script itself ran to its end
    meta = stabscope.read_meta(out)
    assert meta["status"] == "failed" and "optimizer.step()" in meta["error"]["message"]
    assert stabscope.load_run(out).empty
    # The hint the CLI printed is kept apart: the gate gives it as its remedy.
    hint = next(x for x in res.stderr.splitlines() if x.startswith("hint: "))[6:]
    assert meta["error"]["hint"] == hint and hint not in meta["error"]["message"]
    (status,) = [f for f in check_run(out).findings if f.rule == "run-status"]
    assert status.message.endswith(f"UsageError: {meta['error']['message']}")
    assert status.remedy == f"{hint}; then profile again"


def test_script_without_any_optimizer_or_model(tmp_path):
    script = tmp_path / "forward_only.py"
    script.write_text("import torch\nprint(torch.nn.Linear(2, 2)(torch.ones(1, 2)).shape)\n")
    res, out, _ = profile(tmp_path, script=script)
    assert_one_line_error(
        res,
        "forward_only.py is no model script (it does not define model, batches, loss); as a "
        "training script it ended without calling optimizer.step() of a torch.optim",
        "an update written by hand (p -= lr * p.grad) is not seen",
    )
    meta = stabscope.read_meta(out)
    assert meta["status"] == "failed" and meta["modules"] == []
    assert stabscope.load_run(out).empty


def test_sys_exit_0_before_the_first_step_is_bad_input(tmp_path):
    res, out, _ = profile(tmp_path, "--exit-at", "0", "--exit-code", "0")
    assert_one_line_error(res, "train_mlp.py called sys.exit(0) without calling optimizer.step()")
    assert stabscope.read_meta(out)["status"] == "failed"
    assert stabscope.load_run(out).empty


def test_sys_exit_0_after_training_steps_is_the_end_of_training_and_exits_0(tmp_path):
    """Python's success (``sys.exit(main())``) is a return: exit 0, a complete run that
    ended where the script did, and a line saying how it ended."""
    res, out, log = profile(tmp_path, "--steps", "6", "--exit-at", "2", "--exit-code", "0")
    assert res.exit_code == 0, res.output
    meta = stabscope.read_meta(out)
    assert (
        "train_mlp.py called sys.exit(0) after 2 optimizer steps: taken as its end"
        in (meta["notes"])
    )
    assert meta["status"] == "complete" and meta["run"]["script_ended"] is True
    df = stabscope.load_run(out, metrics=["loss"])
    assert df.sort_values("step").value.tolist() == pytest.approx([r["loss"] for r in log])


@pytest.mark.parametrize(("code", "status"), [("3", 3), ("'out of data'", 1)])
def test_script_exit_status_is_passed_through(tmp_path, code, status):
    script = tmp_path / "exits.py"
    source = (SCRIPTS / "train_mlp.py").read_text()
    script.write_text(source.replace("sys.exit(args.exit_code)", f"sys.exit({code})"))
    res, out, _ = profile(tmp_path, "--steps", "4", "--exit-at", "2", script=script)
    assert res.exit_code == status, res.output
    assert res.stderr.startswith("error: exits.py called sys.exit(")
    meta = stabscope.read_meta(out)
    assert meta["status"] == "failed" and meta["error"]["type"] == "SystemExit"
    assert sorted(stabscope.load_run(out, metrics=["loss"]).step) == [0, 1]


@pytest.mark.slow
def test_exit_status_reaches_the_shell(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "stabscope", "profile", str(MLP), "--out", str(out), "-q"]
    proc = subprocess.run(
        [*cmd, "--", "--steps", "4", "--exit-at", "1", "--exit-code", "3"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("error: train_mlp.py called sys.exit(3) after 1 optimizer step")
    assert sorted(stabscope.load_run(out, metrics=["loss"]).step) == [0]


@pytest.mark.slow
def test_output_that_holds_a_run_fails_before_the_script_starts(tmp_path):
    res, out, _ = profile(tmp_path, "--steps", "2")
    assert res.exit_code == 0, res.output
    res, _, log_again = profile(tmp_path, "--steps", "2")
    assert_one_line_error(res, "already holds a run", "--force")
    assert len(log_again) == 2  # the log of the first run only: the script did not start again
    with pytest.raises(RunExistsError):
        profile_training_script(MLP, ["--steps", "2"], out, RecorderConfig())


#: Three steps of a loop that trains ``model`` with ``opt``.
LOOP = (
    "for _ in range(3):\n"
    "    loss = model(torch.ones(2, 3)).pow(2).mean()\n"
    "    opt.zero_grad()\n"
    "    loss.backward()\n"
    "    opt.step()\n"
)


def test_an_optimizer_left_on_a_stale_copy_is_named_in_the_hint(tmp_path):
    """The optimizer is built, then ``model = copy.deepcopy(model)``: the loop trains the copy,
    whose parameters no optimizer holds, so no module can be recorded; the hint names the
    likely cause."""
    script = tmp_path / "stale.py"
    script.write_text(
        "import copy, torch\n"
        "model = torch.nn.Linear(3, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "model = copy.deepcopy(model)\n" + LOOP
    )
    result = invoke("profile", script, "--out", tmp_path / "run")
    # Its training's fault, not the command's: the gate's exit code 1, as one line and a hint.
    assert_one_line_error(result, "no module it called holds", "copy.deepcopy(model)", code=1)
    # The module the loop trains, and its 4 parameters (3 weights, 1 bias) that got
    # gradients no optimizer applied.
    assert (
        "the optimizer trains none of Linear (4 trainable parameters, 4 with a gradient no "
        "optimizer applied), which the script called" in result.output
    )


def test_an_optimizer_over_an_ema_copy_names_the_module_the_script_trains(tmp_path):
    """The EMA copy's parameters in the optimizer, the model's in the loss: the message names
    the model the script called (its parameters, frozen in the copy, counted in it)."""
    script = tmp_path / "ema.py"
    script.write_text(
        "import copy, torch\n"
        "model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))\n"
        "ema = copy.deepcopy(model)\n"
        "opt = torch.optim.Adam(ema.parameters(), lr=0.1)\n" + LOOP
    )
    result = invoke("profile", script, "--out", tmp_path / "run")
    assert_one_line_error(result, "no module it called holds", "an EMA or a teacher", code=1)
    assert "none of Sequential (21 trainable parameters, 21 with a gradient" in result.output


def test_a_traceback_keeps_a_folder_whose_name_begins_like_stabscopes():
    """The frames hidden are those of stabscope's own files and runpy's; a user folder next
    to it whose name only begins the same (``stabscope_runs/``) is the user's."""
    from pathlib import Path

    import stabscope
    from stabscope.report.console import script_frames

    package = Path(stabscope.__file__).resolve().parent
    sibling = f"{package}_runs/train.py"
    entries = [
        "Traceback (most recent call last):\n",
        f'  File "{package / "drivers" / "zerocode" / "runner.py"}", line 1, in _run\n',
        '  File "<frozen runpy>", line 291, in run_path\n',
        f'  File "{sibling}", line 8, in <module>\n    step()\n',
        "ValueError: bad\n",
    ]
    assert script_frames(entries) == [entries[0], entries[3], entries[4]]


def test_one_step_over_tensors_no_module_holds_says_they_are_recorded_from_the_second(tmp_path):
    script = tmp_path / "raw.py"
    script.write_text(
        "import torch\nw = torch.zeros(3, requires_grad=True)\n"
        "opt = torch.optim.SGD([w], lr=0.1)\n(w - 1).pow(2).sum().backward()\nopt.step()\n"
    )
    res, out, _ = profile(tmp_path, script=script)
    assert_one_line_error(
        res, "raw.py ended after 1 optimizer step, over tensors no module holds", "second"
    )
    assert stabscope.read_meta(out)["status"] == "failed"
