"""Outputs that would land inside a run directory are refused (exit 2, one line and a hint)
and leave the run byte for byte as it was; outputs next to a run, or inside a directory that
only looks like one, are written."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app
from tests.conftest import batch_maker, mlp, train
from tests.run_children import SLOW_MODEL, write_script

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("guard") / "run"
    torch.manual_seed(0)
    with stabscope.Recorder(mlp(), out) as rec:
        train(rec.model, 4, batch_maker(6, 3), rec=rec)
    return out


def snapshot(run) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def assert_refused(args: list[str], run, *needles: str) -> None:
    before = snapshot(run)
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:")
    assert "inside the run directory" in lines[0]
    for needle in needles:
        assert needle in res.stderr
    assert snapshot(run) == before  # nothing of the run touched, nothing added


@pytest.mark.parametrize("target", ["meta.json", "parts/part-000000.parquet", ".", "r.html"])
def test_report_into_a_run_is_refused(run, target):
    assert_refused(["report", run, "-o", run / target], run, "-o")


def test_check_junit_into_a_run_is_refused_before_the_gate_writes_anything(run):
    assert not (run / "findings.json").exists()
    assert_refused(["check", run, "--junit", run / "meta.json"], run, "--junit")
    assert_refused(["check", run, "--junit", run / "parts" / "j.xml"], run, "--junit")


def test_predict_out_into_a_run_is_refused(run):
    args = ["predict", "--depth", 2, "--width", 8, "--out", run / "parts" / "p.json"]
    assert_refused(args, run, "--out")


def test_a_run_inside_a_run_is_refused(run, tmp_path):
    script = write_script(tmp_path, "m.py", SLOW_MODEL)
    assert_refused(["profile", script, "--out", run / "parts" / "sub"], run, "--out")
    assert not (run / "parts" / "sub").exists()


@pytest.mark.slow
def test_outputs_next_to_a_run_or_in_a_look_alike_are_written(run, tmp_path):
    res = runner.invoke(app, ["report", str(run), "-o", str(run.parent / "run-report.html")])
    assert res.exit_code == 0, res.output
    # A directory with some other tool's meta.json is not a run.
    other = tmp_path / "project"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"name": "not a run"}))
    res = runner.invoke(app, ["report", str(run), "-o", str(other / "report.html")])
    assert res.exit_code == 0, res.output
    assert (other / "report.html").stat().st_size > 0
    res = runner.invoke(app, ["check", str(run), "--junit", str(tmp_path / "junit.xml")])
    assert (tmp_path / "junit.xml").exists() and res.exit_code in (0, 1)
