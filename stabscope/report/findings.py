"""A finding's numbers in words, as the report and the console show them (the findings
themselves: ``stabscope.store.findings``)."""

from __future__ import annotations

from ..store.findings import Finding


def evidence(finding: Finding) -> str:
    """``value 3.2, threshold 2, from grad_rms in blocks.3 at step 40``: the numbers behind a
    finding. The value is the rule's statistic (a ratio, a z-score, a count), read from the
    metric named, not that metric's own value: "grad_norm = 1627" read as a gradient norm
    when 1627 was its z-score."""
    parts = []
    if finding.value is not None:
        parts.append(f"value {finding.value:.4g}")
    if finding.threshold is not None:
        parts.append(f"threshold {finding.threshold:.4g}")
    if finding.metric and parts:
        parts.append(f"from {finding.metric}")
    where = []
    if finding.shown_module:
        where.append(f"in {finding.shown_module}")
    if finding.step is not None:
        where.append(f"at step {finding.step}")
    return ", ".join(parts) + (" " if parts and where else "") + " ".join(where)
