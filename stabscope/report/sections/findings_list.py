"""Section 2: the rules' findings, worst first, each linked to the plot that shows it."""

from __future__ import annotations

from ...store.findings import Finding, worst_first_key
from ..figures import esc
from ..findings import evidence
from . import Context, Section

SHOWN = 300  # a page of findings is read; past that, the rules need tuning, not scrolling


def _item(finding: Finding, run: str, several: bool, ctx: Context) -> str:
    target = ctx.figures.get(finding.metric or "")
    parts = [
        f'<span class="sev">{esc(finding.severity)}</span> <b>{esc(finding.rule)}</b>',
        f' <span class="run">{esc(run)}</span>' if several else "",
        f'<div class="msg">{esc(finding.message)}</div>',
        f'<div class="evidence">{esc(evidence(finding))}</div>' if evidence(finding) else "",
        f'<div class="remedy">remedy: {esc(finding.remedy)}</div>' if finding.remedy else "",
        f'<div class="cite">{esc(finding.citation)}</div>' if finding.citation else "",
        f'<a class="plot-link" href="#{esc(target)}">see the plot</a>' if target else "",
    ]
    return f'<li class="finding sev-{esc(finding.severity)}">{"".join(parts)}</li>'


def findings_section(ctx: Context) -> Section:
    section = Section(
        "findings",
        "Findings",
        intro="What the rules found, worst first, with the numbers behind each finding.",
    )
    tagged: list[tuple[Finding, str]] = []
    for name, findings in ctx.findings.items():
        if name in ctx.findings_sources:
            section.notes.append(f"{name}: {ctx.findings_sources[name]}")
        if findings is None:
            section.notes.append(f"no rules have run on {name} (no findings.json)")
        elif not findings:
            section.notes.append(f"{name}: the rules found nothing")
        tagged += [(f, name) for f in findings or []]
    if not tagged:
        return section
    tagged.sort(key=lambda pair: worst_first_key(pair[0]))
    several = len(ctx.findings) > 1
    items = "".join(_item(f, run, several, ctx) for f, run in tagged[:SHOWN])
    section.body.append(f'<ol class="findings" id="findings-list">{items}</ol>')
    if len(tagged) > SHOWN:
        section.notes.append(f"{len(tagged) - SHOWN} more findings are not shown")
    return section
