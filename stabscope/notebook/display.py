"""The HTML a notebook shows for a ``Run``: its headline numbers and its findings."""

from __future__ import annotations

from html import escape

from ..analysis.summary import Summary
from ..store.findings import Finding

SHOWN = 10  # findings listed; the rest are counted


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _rows(s: Summary) -> list[tuple[str, str]]:
    rows = [("status", s.status_detail or s.status)]
    rows.append(("steps", f"{s.steps} (recorded {s.recorded_steps}), {s.rows:,} rows"))
    if s.structure:
        rows.append(("structure", s.structure))
    if s.loss_first is not None:
        rows.append(("loss", f"{_number(s.loss_first)} -> {_number(s.loss_last)} (last tenth)"))
    if s.largest:
        top = ", ".join(f"{n} {_number(v)}" for n, v in s.largest)
        rows.append((f"largest {s.extremes_metric} at step {s.extremes_step}", top))
    for t in (s.trend, s.param_trend):
        if t is not None:
            rows.append((f"depth trend of {t.metric}", f"{t.direction} (x{t.first_to_last:.3g})"))
    for line in s.headlines:
        label, _, value = line.partition(": ")
        rows.append((label, value))
    for direction, where in s.first_nonfinite.items():
        where_text = f"{where['module']} at step {where['step']}"
        rows.append((f"first non-finite ({direction})", where_text))
    if s.error:
        rows.append(("error", f"{s.error.get('type')}: {s.error.get('message')}"))
    return rows


def _finding(f: Finding) -> str:
    remedy = f"<br><i>remedy: {escape(f.remedy)}</i>" if f.remedy else ""
    return f"<li><b>{escape(f.severity)}</b> {escape(f.rule)}: {escape(f.message)}{remedy}</li>"


def run_html(s: Summary, findings: list[Finding], source: str) -> str:
    """A table of the headline numbers, then the findings worst first (and where they came
    from when not from the run's findings.json)."""
    table = "".join(
        f'<tr><th style="text-align:left">{escape(k)}</th><td style="text-align:left">'
        f"{escape(v)}</td></tr>"
        for k, v in _rows(s)
    )
    origin = "" if source == "findings.json" else f" (judged now: {escape(source)})"
    if findings:
        items = "".join(_finding(f) for f in findings[:SHOWN])
        more = f"<p>and {len(findings) - SHOWN} more</p>" if len(findings) > SHOWN else ""
        listed = f"<p><b>findings</b> ({len(findings)}, worst first){origin}</p><ol>{items}</ol>"
        listed += more
    else:
        listed = f"<p><b>findings</b>: none{origin}</p>"
    return (
        f'<div class="stabscope-run"><p><b>run</b> {escape(str(s.run_dir))}</p>'
        f"<table>{table}</table>{listed}</div>"
    )
