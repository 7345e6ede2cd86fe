"""Markdown tables of the grid: its truth, and the detectors' leave-one-family-out scores."""

from __future__ import annotations

from typing import Any


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def truth_table(runs: list[Any], truths: dict) -> str:
    """failed/healthy counts per family x failure kind, and how the failures failed."""
    families = sorted({r.family for r in runs})
    kinds = sorted({r.kind for r in runs})
    lines = [
        "| family | " + " | ".join(kinds) + " | all |",
        "|---|" + "---|" * (len(kinds) + 1),
    ]
    for fam in [*families, None]:
        cells = []
        for kind in [*kinds, None]:
            sel = [r for r in runs if fam in (None, r.family) and kind in (None, r.kind)]
            n_fail = sum(r.failed for r in sel)
            cells.append(f"{n_fail}/{len(sel) - n_fail}" if sel else "")
        lines.append(f"| {fam or 'all'} | " + " | ".join(cells) + " |")
    how: dict[str, int] = {}
    for r in runs:
        how[truths[r.path]["kind"]] = how.get(truths[r.path]["kind"], 0) + 1
    lines.append("")
    lines.append("Cells: failed/healthy runs. Outcomes: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(how.items())))  # fmt: skip
    return "\n".join(lines)


def score_table(k: int, scores: dict[str, dict], note: str) -> str:
    """One row per held-out family and pooled; per detector precision / recall / lead."""
    names = list(scores)
    families = list(next(iter(scores.values())))
    head = "| held out | " + " | ".join(f"{n} P / R / lead" for n in names) + " |"
    lines = [f"K = {k}% ({note})", "", head, "|---|" + "---|" * len(names)]
    for fam in [f for f in families if f != "pooled"] + ["pooled"]:
        cells = []
        for n in names:
            s = scores[n][fam]
            p, r, lead = s.row()
            used = "/".join(f"{t:g}" for t in sorted(set(s.thresholds)))
            thr = "" if n in ("gate", "rules") else f" ({used})"
            cells.append(f"{_fmt(p)} / {_fmt(r)} / {_fmt(lead)}{thr}")
        label = f"**{fam}**" if fam == "pooled" else fam
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(all_runs, runs, dropped, truths, tables, notes) -> str:
    n_fail = sum(r.failed for r in runs)
    parts = [
        f"# Grid: {len(all_runs)} runs, {len(runs)} scored ({n_fail} failed), "
        f"{len(dropped)} configs dropped as unstable",
        "",
        truth_table(runs, truths),
    ]
    if dropped:
        parts += ["", "Dropped (seeds disagree or too close to the margin): " + ", ".join(dropped)]
    for k, scores in tables.items():
        parts += ["", score_table(k, scores, notes[k])]
    parts += ["", "Thresholds in brackets: the calibrated ones the folds used."]
    return "\n".join(parts)
