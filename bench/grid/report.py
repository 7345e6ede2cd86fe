"""Markdown tables of the grid: its truth, and the detectors' leave-one-out scores."""

from __future__ import annotations

from typing import Any

#: The held-out groups, by Run attribute: leave-one-family-out, leave-one-kind-out.
GROUPS = {"family": "leave-one-family-out", "kind": "leave-one-kind-out"}


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
    """One row per held-out group and pooled; per detector precision / recall / lead."""
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


def pooled_table(tables: dict[str, dict]) -> str:
    """Per K, each detector's pooled precision / recall / lead under each held-out grouping."""
    first = next(iter(tables.values()))
    names = list(next(iter(first.values())))
    head = "| K | held out | " + " | ".join(names) + " |"
    lines = [head, "|---|---|" + "---|" * len(names)]
    for k in first:
        for group, by_k in tables.items():
            cells = [" / ".join(_fmt(x) for x in by_k[k][n]["pooled"].row()) for n in names]
            lines.append(f"| {k}% | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(all_runs, runs, dropped, truths, tables, notes) -> str:
    """``tables``: {group: {K: {detector: {held-out name or "pooled": Score}}}}."""
    n_fail = sum(r.failed for r in runs)
    parts = [
        f"# Grid: {len(all_runs)} runs, {len(runs)} scored ({n_fail} failed), "
        f"{len(dropped)} configs dropped as unstable",
        "",
        truth_table(runs, truths),
    ]
    if dropped:
        parts += ["", "Dropped (seeds disagree or too close to the margin): " + ", ".join(dropped)]
    parts += ["", "Pooled precision / recall / median lead:", "", pooled_table(tables)]
    for group, by_k in tables.items():
        parts += ["", f"## {GROUPS[group].capitalize()}"]
        for k, scores in by_k.items():
            parts += ["", score_table(k, scores, notes[k])]
    parts += ["", "Thresholds in brackets: the calibrated ones the folds used."]
    return "\n".join(parts)
