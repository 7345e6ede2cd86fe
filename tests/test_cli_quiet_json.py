"""`profile --json` (the closing summary as the one JSON object on stdout, the script's own
stdout moved to stderr) and `-o`; `--quiet` on every command that says more than its result
(only errors, warnings and the verdict line stay); and `stabscope --bogus` /
`stabscope bogus-command` as one error line and one hint, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from stabscope.cli import app
from tests.conftest import ROOT
from tests.report_runs import FINDINGS, write_run

runner = CliRunner()
DIVERGING = ROOT / "tests" / "scripts" / "diverging_sgd.py"
QUIET_COMMANDS = ("profile", "summary", "report", "check", "export", "predict", "grow")


def lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


def one_error(res, *needles: str) -> list[str]:
    assert res.exit_code == 2, res.output
    out = lines(res.stderr)
    assert len(out) == 2 and out[0].startswith("error:") and out[1].startswith("hint:"), out
    for needle in needles:
        assert needle in res.stderr
    return out


@pytest.mark.parametrize("args", [["--bogus"], ["--bogus", "summary", "x"], ["bogus-command"]])
def test_a_bad_top_level_command_line_is_one_line_with_the_commands(args):
    res = runner.invoke(app, args)
    error, hint = one_error(res)
    assert "╭" not in res.output and "Usage:" not in res.output  # not click's box
    assert ("--bogus" in error) if args[0] == "--bogus" else ("bogus-command" in error)
    assert hint == (
        "hint: the commands: profile, summary, report, inspect, amplification, check, grow, "
        "predict, export; see `stabscope --help`"
    )


def test_a_near_miss_command_is_suggested_and_no_args_still_shows_help():
    error, _ = one_error(runner.invoke(app, ["summ", "runs/x"]))
    assert error == "error: No such command 'summ'. Did you mean 'summary'?"
    assert "Usage:" in runner.invoke(app, []).output


@pytest.mark.parametrize("command", QUIET_COMMANDS)
def test_every_command_that_says_more_than_its_result_takes_quiet(command: str):
    params = typer.main.get_command(app).commands[command].params
    quiet = [p for p in params if "--quiet" in p.opts]
    assert len(quiet) == 1 and quiet[0].opts == ["--quiet", "-q"]
    assert quiet[0].help.startswith("Only errors, warnings and the verdict line")


@pytest.mark.slow
def test_profile_json_is_the_closing_summary_alone_on_stdout(tmp_path: Path):
    """A real process: the script prints at import and every step, through ``print`` and
    straight to file descriptor 1; stdout still parses as one JSON object, equal to what
    ``summary --json`` says of the run, and the script's lines are on stderr."""
    script = tmp_path / "noisy.py"
    source = DIVERGING.read_text().replace(
        "def batches(cfg):",
        "print('noisy at import')\n\n\ndef batches(cfg):\n"
        "    import os\n    print('noisy batches')\n    os.write(1, b'noisy fd 1\\n')",
    )
    script.write_text(source)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "stabscope", "profile", str(script), "-o", str(run)]
    proc = subprocess.run(
        [*cmd, "--steps", "20", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)  # the whole of stdout
    for noise in ("noisy at import", "noisy batches", "noisy fd 1"):
        assert noise in proc.stderr and noise not in proc.stdout
    assert "run directory:" not in proc.stderr  # the human summary is replaced, not doubled
    summary = json.loads(runner.invoke(app, ["summary", str(run), "--json"]).stdout)
    assert set(record) == {*summary, "seconds", "notes"}
    assert {k: record[k] for k in summary} == summary
    assert record["summary"]["status"] == "complete" and record["summary"]["steps"] == 20
    assert "nonfinite" in {f["rule"] for f in record["findings"]}  # judged on the fresh run
    assert record["seconds"] > 0


FAILING_LOOP = """
import torch

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for i in range(30):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if i == 11:
        raise ValueError("the data ran out")
"""


@pytest.mark.slow
def test_profile_json_says_why_on_stdout_when_the_script_fails(tmp_path: Path):
    """A caller that parses stdout gets one JSON object when the run fails too: the error
    line's text, exit code 2, and the run the script left (12 optimizer steps before its
    raise, as ``summary --json`` reads the run); bad input before any run, the error alone."""
    script = tmp_path / "fails.py"
    script.write_text(FAILING_LOOP)
    run = tmp_path / "run"
    res = runner.invoke(app, ["profile", str(script), "-o", str(run), "--json"])
    assert res.exit_code == 2
    record = json.loads(res.stdout)
    error, hint = lines(res.stderr)[-2:]  # after the progress bar
    assert error == f"error: {record['error']}" and hint == f"hint: {record['hint']}"
    assert record["exit_code"] == 2 and record["run"] == str(run)
    assert record["summary"]["status"] == "failed" and record["summary"]["steps"] == 12
    summary = json.loads(runner.invoke(app, ["summary", str(run), "--json"]).stdout)
    assert {k: record[k] for k in summary} == summary

    bad = runner.invoke(app, ["profile", str(script), "--max-steps", "0", "--json"])
    error, hint = one_error(bad, "--max-steps")
    assert json.loads(bad.stdout) == {
        "error": error.removeprefix("error: "),
        "hint": hint.removeprefix("hint: "),
        "exit_code": 2,
    }


@pytest.mark.slow
def test_profile_json_never_reports_an_earlier_run_as_the_one_a_failure_left(tmp_path):
    """A model script profiled once, then broken at import and profiled again with --force:
    the run directory still holds the first run, which this failure did not record; the JSON
    says the error only."""
    script = tmp_path / "model.py"
    script.write_text(DIVERGING.read_text())
    run = tmp_path / "run"
    first = runner.invoke(app, ["profile", str(script), "-o", str(run), "--steps", "3", "-q"])
    assert first.exit_code == 0, first.output
    broken = "\nraise ImportError('a module the script needs is gone')\n"
    script.write_text(DIVERGING.read_text() + broken)  # still a model script: fails on import
    res = runner.invoke(app, ["profile", str(script), "-o", str(run), "--force", "--json"])
    assert res.exit_code == 2
    record = json.loads(res.stdout)
    assert "gone" in record["error"] and "run" not in record and "summary" not in record


@pytest.mark.slow
def test_profile_quiet_says_only_the_verdict_line(tmp_path: Path):
    """And ``-o`` names the run directory, as ``--out``."""
    run = tmp_path / "run"
    res = runner.invoke(app, ["profile", str(DIVERGING), "-o", str(run), "--steps", "4", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(runner.invoke(app, ["summary", str(run), "--json"]).stdout)
    assert lines(res.stderr) == [quiet_line(run, "complete", 4, summary["findings"])]
    assert res.stdout == ""
    loud = runner.invoke(app, ["summary", str(run)])
    assert len(lines(loud.stderr)) > 5


def quiet_line(run: Path, status: str, steps: int, findings: list[dict]) -> str:
    """The verdict line, written out from the findings independently of the CLI's code."""
    said = []
    for severity in ("error", "warning", "info"):
        n = sum(f["severity"] == severity for f in findings)
        if n:
            said.append(f"{n} {severity}" + ("s" if n > 1 else ""))
    return f"run {run}: {status}, {steps} steps; findings: {', '.join(said) or 'none'}"


def test_summary_quiet_is_the_verdict_line(tmp_path: Path):
    run = write_run(tmp_path / "r", layers=2, steps=range(4), findings=FINDINGS)
    res = runner.invoke(app, ["summary", str(run), "--quiet"])
    assert res.exit_code == 0
    assert lines(res.stderr) == [
        f"run {run}: complete, 4 steps; findings: 1 error, 1 warning, 1 info"
    ]
    assert quiet_line(run, "complete", 4, FINDINGS) == lines(res.stderr)[0]


@pytest.mark.slow
def test_check_quiet_keeps_the_failing_findings_and_the_verdict(tmp_path: Path):
    run = write_run(tmp_path / "r", layers=2, steps=range(4), status="failed")
    gate = json.loads(runner.invoke(app, ["check", str(run), "--format", "json"]).stdout)
    loud = runner.invoke(app, ["check", str(run)])
    res = runner.invoke(app, ["check", str(run), "-q"])
    assert res.exit_code == loud.exit_code == 1
    out = lines(res.stderr)
    assert out[-1] == lines(loud.stderr)[-1]  # `check RUN: failed: ...`, what CI reads
    assert out[-1].startswith(f"check {run}: failed")
    failing = {f["rule"] for f in gate["findings"] if f["severity"] == "error"}
    passing = {f["rule"] for f in gate["findings"]} - failing
    assert "run-status" in failing and passing  # both kinds, or the test proves nothing
    text = "\n".join(out)
    assert all(rule in text for rule in failing)
    assert not any(rule in text for rule in passing) and all(r in loud.stderr for r in passing)
    assert len(out) < len(lines(loud.stderr))


@pytest.mark.slow
def test_report_and_export_quiet_write_their_files_and_say_nothing(tmp_path: Path):
    pytest.importorskip("tensorboard")
    run = write_run(tmp_path / "r", layers=2, steps=range(4), findings=FINDINGS)
    page = tmp_path / "page.html"
    res = runner.invoke(app, ["report", str(run), "-o", str(page), "--quiet"])
    assert res.exit_code == 0 and res.stderr == "" and page.stat().st_size > 10_000
    logs = tmp_path / "tb"
    res = runner.invoke(
        app, ["export", str(run), "--to", "tensorboard", "-o", str(logs), "--no-images", "-q"]
    )
    assert res.exit_code == 0 and res.stderr == ""
    assert list(logs.glob("events.out.tfevents.*"))


def test_predict_quiet_is_its_verdict_line(tmp_path: Path):
    args = ["predict", "--depth", "8", "--width", "64", "--norm", "post", "--seq", "8"]
    loud = runner.invoke(app, args)
    res = runner.invoke(app, [*args, "--quiet"])
    assert res.exit_code == loud.exit_code == 0
    assert lines(res.stderr) == [lines(loud.stderr)[-1]]
    assert lines(res.stderr)[0].startswith("verdict:")


def test_errors_are_never_quiet(tmp_path: Path):
    one_error(runner.invoke(app, ["summary", str(tmp_path / "none"), "-q"]), "hint:")
    missing = tmp_path / "missing.py"
    one_error(runner.invoke(app, ["profile", str(missing), "-q", "--json"]))
