"""The read side's command-line conventions: typed choices listed in --help, click's parse
errors as one error line and one hint (naming `--` after a script path), one output option
name (--out/-o) on every command, whole module names in `summary`, and `check` of a training
script pointing at profile-then-check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from stabscope.cli import app
from stabscope.cli.values import CheckFormat, Severity
from stabscope.store.findings import SEVERITIES
from tests.report_runs import FINDINGS, write_run

runner = CliRunner()
LONG = "model.encoder.layers.3.self_attention_block.output_projection"


def one_error(res, *needles: str) -> list[str]:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:")
    for needle in needles:
        assert needle in res.stderr, res.stderr
    return lines


def test_check_choices_are_typed_and_listed_in_help():
    assert tuple(s.value for s in Severity) == SEVERITIES
    assert [f.value for f in CheckFormat] == ["table", "json", "github"]
    text = re.sub(r"\s+", " ", runner.invoke(app, ["check", "--help"]).output)
    assert "error|warning|info" in text and "table|json|github" in text


def test_a_choice_not_listed_is_one_line_with_the_choices(tmp_path: Path):
    run = write_run(tmp_path / "r", layers=2, steps=range(2), findings=FINDINGS)
    res = runner.invoke(app, ["check", str(run), "--format", "xml"])
    one_error(res, "'xml' is not one of 'table', 'json', 'github'", "stabscope check --help")
    res = runner.invoke(app, ["check", str(run), "--fail-on", "fatal"])
    one_error(res, "--fail-on", "'fatal'")


def test_an_unknown_option_after_a_script_names_the_double_dash(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text("print('training')\n")
    res = runner.invoke(app, ["profile", str(script), "--max_iters", "10"])
    _, hint = one_error(res, "No such option: --max_iters (Possible options: --max-steps)")
    assert f"stabscope profile {script} [OPTIONS] -- --max_iters" in hint
    # Where click finds nothing alike, it suggests --help: left out, the hint says more.
    res = runner.invoke(app, ["profile", str(script), "--lr", "3"])
    assert one_error(res)[0] == "error: No such option: --lr"
    # Without a script path before it, the hint is the command's help.
    res = runner.invoke(app, ["summary", str(tmp_path), "--bogus"])
    assert one_error(res)[1] == "hint: see `stabscope summary --help`"


def test_check_of_a_training_script_suggests_profile_then_check(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text("import sys\nsys.exit('a training loop would run here')\n")
    res = runner.invoke(app, ["check", str(script)])
    _, hint = one_error(res, "train.py is a training script")
    assert f"stabscope profile {script} --out runs/train -- ARGS" in hint
    assert "stabscope check runs/train" in hint
    assert not (Path("runs") / "train-check").exists()  # nothing was profiled


@pytest.mark.parametrize("option", ["--out", "-o", "--output"])
def test_report_takes_out_and_keeps_output_as_an_alias(tmp_path: Path, option: str):
    run = write_run(tmp_path / "r", layers=2, steps=range(2), findings=FINDINGS)
    res = runner.invoke(app, ["report", str(run), option, str(tmp_path / "x.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.html").stat().st_size > 10_000


@pytest.mark.parametrize("command", ["report", "grow", "predict", "amplification", "export"])
def test_every_output_option_is_out_with_o(command: str):
    names = {
        opt
        for p in _command(command).params
        if p.param_type_name == "option" and p.name in ("out", "output")
        for opt in p.opts
    }
    assert {"--out", "-o"} <= names


def _command(name: str):
    import typer.main

    return typer.main.get_command(app).commands[name]


def test_summary_prints_whole_module_names(tmp_path: Path):
    run = write_run(tmp_path / "r", layers=4, steps=range(3), names={3: LONG}, findings=FINDINGS)
    res = runner.invoke(app, ["summary", str(run)], terminal_width=80)
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if LONG in line]
    assert lines and "largest" in lines[0] and "…" not in res.stderr


def test_each_command_is_one_line_in_the_command_list():
    """The list `stabscope --help` prints gives each command one line at 160 columns (the
    first paragraph of its docstring; a wrapped one broke mid-sentence at any width)."""
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "160"})
    table = res.output.split("Commands")[1]
    rows = [line.strip("│ ").rstrip() for line in table.splitlines()[1:] if line.startswith("│")]
    names = list(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert len(names) >= 9 and len(rows) == len(names), rows
    assert sorted(row.split()[0] for row in rows) == sorted(names)


SEVEN_STEPS = """
import torch
from torch import nn

m = nn.Linear(4, 1)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
for _ in range(7):
    loss = m(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.mark.slow
@pytest.mark.parametrize(("budget", "shown"), [(None, "7/?"), ("7", "7/7")])
def test_a_training_scripts_bar_ends_at_its_budget(tmp_path, budget, shown) -> None:
    """A training script's length is unknown without ``--max-steps``: the bar counts steps
    with no end, unless ``--budget`` says how many are planned."""
    import subprocess
    import sys

    script = tmp_path / "seven.py"
    script.write_text(SEVEN_STEPS)
    args = [sys.executable, "-m", "stabscope", "profile", str(script), "--out", str(tmp_path / "r")]
    done = subprocess.run(
        [*args, *(["--budget", budget] if budget else [])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (bar,) = [line for line in done.stderr.splitlines() if line.startswith("training")]
    assert f" {shown} " in bar
