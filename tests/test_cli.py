"""The CLI as a user meets it: real sample models, real run directories, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app
from tests.conftest import ROOT, SAMPLES

runner = CliRunner()
TINY_GPT = ["--set", "depth=2", "--set", "width=16", "--set", "seq_len=8", "--set", "batch_size=4"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_profile_sample_gpt_end_to_end(tmp_path):
    out = tmp_path / "gpt"
    res = invoke(
        "profile",
        SAMPLES / "gpt.py",
        "--steps",
        12,
        "--out",
        out,
        "-q",
        "--every",
        5,
        "--dense",
        3,
        "--set",
        "norm=post",
        *TINY_GPT,
    )
    assert res.exit_code == 0, res.output
    # -q: one line, the run and its verdict
    assert res.stderr.strip() == f"run {out}: complete, 12 steps; findings: 1 warning, 1 info"
    meta = stabscope.read_meta(out)
    assert meta["status"] == "complete" and meta["steps"] == 12
    assert meta["run"]["script_config"]["norm"] == "post"
    assert meta["run"]["script_config"]["depth"] == 2
    df = stabscope.load_run(out)
    assert sorted(df[df.metric == "loss"].step) == list(range(12))
    assert sorted(df[df.metric == "act_rms"].step.unique()) == [0, 1, 2, 5, 10]
    assert {"blocks.0.attn", "blocks.1.mlp.fc", "blocks.1.mlp.fc.weight"} <= set(
        df.module.astype(str)
    )


@pytest.mark.slow
def test_profile_mlp_sample_and_summary(tmp_path):
    out = tmp_path / "mlp"
    res = invoke("profile", SAMPLES / "mlp.py", "--steps", 5, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    res = invoke("summary", out)
    assert res.exit_code == 0
    assert "depth trend of grad_rms" in res.stderr


@pytest.mark.slow
def test_help_everywhere():
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"profile", "report", "check", "predict", "grow"} <= set(commands)
    for args in ([], *([c] for c in commands)):
        res = invoke(*args, "--help")
        assert res.exit_code == 0 and "Usage" in res.output
    proc = subprocess.run(
        [sys.executable, "-m", "stabscope", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and "profile" in proc.stdout


def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    return path


GOOD_HEAD = textwrap.dedent("""
    import torch
    from torch import nn
    CONFIG = {"fail_at": 3}
    def model(cfg): return nn.Linear(3, 1)
    def batches(cfg):
        while True: yield torch.randn(4, 3)
""")


def assert_one_line_error(res, *needles, code: int = 2):
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and any(line.startswith("hint:") for line in lines)
    for needle in needles:
        assert needle in res.stderr, res.stderr


def test_missing_script(tmp_path):
    assert_one_line_error(invoke("profile", tmp_path / "nope.py"), "no such script")


def test_script_without_entry_points(tmp_path):
    script = write(tmp_path, "empty.py", "import torch\nCONFIG = {}\n")
    assert_one_line_error(
        invoke("profile", script, "--out", tmp_path / "r"),
        "does not define model, batches, loss",
        "model(cfg)",
    )


def test_script_that_raises_keeps_what_was_recorded(tmp_path):
    script = write(
        tmp_path,
        "bad.py",
        GOOD_HEAD
        + textwrap.dedent("""
    step = 0
    def loss(model, batch):
        global step
        step += torch.is_grad_enabled()  # the no_grad structure trace is not a step
        if step > CONFIG["fail_at"]:
            raise ZeroDivisionError("the script's own bug")
        return model(batch).pow(2).mean()
    """),
    )
    out = tmp_path / "r"
    res = invoke("profile", script, "--out", out, "-q")
    assert_one_line_error(res, "bad.py raised ZeroDivisionError at bad.py:", "own bug")
    meta = stabscope.read_meta(out)
    assert meta["status"] == "failed" and meta["error"]["type"] == "ScriptError"
    assert sorted(stabscope.load_run(out, metrics="loss").step) == [0, 1, 2]


def test_unknown_set_key_and_bad_value(tmp_path):
    script = write(tmp_path, "ok.py", GOOD_HEAD + "def loss(m, b): return m(b).mean()\n")
    assert_one_line_error(
        invoke("profile", script, "--set", "depht=3"), "unknown --set key 'depht'", "fail_at"
    )
    assert_one_line_error(invoke("profile", script, "--set", "fail_at=three"), "expected a int")


@pytest.mark.slow
def test_existing_run_needs_force(tmp_path):
    script = write(tmp_path, "ok.py", GOOD_HEAD + "def loss(m, b): return m(b).mean()\n")
    out = tmp_path / "r"
    assert invoke("profile", script, "--out", out, "--steps", 2, "-q").exit_code == 0
    before = (out / "meta.json").read_text()
    assert_one_line_error(
        invoke("profile", script, "--out", out, "--steps", 2, "-q"),
        "already holds a run",
        "--force",
    )
    assert (out / "meta.json").read_text() == before  # nothing already written is lost
    assert invoke("profile", script, "--out", out, "--steps", 3, "-q", "--force").exit_code == 0
    assert stabscope.read_meta(out)["steps"] == 3


def test_unwritable_output(tmp_path):
    script = write(tmp_path, "ok.py", GOOD_HEAD + "def loss(m, b): return m(b).mean()\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert_one_line_error(invoke("profile", script, "--out", blocker / "run"), "cannot write")


@pytest.mark.parametrize("option", [["--preset", "huge"], ["--device", "tpu9"]])
def test_bad_options(tmp_path, option):
    script = write(tmp_path, "ok.py", GOOD_HEAD + "def loss(m, b): return m(b).mean()\n")
    res = invoke("profile", script, "--out", tmp_path / "r", *option)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error:")


@pytest.mark.slow
def test_help_shows_the_defaults_written_in_option_texts():
    """Rich markup would swallow a bare "[default: 25]" as a style tag: every default written
    into an option's help text must reach the terminal as written."""
    import typing

    checked = 0
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        hints = typing.get_type_hints(command.callback, include_extras=True)
        written = [
            text.replace("\\[", "[")
            for hint in hints.values()
            for meta in getattr(hint, "__metadata__", ())
            if (text := getattr(meta, "help", None)) and "[default:" in text
        ]
        if not written:
            continue
        checked += len(written)
        proc = subprocess.run(
            [sys.executable, "-m", "stabscope", name, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "400"},
        )
        for text in written:
            assert text in proc.stdout, (name, text)
    assert checked >= 8
