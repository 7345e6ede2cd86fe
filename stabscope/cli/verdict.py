"""The findings a reading command shows: the last ``check``'s findings.json while it is
current, else the rules run now (``rules.gate.judge``), with a note saying which."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..store.findings import Finding


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
