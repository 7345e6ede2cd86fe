"""Findings of the rules: the type, the severities, the one worst-first order, and
``RUN_DIR/findings.json`` (written by the gate, read by the report and the summary).

The file is a list of objects with ``rule, severity, module, step, value, threshold,
message, citation, remedy, metric, evidence``. No file means no rules have run on the run,
which the report and the summary say rather than showing an empty list as "all clear".
Every list of findings a user sees (the gate's output, findings.json, the console, the HTML
report) is in ``worst_first`` order. No torch import here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import FindingsError
from .atomic import write_text_atomically
from .layout import FINDINGS_FILE, META_FILE, PARTS_DIR, RANK_ERROR_PREFIX, RANK_FAULT_PREFIX
from .schema import RUN_MODULE

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
        return severity_rank(self.severity)

    @property
    def shown_module(self) -> str | None:
        return shown_module(self.module)


def shown_module(module: str | None) -> str | None:
    """A finding's module as text shows it: none for the run as a whole (``__run__``, which
    the JSON keeps), the module otherwise."""
    return None if module in (None, "", RUN_MODULE) else module


def severity_rank(severity: str) -> int:
    """0 for an error, 1 for a warning, 2 for an info; an unknown severity after them."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


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
    """Errors, then warnings, then infos; within a severity the earliest step first, findings
    without a step (about the whole run) after those with one; then by rule and module."""
    return (f.rank, f.step is None, f.step or 0, f.rule, f.module or "")


def worst_first(findings: Iterable[Finding]) -> list[Finding]:
    """The one order of findings everywhere they are shown or written."""
    return sorted(findings, key=worst_first_key)


def at_or_above(findings: Iterable[Finding], level: str) -> list[Finding]:
    """Findings whose severity is ``level`` or worse."""
    cut = severity_rank(level)
    return [f for f in findings if f.rank <= cut]


def finding_record(f: Finding) -> dict[str, Any]:
    """A finding as a JSON object; a non-finite number is null (strict JSON has no NaN or
    Infinity, and a CI job's parser rejects them)."""
    return {k: strict_json(v) for k, v in asdict(f).items()}


def strict_json(v: Any) -> Any:
    """``v`` with every non-finite float as None, in lists, tuples and dicts too."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    return v


def write_findings(run_dir: str | Path, findings: Iterable[Finding]) -> Path:
    """``RUN_DIR/findings.json``, worst first, which ``report`` and ``summary`` show."""
    path = Path(run_dir) / FINDINGS_FILE
    records = [finding_record(f) for f in worst_first(findings)]
    write_text_atomically(path, json.dumps(records, indent=1, allow_nan=False) + "\n")
    return path


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


def findings_state(run_dir: str | Path) -> str:
    """``current``, ``missing`` or ``stale``: whether RUN/findings.json still speaks for the
    run. It is stale when meta.json or a part was written after it (the run went on, or was
    recorded again, after the last ``check``). The writer touches meta.json whenever a part
    lands and at close, so a run that changed after the check always has a newer file."""
    path = Path(run_dir) / FINDINGS_FILE
    try:
        written = path.stat().st_mtime_ns
    except OSError:
        return "missing"
    run = Path(run_dir)
    # A rank's error or tool fault written after the check changes what the run-status rule
    # says (store/rank_errors.py).
    sources = [run / META_FILE, *run.glob(f"{RANK_ERROR_PREFIX}*.json")]
    sources += run.glob(f"{RANK_FAULT_PREFIX}*.json")
    parts = run / PARTS_DIR
    if parts.is_dir():
        sources += [p for p in parts.iterdir() if not p.name.startswith(".")]
    for source in sources:
        try:
            if source.stat().st_mtime_ns > written:
                return "stale"
        except OSError:  # a part renamed or removed meanwhile: judge by the others
            continue
    return "current"


__all__ = [
    "FINDINGS_FILE",
    "SEVERITIES",
    "Finding",
    "at_or_above",
    "finding_record",
    "findings_state",
    "load_findings",
    "parse_finding",
    "severity_rank",
    "strict_json",
    "worst_first",
    "worst_first_key",
    "write_findings",
]
