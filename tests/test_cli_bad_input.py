"""Bad input through the real CLI: one error line, one hint, exit 2, and nothing recorded lost.

Names and paths the user chose are printed as text: rich markup in a module name, a script
name or a run directory (``runs/exp[lr=1e-3]``) is neither swallowed nor a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

import stabscope
from stabscope.cli import app
from tests.cli_inputs import (
    BRACKET_MODEL,
    MARKED_TRAINING,
    copy_run,
    invoke,
    one_error,
    record_bracket_run,
    snapshot,
    tmpfs,
)
from tests.conftest import SAMPLES


@pytest.fixture(scope="module")
def bracket_run(tmp_path_factory) -> Path:
    return record_bracket_run(tmp_path_factory.mktemp("markup"))


@pytest.mark.slow
def test_markup_in_names_and_paths_is_printed_as_text(bracket_run, tmp_path):
    out = bracket_run
    res = invoke("summary", out)
    assert res.exit_code == 0, res.output
    assert f"run {out} " in res.stderr
    assert "blocks.[/]" in res.stderr and "blocks.x[bold]" in res.stderr

    # A gate finding that names a bracketed parameter: exit 1, the name as recorded.
    config = tmp_path / "strict.toml"
    config.write_text("[tool.stabscope.rules]\nupdate-ratio = {max_ratio = 1e-9}\n")
    res = invoke("check", out, "--config", config, "--fail-on", "warning")
    assert res.exit_code == 1, res.output
    assert "blocks.x[bold].weight" in res.stderr and f"check {out}: failed" in res.stderr
    res = invoke("check", out)
    assert res.exit_code == 0 and f"check {out}: passed" in res.stderr
    res = invoke("check", out, "--format", "json")
    assert res.exit_code == 0 and json.loads(res.stdout)["run"] == str(out)


def test_report_of_a_run_with_markup_in_its_path(bracket_run, tmp_path):
    out = bracket_run
    html = tmp_path / "r[1].html"
    res = invoke("report", out, "-o", html)
    assert res.exit_code == 0, res.output
    assert f"report: {html} " in res.stderr and html.is_file()


def test_check_of_a_script_with_markup_in_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "net[red].py"
    script.write_text(BRACKET_MODEL)
    res = invoke("check", script, "--steps", 2)
    assert res.exit_code == 0, res.output
    run = Path("runs") / "net[red]-check"
    assert f"profiling net[red].py for 2 steps into {run}" in res.stderr
    assert stabscope.read_meta(run)["status"] == "complete"


def test_error_messages_keep_markup_in_paths(tmp_path):
    missing = tmp_path / "runs" / "exp[lr=1e-3]"
    one_error(invoke("summary", missing), str(missing))


@pytest.mark.parametrize(
    "command",
    [
        ["inspect"],
        ["check", "--steps", "2"],
        ["predict"],
        ["amplification"],
        ["grow", "--depth", "2x"],
    ],
)
def test_training_script_is_refused_before_it_runs(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(MARKED_TRAINING)
    name, *options = command
    res = invoke(name, script, *options)
    if name == "check":  # check gates runs: record it with profile, then check the run
        one_error(res, "train.py is a training script", "stabscope check runs/train")
    else:
        one_error(res, "train.py is not a model script", "stabscope profile train.py --")
    assert not (tmp_path / "MARKER").exists()  # its top-level code never ran
    assert not (tmp_path / "runs").exists()


# -- empty option values -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["profile", "net.py", "--out", ""],
        ["profile", "net.py", "--out="],
        ["profile", "net.py", "--include", ""],
        ["amplification", "net.py", "--out", ""],
        ["grow", "net.py", "--depth", "2x", "--out", ""],
        ["predict", "--depth", "2", "--width", "8", "--out", ""],
        ["report", "run", "-o", ""],
        ["check", "run", "--junit", ""],
        ["check", "run", "--config", ""],
        ["check", "run", "--baseline", ""],
    ],
)
def test_an_empty_option_value_is_refused(tmp_path, monkeypatch, args):
    """Typer reads an empty path as ".": --out "" would write a run into the current dir."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(BRACKET_MODEL)
    option = next(a.rstrip("=") for a in args[::-1] if a.startswith("-"))
    one_error(invoke(*args), f"{option} is empty", "leave it out for its default")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.py"]  # nothing written


def test_empty_arguments_of_a_training_script_are_its_own():
    """After --, arguments go to the training script as they are, empty ones included."""
    import typer

    from stabscope.cli.values import empty_option

    command = typer.main.get_command(app).commands["profile"]
    assert empty_option(command, ["train.py", "--", "--name", ""]) is None
    assert empty_option(command, ["train.py", "--out", "", "--", "x"]) == "--out"
    assert empty_option(command, ["train.py", "-q", ""]) is None  # a flag takes no value


