"""Run files and config files of the wrong shape, through the real CLI and ``load_run``:
one error line naming the field or key, a hint, exit 2, and the run left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import stabscope
from tests.cli_inputs import (
    BRACKET_MODEL,
    copy_run,
    invoke,
    one_error,
    record_bracket_run,
    snapshot,
)


@pytest.fixture(scope="module")
def bracket_run(tmp_path_factory) -> Path:
    return record_bracket_run(tmp_path_factory.mktemp("markup"))


BAD_METAS = {
    "a list": lambda m: [m],
    "a string": lambda m: "complete",
    "modules not a list": lambda m: {**m, "modules": {"a": 1}},
    "no status": lambda m: {k: v for k, v in m.items() if k != "status"},
    "steps a string": lambda m: {**m, "steps": "many"},
    "a module without name": lambda m: {**m, "modules": [{"type": "Linear"}]},
    "a parameter shape of strings": lambda m: {
        **m,
        "parameters": [{"name": "w", "shape": ["4"]}],
    },
}


@pytest.mark.parametrize("case", list(BAD_METAS))
def test_meta_of_the_wrong_shape_is_one_error_for_every_reader(bracket_run, tmp_path, case):
    run = copy_run(bracket_run, tmp_path / "run")
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps(BAD_METAS[case](meta)))
    before = snapshot(run)
    for args in (["summary", run], ["check", run], ["check", run, "--format", "json"]):
        one_error(invoke(*args), f"{run / 'meta.json'}: ", "hint: meta.json was damaged")
    one_error(invoke("report", run, "-o", tmp_path / "r.html"), "meta.json")
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(stabscope.MetaError, match=r"meta\.json"):
        stabscope.read_meta(run)
    with pytest.raises(stabscope.MetaError):  # glob names come from meta: not a KeyError
        stabscope.load_run(run, modules="blocks.*")
    with pytest.raises(stabscope.MetaError):  # ranks merge by meta: not a TypeError
        stabscope.load_run(run, merge_ranks=True)
    assert snapshot(run) == before  # nothing written, nothing lost


def test_meta_that_is_not_json_is_a_meta_error(bracket_run, tmp_path):
    run = copy_run(bracket_run, tmp_path / "run")
    (run / "meta.json").write_text('{"status": "complete",')
    one_error(invoke("summary", run), "is not valid JSON", "hint: meta.json was damaged")
    with pytest.raises(stabscope.MetaError):
        stabscope.load_run(run, modules="blocks.*")
    assert stabscope.NotARunError in stabscope.MetaError.__mro__  # old handlers still catch it


PYPROJECT_CASES = {
    'part_rows = "big"': "part_rows must be a positive integer",
    'include = "blocks.*"': "include must be a list of glob strings",
    "flush_seconds = -1": "flush_seconds must be a positive number",
    'record_eval = "yes"': 'record_eval must be true or false, got "yes"',
    'schedule = { dense = "x" }': "[tool.stabscope.record.schedule] dense must be an integer >= 0",
    "schedule = { bogus = 1 }": "unknown [tool.stabscope.record.schedule] keys ['bogus']",
    "schedule = 5": "schedule must be a table",
    "preset = 3": "preset must be one of cheap, standard, full",
}


@pytest.mark.parametrize("line", list(PYPROJECT_CASES))
def test_wrong_types_in_pyproject_name_the_key(tmp_path, monkeypatch, line):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(f"[tool.stabscope]\n{line}\n")
    script = tmp_path / "net.py"
    script.write_text(BRACKET_MODEL)
    res = invoke("profile", script, "--steps", 1, "--out", tmp_path / "run", "-q")
    one_error(res, PYPROJECT_CASES[line], str(tmp_path / "pyproject.toml"))
    assert not (tmp_path / "run").exists()  # refused before anything was recorded


RULES_CASES = {
    'disable = "nonfinite"': "disable must be a list of rule ids",
    'update-ratio = { max_ratio = "abc" }': "[tool.stabscope.rules.update-ratio] max_ratio",
    "update-ratio = { max_ratio = [1] }": "max_ratio must be a finite number >= 0",
    "update-ratio = { max_ratio = true }": "got true",
    "update-ratio = { max_ratio = nan }": "got NaN",
}


@pytest.mark.parametrize("line", list(RULES_CASES))
def test_wrong_types_in_a_config_file_name_the_key(bracket_run, tmp_path, line):
    run = copy_run(bracket_run, tmp_path / "run")
    before = snapshot(run)
    config = tmp_path / "gate.toml"
    config.write_text(f"[tool.stabscope.rules]\n{line}\n")
    one_error(invoke("check", run, "--config", config), RULES_CASES[line], str(config))
    assert snapshot(run) == before  # no findings.json written from a half-read config


def test_a_bad_config_fails_before_a_script_is_profiled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "net.py"
    script.write_text(BRACKET_MODEL)
    config = tmp_path / "gate.toml"
    config.write_text("[tool.stabscope]\nrules = 3\n")
    one_error(invoke("check", script, "--config", config), "tool.stabscope.rules must be a table")
    assert not (tmp_path / "runs").exists()
