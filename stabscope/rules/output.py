"""Findings as JSON, GitHub workflow annotations and JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict

from ..report.findings import SEVERITIES, Finding


def at_or_above(findings: list[Finding], level: str) -> list[Finding]:
    """Findings whose severity is ``level`` or worse."""
    cut = SEVERITIES.index(level)
    return [f for f in findings if SEVERITIES.index(f.severity) <= cut]


def to_json(run: str, findings: list[Finding], skipped: dict[str, str], failed: bool) -> str:
    return json.dumps(
        {
            "run": run,
            "failed": failed,
            "findings": [asdict(f) for f in findings],
            "skipped": skipped,
        },
        indent=1,
    )


def _escape_data(text: str) -> str:
    # GitHub's workflow-command encoding for the message and for property values.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def to_github(findings: list[Finding]) -> str:
    """One ``::error``/``::warning``/``::notice`` line per finding."""
    kind = {"error": "error", "warning": "warning", "info": "notice"}
    lines = []
    for f in findings:
        title = _escape_property(f"stabscope {f.rule}" + (f" ({f.module})" if f.module else ""))
        body = f.message + (f" Remedy: {f.remedy}" if f.remedy else "")
        lines.append(f"::{kind[f.severity]} title={title}::{_escape_data(body)}")
    return "\n".join(lines)


def to_junit(run: str, rule_ids: list[str], findings: list[Finding], fail_on: str) -> str:
    """A testsuite with one testcase per rule: failed when it has findings at ``fail_on`` or
    worse, skipped when it did not run."""
    failing = at_or_above(findings, fail_on)
    suite = ET.Element(
        "testsuite",
        name=f"stabscope {run}",
        tests=str(len(rule_ids)),
        failures=str(len({f.rule for f in failing})),
    )
    for rule in rule_ids:
        case = ET.SubElement(suite, "testcase", classname="stabscope", name=rule)
        for f in failing:
            if f.rule == rule:
                fail = ET.SubElement(case, "failure", message=f.message, type=f.severity)
                fail.text = "\n".join(filter(None, [f.remedy, f.citation]))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
