"""The rule engine: a rule is a pure function of a run (its table and meta) to findings.

Rules read the run directory only (pandas/pyarrow, no torch). Each declares its id, the paper
it comes from, and its thresholds with documented defaults; users override thresholds and
severities, or disable rules, in ``[tool.stabscope.rules]`` or a ``--config`` file. A rule
whose inputs were not recorded is skipped with a note, never an error; a rule that raises is
recorded as failed (``CheckResult.failed``), never the gate's crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..store.findings import Finding, worst_first
from ..store.memory import Unwritten
from .applicability import inapplicable
from .failures import RuleFailure, isolated
from .view import Request, RunView

#: How the reason of a rule skipped for metrics the run did not record begins.
UNRECORDED = "not recorded: "


@dataclass(frozen=True)
class Rule:
    """One check. ``check(view, params) -> findings``; ``params`` are its thresholds."""

    id: str
    title: str
    citation: str
    needs: tuple[str, ...]  # metrics; the rule is skipped when none of them was recorded
    defaults: dict[str, float]
    check: Callable[[RunView, dict[str, float]], Iterable[Finding]]
    severity: str = "error"  # the severity of its worst finding, unless configured otherwise
    # What ``check`` reads, when that is not just ``needs`` at every step; all rules' reads
    # come from one pass over the run (a read not declared costs one more pass).
    reads: tuple[Request, ...] = ()
    # Whether a verdict on the steps written so far holds while the run trains (the online
    # rules of ``rules.online``): false for rules that need the whole run (how it ended, a
    # stall after the first step, a forecast to the planned end).
    online: bool = True

    @property
    def requests(self) -> tuple[Request, ...]:
        if self.reads or not self.needs:
            return self.reads
        return (Request(self.needs),)


@dataclass
class RuleSettings:
    """What the user changed: disabled rules, thresholds, severities."""

    disabled: set[str] = field(default_factory=set)
    params: dict[str, dict[str, float]] = field(default_factory=dict)
    severity: dict[str, str] = field(default_factory=dict)

    def severity_of(self, rule: Rule) -> str:
        """The severity of ``rule``'s worst finding: the user's override, else the rule's."""
        return self.severity.get(rule.id, rule.severity)


@dataclass
class CheckResult:
    findings: list[Finding]
    skipped: dict[str, str]  # rule id -> why (disabled, or its inputs were not recorded)
    failed: dict[str, RuleFailure] = field(default_factory=dict)  # rule id -> what it raised


def graded(value: float, p: dict[str, float]) -> tuple[str, float] | None:
    """("error", threshold) or ("warning", threshold) when ``value`` passes ``p["error"]`` or
    ``p["warning"]``; None below both (and for NaN)."""
    if value > p["error"]:
        return "error", p["error"]
    if value > p["warning"]:
        return "warning", p["warning"]
    return None


def finding(rule: Rule, severity: str, message: str, **fields: Any) -> Finding:
    """A finding of ``rule``; ``citation`` may replace the rule's own where it does not apply
    to this finding ("" for none)."""
    fields.setdefault("citation", rule.citation)
    return Finding(rule=rule.id, severity=severity, message=message, **fields)


def loss_finding(
    rule: Rule, message: str, step: int, value: float, threshold: float, remedy: str
) -> Finding:
    """An error read from the run's loss series, said at ``step`` (its last step read)."""
    return finding(
        rule,
        "error",
        message,
        module=None,
        step=step,
        value=value,
        threshold=threshold,
        metric="loss",
        remedy=remedy,
    )


def finding_at(
    rule: Rule, severity: str, message: str, row: Any, value: float | None = None, **fields: Any
) -> Finding:
    """A finding located at a table row: the row's module, step and (unless given) value."""
    return finding(
        rule,
        severity,
        message,
        module=str(row.module),
        step=int(row.step),
        value=float(row.value if value is None else value),
        **fields,
    )


def _findings_of(rule: Rule, view: RunView, params: dict[str, float]) -> list[Finding] | None:
    """The rule's findings; None when none of its inputs was recorded."""
    if rule.needs and not view.has(*rule.needs):
        return None
    return list(rule.check(view, params))


def run_rules(
    run_dir: str | Path,
    rules: list[Rule],
    settings: RuleSettings | None = None,
    until: int | None = None,
    memory: Unwritten | None = None,
) -> CheckResult:
    """Every enabled rule on one run (its steps before ``until``), worst findings first;
    ``memory``: rows no part holds yet, while the run trains (``rules.view``)."""
    settings = settings or RuleSettings()
    view = RunView.open(run_dir, until, memory)
    view.plan(r for rule in rules if rule.id not in settings.disabled for r in rule.requests)
    found: list[Finding] = []
    skipped: dict[str, str] = {}
    failed: dict[str, RuleFailure] = {}
    for rule in rules:
        if rule.id in settings.disabled:
            skipped[rule.id] = "disabled"
            continue
        params = {**rule.defaults, **settings.params.get(rule.id, {})}
        # Reading the rule's inputs is part of the rule: a table it cannot read fails it alone.
        findings, failure = isolated(partial(_findings_of, rule, view, params))
        if failure is not None:
            failed[rule.id] = failure
            continue
        if findings is None:
            why = inapplicable(rule.needs, view.structure)
            skipped[rule.id] = why or f"{UNRECORDED}{', '.join(rule.needs)}"
            continue
        for f in findings:
            override = settings.severity.get(rule.id)
            if override is not None and f.severity != "info":
                f = Finding(**{**f.__dict__, "severity": override})
            found.append(f)
    return CheckResult(worst_first(found), skipped, failed)
