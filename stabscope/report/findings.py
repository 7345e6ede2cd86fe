"""Findings of the rules, read from ``RUN_DIR/findings.json``, worst first.

The file is a list of objects with ``rule, severity, module, step, value, threshold,
message, citation, remedy, metric``. No file means no rules have run on the run, which
the report and the summary say rather than showing an empty list as "all clear".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FindingsError

FINDINGS_FILE = "findings.json"
SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    message: str
    module: str | None = None
    step: int | None = None
    value: float | None = None
    threshold: float | None = None
    citation: str = ""
    remedy: str = ""
    metric: str | None = None
    #: The signals behind a combined verdict (the failure forecast): per signal its name,
    #: value, contribution to the log-odds and one line of evidence, strongest first.
    evidence: tuple[dict[str, Any], ...] = ()

    @property
    def rank(self) -> int:
        return SEVERITIES.index(self.severity) if self.severity in SEVERITIES else len(SEVERITIES)


def _number(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if not math.isnan(value) else None


def _text(x: Any) -> str | None:
    return None if x is None else str(x)


def parse_finding(item: dict[str, Any]) -> Finding:
    step = _number(item.get("step"))
    return Finding(
        rule=str(item.get("rule") or "?"),
        severity=str(item.get("severity") or "info").lower(),
        message=str(item.get("message") or ""),
        module=_text(item.get("module")),
        step=None if step is None or math.isinf(step) else int(step),
        value=_number(item.get("value")),
        threshold=_number(item.get("threshold")),
        citation=str(item.get("citation") or ""),
        remedy=str(item.get("remedy") or ""),
        metric=_text(item.get("metric")),
        evidence=tuple(e for e in item.get("evidence") or () if isinstance(e, dict)),
    )


def worst_first_key(f: Finding) -> tuple[int, bool, int, str, str]:
    """Errors, then warnings, then infos; within a severity the earliest step first."""
    return (f.rank, f.step is None, f.step or 0, f.rule, f.module or "")


def worst_first(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=worst_first_key)


def load_findings(run_dir: str | Path) -> list[Finding] | None:
    """The run's findings worst first, or None when no rules have run on it."""
    path = Path(run_dir) / FINDINGS_FILE
    if not path.is_file():
        return None
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FindingsError(f"{path} cannot be read: {err}") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise FindingsError(f"{path} is not a list of findings")
    return worst_first([parse_finding(i) for i in items])


def evidence(finding: Finding) -> str:
    """``value 3.2 (threshold 2) at step 40 in blocks.3``: the numbers behind a finding."""
    parts = []
    if finding.value is not None:
        parts.append(f"{finding.metric or 'value'} = {finding.value:.4g}")
    if finding.threshold is not None:
        parts.append(f"threshold {finding.threshold:.4g}")
    where = []
    if finding.module:
        where.append(f"in {finding.module}")
    if finding.step is not None:
        where.append(f"at step {finding.step}")
    return ", ".join(parts) + (" " if parts and where else "") + " ".join(where)
