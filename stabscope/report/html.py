"""Page assembly: one self-contained HTML file, plotly.js inlined once, no network."""

from __future__ import annotations

import time
from collections.abc import Sequence

from plotly.offline import get_plotlyjs

from ..version import __version__
from .figures import esc
from .sections import Section

CSS = """
:root { --ink: #1d232b; --muted: #5b6570; --line: #dde2e7; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--ink); background: var(--bg); }
header.top { background: #14202e; color: #fff; padding: 18px 32px 12px; }
header.top h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header.top .sub { color: #b9c4cf; }
nav { position: sticky; top: 0; z-index: 10; background: #fff; border-bottom: 1px solid var(--line);
      padding: 8px 32px; display: flex; gap: 18px; flex-wrap: wrap; }
nav a { color: var(--muted); text-decoration: none; }
nav a:hover { color: var(--ink); }
nav a .n { color: #9aa4ae; }
main { padding: 8px 32px 40px; max-width: 1600px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px;
          margin: 18px 0; padding: 14px 20px; }
section h2 { margin: 0 0 6px; font-size: 18px; font-weight: 600; }
p.intro { color: var(--muted); margin: 0 0 8px; max-width: 1000px; }
p.note { margin: 4px 0; padding: 4px 10px; background: #fff8e1; border-left: 3px solid #e0a800;
         color: #5c4a00; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { text-align: left; vertical-align: top; padding: 5px 10px;
         border-bottom: 1px solid var(--line); }
table.runs th:first-child { color: var(--muted); font-weight: 500; white-space: nowrap; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; word-break: break-all; }
.status { font-weight: 600; padding: 1px 8px; border-radius: 10px; background: #eee; }
.status-complete { background: #e3f4e6; color: #1c6b2c; }
.status-failed { background: #fde5e1; color: #a3241a; }
.status-running { background: #fff1cc; color: #8a5b00; }
.status-interrupted { background: #fff1cc; color: #8a5b00; }
.status-killed, .status-unfinished, .status-stopped { background: #fde5e1; color: #a3241a; }
ol.findings { padding-left: 24px; }
li.finding { margin: 8px 0; padding: 6px 10px; border-left: 4px solid #aab4be;
             background: #fafbfc; }
li.sev-error { border-color: #c8321e; } li.sev-warning { border-color: #e0a800; }
li.finding .sev { text-transform: uppercase; font-size: 11px; font-weight: 700;
                  color: var(--muted); }
li.sev-error .sev { color: #c8321e; } li.sev-warning .sev { color: #a87a00; }
li.finding .run { color: var(--muted); }
li.finding .evidence, li.finding .cite { color: var(--muted); font-size: 13px; }
li.finding .remedy { font-size: 13px; }
.plotly-graph-div { margin: 10px 0; }
footer { color: var(--muted); padding: 0 32px 24px; font-size: 12px; }
"""


def render_section(number: int, section: Section) -> str:
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in section.notes)
    intro = f'<p class="intro">{section.intro}</p>' if section.intro else ""
    return (
        f'<section id="{esc(section.id)}"><h2>{number}. {esc(section.title)}</h2>'
        f"{intro}{notes}{''.join(section.body)}</section>"
    )


def page(run_names: Sequence[str], sections: Sequence[Section]) -> str:
    """The whole document. plotly.js goes in the head, once, so every figure's script can
    draw as soon as its div is parsed."""
    title = "stabscope report: " + ", ".join(run_names)
    nav = "".join(
        f'<a href="#{esc(s.id)}"><span class="n">{i}</span> {esc(s.title)}</a>'
        for i, s in enumerate(sections, start=1)
    )
    body = "".join(render_section(i, s) for i, s in enumerate(sections, start=1))
    made = time.strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f'<header class="top"><h1>stabscope report</h1><div class="sub">'
        f"{esc(', '.join(run_names))}</div></header><nav>{nav}</nav><main>{body}</main>"
        f"<footer>stabscope {esc(__version__)} · written {esc(made)} · opens offline</footer>"
        "</body></html>"
    )
