"""Findings as JSON, GitHub workflow annotations and JUnit XML, with the rules that failed.

A rule that raised (``GateResult.failed``) is said in every format, apart from the plain
skips: JSON ``rule_errors``, a JUnit ``<error>``, a GitHub annotation, a console line.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..store.findings import at_or_above, finding_record

if TYPE_CHECKING:
    from .gate import GateResult


def rule_errors(gate: GateResult) -> dict[str, dict[str, Any]]:
    """Per failed rule: what it raised, and whether that fails the gate."""
    return {
        rule: {**asdict(failure), "fails_gate": rule in gate.failed_blocking}
        for rule, failure in gate.failed.items()
    }


def failure_lines(gate: GateResult) -> list[str]:
    """One plain-text line per rule that raised, for the terminal."""
    return [
        f"rule {rule} failed: {failure}; it did not check this run"
        + (" (the gate fails)" if rule in gate.failed_blocking else "")
        for rule, failure in gate.failed.items()
    ]


def to_json(gate: GateResult) -> str:
    return json.dumps(
        {
            "run": str(gate.run_dir),
            "failed": not gate.passed,
            "findings": [finding_record(f) for f in gate.findings],
            "skipped": gate.skipped,
            "rule_errors": rule_errors(gate),
        },
        indent=1,
        allow_nan=False,
    )


def _escape_data(text: str) -> str:
    # GitHub's workflow-command encoding for the message and for property values.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def to_github(gate: GateResult) -> str:
    """One ``::error``/``::warning``/``::notice`` line per finding, then one per failed rule
    (an error when it fails the gate, else a warning)."""
    kind = {"error": "error", "warning": "warning", "info": "notice"}
    lines = []
    for f in gate.findings:
        where = f" ({f.shown_module})" if f.shown_module else ""
        title = _escape_property(f"stabscope {f.rule}{where}")
        body = f.message + (f" Remedy: {f.remedy}" if f.remedy else "")
        lines.append(f"::{kind[f.severity]} title={title}::{_escape_data(body)}")
    for rule, line in zip(gate.failed, failure_lines(gate)):
        level = "error" if rule in gate.failed_blocking else "warning"
        title = _escape_property(f"stabscope {rule} failed")
        lines.append(f"::{level} title={title}::{_escape_data(line)}")
    return "\n".join(lines)


def to_junit(gate: GateResult, fail_on: str) -> str:
    """A testsuite with one testcase per rule: a failure when it has findings at ``fail_on``
    or worse, an error when the rule raised, skipped when it did not run."""
    failing = at_or_above(gate.findings, fail_on)
    suite = ET.Element(
        "testsuite",
        name=f"stabscope {gate.run_dir}",
        tests=str(len(gate.rule_ids)),
        failures=str(len({f.rule for f in failing})),
        errors=str(len(gate.failed)),
        skipped=str(len(set(gate.skipped) & set(gate.rule_ids))),
    )
    for rule in gate.rule_ids:
        case = ET.SubElement(suite, "testcase", classname="stabscope", name=rule)
        for f in failing:
            if f.rule == rule:
                fail = ET.SubElement(case, "failure", message=f.message, type=f.severity)
                fail.text = "\n".join(filter(None, [f.remedy, f.citation]))
        failure = gate.failed.get(rule)
        if failure is not None:
            error = ET.SubElement(case, "error", message=str(failure), type=failure.type)
            error.text = "the rule raised and did not check this run" + (
                "; the gate fails" if rule in gate.failed_blocking else ""
            )
        if rule in gate.skipped:
            ET.SubElement(case, "skipped", message=gate.skipped[rule])
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
