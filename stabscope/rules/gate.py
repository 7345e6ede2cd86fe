"""The CI gate as a library call: settings, rules, baseline, findings.json, the verdict.

The CLI only parses options, prints and exits; everything ``stabscope check`` decides is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FindingsError, UsageError
from ..settings import find_pyproject, read_toml_table
from ..store import NotARunError
from ..store.findings import (
    SEVERITIES,
    Finding,
    at_or_above,
    findings_state,
    load_findings,
    severity_rank,
    worst_first,
    write_findings,
)
from . import ALL_RULES, check_run, settings_from_mapping
from .base import RuleSettings, RunView
from .baseline import BASELINE, another_model, compare_to_baseline
from .failures import RuleFailure, isolated


@dataclass
class GateResult:
    run_dir: Path
    findings: list[Finding]  # worst first
    skipped: dict[str, str]
    failing: list[Finding]  # at --fail-on or worse
    rule_ids: list[str]
    failed: dict[str, RuleFailure] = field(default_factory=dict)  # rules that raised
    # Failed rules whose findings could have reached --fail-on: the gate cannot vouch for them.
    failed_blocking: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failing and not self.failed_blocking


def load_settings(config: Path | None) -> RuleSettings:
    """``[tool.stabscope.rules]`` of ``config``, else of the nearest pyproject.toml."""
    if config is not None and not config.is_file():
        raise UsageError(f"no such config file: {config}", hint="pass a TOML file")
    source = config or find_pyproject()
    try:
        table = read_toml_table(source, "tool", "stabscope", "rules") if source else {}
        return settings_from_mapping(table, str(source))
    except ValueError as e:
        raise UsageError(str(e), hint="see README: The CI gate") from None


def run_gate(
    run_dir: Path,
    fail_on: str = "error",
    config: Path | None = None,
    baseline: Path | None = None,
    factor: float = 10.0,
    allow_incomplete: bool = False,
) -> GateResult:
    """Check a run, write its findings.json, and say which findings fail the gate.
    ``allow_incomplete``: a killed or interrupted run is a warning, not an error."""
    if fail_on not in SEVERITIES:
        raise UsageError(f"bad --fail-on {fail_on!r}", hint=f"one of {', '.join(SEVERITIES)}")
    settings = load_settings(config)
    if allow_incomplete:
        settings.params.setdefault("run-status", {})["allow_incomplete"] = 1.0
    severity = {r.id: settings.severity_of(r) for r in ALL_RULES}
    try:
        result = check_run(run_dir, settings)
        if baseline is not None:
            run, base = RunView.open(run_dir), RunView.open(baseline)
            other = another_model(run.meta, base.meta)
            if other is not None:
                raise UsageError(
                    f"--baseline {baseline} is a run of another model: {other}",
                    hint="pass a run of this model from before the change, or leave out --baseline",
                )
            severity[BASELINE] = "error"
            found, failure = isolated(lambda: list(compare_to_baseline(run, base, factor)))
            result.findings[:0] = found or []
            if failure is not None:
                result.failed[BASELINE] = failure
    except NotARunError as e:
        hint = getattr(e, "hint", "pass a run directory or a model script")  # MetaError's
        raise UsageError(str(e), hint=hint) from None
    findings = worst_first(result.findings)
    write_findings(run_dir, findings)
    rule_ids = [r.id for r in ALL_RULES] + ([BASELINE] if baseline else [])
    cut = severity_rank(fail_on)
    blocking = [r for r in result.failed if severity_rank(severity[r]) <= cut]
    return GateResult(
        run_dir,
        findings,
        result.skipped,
        at_or_above(findings, fail_on),
        rule_ids,
        result.failed,
        blocking,
    )


@dataclass
class Verdict:
    """What the rules say about a run for a reader (the report, the summary, a notebook):
    the findings.json of the last ``check`` while it is current, else the rules run now."""

    findings: list[Finding]  # worst first
    source: str  # "findings.json", or why the rules ran now ("no findings.json")
    failed: dict[str, RuleFailure] = field(default_factory=dict)  # rules that raised now

    @property
    def judged_now(self) -> bool:
        return self.source != "findings.json"


def judge(run_dir: str | Path, config: Path | None = None) -> Verdict:
    """The run's findings without writing into the run: RUN/findings.json when it is current
    (``findings_state``), else every rule run now in memory, with the settings ``check``
    would use (``config``, else the nearest pyproject.toml). Only ``check`` writes
    findings.json: a reader may look at a run it cannot or should not change (a copy on a
    read-only mount, a run still being written)."""
    state = findings_state(run_dir)
    if state == "current":
        try:
            found = load_findings(run_dir)
        except FindingsError:
            state = "unreadable"
        else:
            if found is not None:
                return Verdict(found, "findings.json")
    why = {
        "missing": "no findings.json",
        "stale": "findings.json is older than the run",
        "unreadable": "findings.json cannot be read",
    }[state]
    try:
        result = check_run(run_dir, load_settings(config))
    except NotARunError as e:
        raise UsageError(str(e), hint=getattr(e, "hint", "pass a run directory")) from None
    return Verdict(worst_first(result.findings), why, result.failed)
