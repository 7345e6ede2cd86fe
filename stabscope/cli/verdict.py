"""The findings a reading command shows: the last ``check``'s findings.json while it is
current, else the rules run now (``rules.gate.judge``), with a note saying which."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..store.findings import SEVERITIES, Finding
from ..wording import counted

if TYPE_CHECKING:
    from ..analysis.summary import Summary


def findings_for(run_dir: Path) -> tuple[list[Finding] | None, str | None]:
    """The run's findings and, when the rules ran now, a note that says why and that
    ``check`` is the gate that writes them. Nothing is written into the run."""
    from ..rules.gate import judge

    try:
        verdict = judge(run_dir)
    except UsageError as e:  # a bad [tool.stabscope.rules]: show the rest of the run
        return None, f"the rules could not run: {e}"
    if not verdict.judged_now:
        return verdict.findings, None
    note = f"judged now by the rules ({verdict.source}); "
    note += "`stabscope check` gates and writes findings.json"
    if verdict.failed:
        note += f"; rules that raised: {', '.join(sorted(verdict.failed))}"
    return verdict.findings, note


def json_record(
    headline: Summary, findings: list[Finding] | None, note: str | None
) -> dict[str, Any]:
    """The one JSON object of ``summary --json`` and ``profile --json``: the summary, the
    findings worst first (null when no rules could run) and where they came from."""
    from ..analysis.summary import summary_record
    from ..store.findings import finding_record

    return {
        "summary": summary_record(headline),
        "findings": None if findings is None else [finding_record(f) for f in findings],
        "findings_source": note or "findings.json",
    }


def verdict_line(headline: Summary, findings: list[Finding] | None) -> str:
    """What ``--quiet`` keeps of a run: ``run RUN: complete, 200 steps; findings: 1 error,
    2 warnings`` (plain text, one line), and the live errors that the whole run no longer
    bears out (``withdrawn``)."""
    line = f"run {headline.run_dir}: {headline.status}, {headline.steps} steps"
    if headline.status_detail:
        line += f" ({headline.status_detail})"
    if findings is None:
        return line + "; findings: the rules did not run"
    counts = [(sum(f.severity == s for f in findings), s) for s in SEVERITIES]
    said = [counted(n, s) for n, s in counts if n]
    line += f"; findings: {', '.join(said) or 'none'}"
    gone = withdrawn(headline.run_dir, findings)
    if gone:
        line += f"; {'; '.join(gone)}"
    return line


def withdrawn(run_dir: Path, findings: list[Finding] | None = None) -> list[str]:
    """The live errors (meta.json ``online.findings``, printed as ``error:`` while the run
    trained) that the rules on the whole run (``findings``; judged here where not given and
    only where there was a live error) no longer find as errors, each said once: a loss
    that rose for a while and came back. The live line stays on the console; this says
    that the verdict on the whole run took it back."""
    from ..store.run_meta import load_meta

    try:
        live = (load_meta(run_dir).doc.get("online") or {}).get("findings") or []
    except (OSError, ValueError):
        return []
    live = [f for f in live if isinstance(f, dict) and f.get("severity") == "error"]
    if not live:
        return []
    if findings is None:
        findings = findings_for(run_dir)[0] or []
    # By rule, not by module: a residual stream whose fastest-growing layer moved as it
    # trained was a live error at other layers than the one the whole run names.
    standing = {f.rule for f in findings if f.severity == "error"}
    said: dict[Any, str] = {}
    for f in live:
        rule = f.get("rule")
        if rule not in standing and rule not in said:
            said[rule] = (
                f"the live error {rule} (seen after step {f.get('seen_at')}) is not an "
                "error of the whole run"
            )
    return list(said.values())
