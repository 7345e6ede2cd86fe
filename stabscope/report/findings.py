"""A finding's numbers in words, as the report and the console show them (the findings
themselves: ``stabscope.store.findings``)."""

from __future__ import annotations

from ..store.findings import Finding


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