# -- numeric options -----------------------------------------------------------------------

NUMBERS = [
    (["profile", "net.py", "--steps", "0"], "--steps must be positive, got 0"),
    (["profile", "net.py", "--every", "-1"], "--every must be an integer >= 0"),
    (["profile", "net.py", "--dense", "-1"], "--dense must be an integer >= 0"),
    (["profile", "net.py", "--seed", "-1"], "--seed must be an integer in 0 .. 4294967295"),
    (["profile", "net.py", "--seed", str(2**32)], "--seed must be an integer in 0"),
    (["profile", "train.py", "--max-steps", "0"], "--max-steps must be positive"),
    (["check", "RUN", "--baseline-factor", "-1"], "--baseline-factor must be a number >= 1"),
    (["check", "RUN", "--baseline-factor", "nan"], "--baseline-factor must be a number >= 1"),
    (["check", "RUN", "--baseline-factor", "0.5"], "--baseline-factor must be a number >= 1"),
    (["check", "net.py", "--steps", "0"], "--steps must be positive"),
    (["amplification", "net.py", "--seeds", "0"], "--seeds must be positive, got 0"),
    (["amplification", "net.py", "--delta", "nan"], "--delta must be a positive number"),
    (["amplification", "net.py", "--delta", "-1e-4"], "--delta must be a positive number"),
    (["amplification", "net.py", "--delta", "inf"], "--delta must be a positive number"),
    (["inspect", "net.py", "--seed", "-1"], "--seed must be an integer in 0"),
    (["predict", "--depth", "2", "--width", "8", "--ffn", "inf"], "--ffn must be a positive"),
    (["predict", "--depth", "2", "--width", "8", "--input-var", "inf"], "--input-var must be"),
    (["predict", "--depth", "2", "--width", "8", "--alpha", "nan"], "--alpha must be a positive"),
    (["predict", "--depth", "2", "--width", "8", "--beta", "0"], "--beta must be a positive"),
    (["predict", "--depth", "2", "--width", "8", "--seed", "-1"], "--seed must be an integer"),
    (["grow", "net.py", "--depth", "2x", "--tolerance", "inf"], "--tolerance must be zero or"),
    (["grow", "net.py", "--depth", "2x", "--seed", "-1"], "--seed must be an integer in 0"),
]


