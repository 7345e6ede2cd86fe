"""A rule that raises fails alone: the other rules still run, and every output of the gate
(console, JSON, JUnit, GitHub annotations) says which rule failed and why. Whether that fails
the gate depends on whether the rule's findings could have reached --fail-on.

The failing rule is a real one, registered like the built-in rules: the relative change of
the loss since the first step, on a run whose first loss is exactly 0."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from stabscope.cli import app
from stabscope.rules import ALL_RULES, RULES_BY_ID, check_run
from stabscope.rules.base import Rule, RunView
from stabscope.store.findings import Finding
from tests.rule_runs import write

runner = CliRunner()


def _loss_change(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    loss = view.metrics("loss").sort_values("step").value.to_list()
    change = (loss[-1] - loss[0]) / loss[0]  # ZeroDivisionError on a first loss of 0.0
    if change > p["max"]:
        yield Finding("loss-change", "error", f"loss grew {change:.3g}x")


LOSS_CHANGE = Rule("loss-change", "Loss change", "", ("loss",), {"max": 1.0}, _loss_change)


@pytest.fixture
def loss_change_rule() -> Iterator[Rule]:
    ALL_RULES.append(LOSS_CHANGE)
    RULES_BY_ID[LOSS_CHANGE.id] = LOSS_CHANGE
    try:
        yield LOSS_CHANGE
    finally:
        ALL_RULES.remove(LOSS_CHANGE)
        del RULES_BY_ID[LOSS_CHANGE.id]


def loss_run(tmp_path, losses, name="run"):
    return write(tmp_path / name, [(s, "__run__", "loss", -1, v) for s, v in enumerate(losses)])


def test_the_other_rules_still_run(tmp_path, loss_change_rule):
    result = check_run(loss_run(tmp_path, [0.0, 1.0, math.nan]))
    failure = result.failed["loss-change"]
    assert (failure.type, failure.message) == ("ZeroDivisionError", "float division by zero")
    # The line of the rule's own code, not of the library it called.
    assert failure.where.startswith("tests/test_gate_rule_errors.py:")
    assert "loss-change" not in result.skipped
    assert [f.rule for f in result.findings] == ["nonfinite"]  # the NaN loss, still reported


def test_every_output_says_a_rule_failed_and_the_gate_fails(tmp_path, loss_change_rule):
    run = loss_run(tmp_path, [0.0, 1.0, 2.0])  # finite: no other finding fails the gate
    said = "rule loss-change failed: ZeroDivisionError: float division by zero"
    junit = tmp_path / "junit.xml"
    res = runner.invoke(app, ["check", str(run), "--junit", str(junit)])
    assert res.exit_code == 1, res.output
    assert said in res.stderr and "1 rule that could fail it raised" in res.stderr
    case = next(c for c in ET.parse(junit).getroot() if c.get("name") == "loss-change")
    error = case.find("error")
    assert error is not None and error.get("type") == "ZeroDivisionError"
    assert ET.parse(junit).getroot().get("errors") == "1"

    res = runner.invoke(app, ["check", str(run), "--format", "json"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    others = [f for f in doc["findings"] if f["rule"] != "failure-forecast"]
    assert doc["failed"] is True and others == []
    assert doc["rule_errors"]["loss-change"]["type"] == "ZeroDivisionError"
    assert doc["rule_errors"]["loss-change"]["fails_gate"] is True
    assert said in res.stderr  # the JSON goes to stdout; the terminal is told too

    res = runner.invoke(app, ["check", str(run), "--format", "github"])
    assert "::error title=stabscope loss-change failed::" + said in res.stdout.splitlines()[-1]


def test_a_failed_rule_below_fail_on_is_said_but_does_not_fail_the_gate(tmp_path, loss_change_rule):
    run = loss_run(tmp_path, [0.0, 1.0, 2.0])
    config = tmp_path / "rules.toml"
    config.write_text('[tool.stabscope.rules]\nloss-change = { severity = "warning" }\n')
    res = runner.invoke(app, ["check", str(run), "--config", str(config), "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["failed"] is False and doc["rule_errors"]["loss-change"]["fails_gate"] is False
    assert "rule loss-change failed" in res.stderr and "passed" in res.stderr
    res = runner.invoke(app, ["check", str(run), "--config", str(config), "--fail-on", "warning"])
    assert res.exit_code == 1


def test_the_verdict_line_counts_the_failing_findings_in_words(tmp_path):
    run = loss_run(tmp_path, [0.0, 1.0, math.nan])  # a NaN loss: one nonfinite error
    errors = [f for f in check_run(run).findings if f.severity == "error"]
    res = runner.invoke(app, ["check", str(run)])
    assert len(errors) == 1 and res.exit_code == 1
    assert "failed: 1 finding at error or worse" in res.stderr, res.stderr