@pytest.mark.parametrize(("args", "message"), NUMBERS, ids=[" ".join(a) for a, _ in NUMBERS])
def test_numeric_options_out_of_range(bracket_run, tmp_path, monkeypatch, args, message):
    """Each is refused before any work, so an existing run given with --force, or checked,
    is left exactly as it was."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(BRACKET_MODEL)
    (tmp_path / "train.py").write_text(MARKED_TRAINING)
    run = copy_run(bracket_run, tmp_path / "run")
    before = snapshot(run)
    args = [str(run) if a == "RUN" else a for a in args]
    if args[0] == "profile":
        args += ["--out", str(run), "--force", "-q"]
    one_error(invoke(*args), message)
    assert snapshot(run) == before
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--set", "lr=5"), ("--steps", "25"), ("--budget", "300")]
)
def test_a_script_option_on_a_run_directory_is_refused(bracket_run, tmp_path, option, value):
    """``check RUN --set k=v`` (or ``--steps``, ``--budget``): the run was recorded with its
    own CONFIG, length and plan, so the option would change nothing while the verdict read as
    that of the first 25 steps; refused, and the run is left exactly as it was."""
    run = copy_run(bracket_run, tmp_path / "run")
    before = snapshot(run)
    one_error(invoke("check", run, option, value), f"{option} is read only for a model script")
    assert snapshot(run) == before


# -- output paths --------------------------------------------------------------------------


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory no file can be created in: permission bits, or a read-only mount for root
    (who ignores permission bits)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        yield ro
        ro.chmod(0o755)
        return
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        yield ro


def output_cases(tmp_path: Path, readonly: Path) -> dict[str, Path]:
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    return {
        "missing dir": tmp_path / "missing" / "out",
        "parent is a file": tmp_path / "a_file" / "out",
        "a directory": tmp_path / "a_dir",
        "read-only dir": readonly / "out",
    }


@pytest.mark.parametrize(
    "case", ["missing dir", "parent is a file", "a directory", "read-only dir"]
)
def test_unwritable_output_paths(bracket_run, tmp_path, readonly_dir, case):
    run = copy_run(bracket_run, tmp_path / "run")
    before = snapshot(run)
    target = output_cases(tmp_path, readonly_dir)[case]
    one_error(invoke("check", run, "--junit", target), "--junit", str(target))
    one_error(invoke("report", run, "-o", target), "cannot write the report to", str(target))
    args = ["predict", "--depth", 2, "--width", 8, "--out", target]
    one_error(invoke(*args), "--out", str(target))
    assert snapshot(run) == before  # refused before the gate ran: no findings.json
    assert target.is_dir() if case == "a directory" else not target.exists()


def test_junit_write_failing_on_a_full_disk_keeps_the_findings(bracket_run, tmp_path):
    """The check passes, the JUnit write hits ENOSPC: exit 2, and the verdict and findings
    are kept (printed, and in RUN/findings.json)."""
    run = copy_run(bracket_run, tmp_path / "run")
    with tmpfs(tmp_path / "full", "size=64k") as full:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as filler:
            while True:
                filler.write(b"x" * 4096)
                filler.flush()
        junit = full / "junit.xml"
        res = invoke("check", run, "--junit", junit)
        assert not junit.exists()
    assert res.exit_code == 2, res.output
    assert f"check {run}: passed" in res.stderr
    assert f"error: cannot write --junit {junit}" in res.stderr
    assert f"hint: the findings are kept in {run / 'findings.json'}" in res.stderr
    kept = json.loads((run / "findings.json").read_text())
    assert [f["rule"] for f in kept] == ["failure-forecast"]  # the score, an info finding


def test_junit_through_a_symlink_keeps_the_link(bracket_run, tmp_path):
    """A symlink (or /dev/stdout, a CI idiom) is written through, not replaced by rename."""
    run = copy_run(bracket_run, tmp_path / "run")
    link = tmp_path / "stdout-link"
    link.symlink_to(tmp_path / "junit.xml")  # a symlink is kept, its target written
    res = invoke("check", run, "--junit", link)
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and "<testsuite" in (tmp_path / "junit.xml").read_text()


def test_amplification_into_an_unwritable_out(tmp_path):
    script = tmp_path / "net.py"
    script.write_text(BRACKET_MODEL.replace('CONFIG = {"lr": 1e-2}', 'CONFIG = {"depth": 1}'))
    (tmp_path / "a_file").write_text("")
    args = ["amplification", script, "--depths", "1,2", "--seeds", 1, "--device", "cpu"]
    one_error(invoke(*args, "--out", tmp_path / "a_file" / "run"), "cannot write to")


# -- module filters ------------------------------------------------------------------------


def test_include_matching_nothing_is_refused_and_leaves_no_run(tmp_path):
    script = tmp_path / "net.py"
    script.write_text(BRACKET_MODEL)
    out = tmp_path / "run"
    res = invoke("profile", script, "--steps", 2, "--out", out, "-q", "--include", "blcks.*")
    one_error(res, "no module or parameter of Net is left to record with --include 'blcks.*'")
    assert "blocks.[/]" in res.stderr  # the hint shows names the glob could have matched
    assert not any(out.iterdir())  # nothing that would need --force next time
    res = invoke("profile", script, "--steps", 2, "--out", out, "-q", "--include", "blocks.*")
    assert res.exit_code == 0, res.output
    names = {m["name"] for m in stabscope.read_meta(out)["modules"]}
    assert names == {"blocks.[/]", "blocks.x[bold]"}


@pytest.mark.parametrize("size", [["--depth", "nanx"], ["--sweep", "inf"]])
def test_grow_factor_that_is_not_finite(tmp_path, size):
    tiny = ["--set", "depth=2", "--set", "width=16", "--set", "seq_len=8", "--set", "batch_size=4"]
    args = ["grow", SAMPLES / "gpt.py", *size, *tiny, "--out", tmp_path / "g", "--device", "cpu"]
    one_error(invoke(*args), "factor", "is not a finite number")
    assert not list((tmp_path / "g").rglob("meta.json"))


def test_include_matching_nothing_stops_a_training_script_at_its_first_forward(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(MARKED_TRAINING)
    out = tmp_path / "run"
    res = invoke("profile", script, "--out", out, "-q", "--include", "lin*", "--", "--x")
    one_error(
        res,
        "error: no module or parameter of Linear is left to record with --include 'lin*'",
        "hint: its modules are named like <root>",  # not "train.py raised UsageError"
    )
    meta = stabscope.read_meta(out)  # the run says why it holds nothing
    assert meta["status"] == "failed" and meta["error"]["type"] == "UsageError"
    assert stabscope.load_run(out).empty
