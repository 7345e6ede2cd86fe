"""docs/rules.md's rule table against the rule registry: every registered rule has exactly one
row, and the row's severity, thresholds (names and default values) and source are the
registry's. A rule added, renamed or retuned without its row fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stabscope.rules import ALL_RULES, RULES_BY_ID

DOC = Path(__file__).resolve().parent.parent / "docs" / "rules.md"
HEADER = ("rule", "severity", "thresholds", "what it flags", "source")
# "`warning` 10, `error` 1e4": a backticked parameter name followed by its default.
PARAM = re.compile(r"`([a-z_]+)` ([0-9][0-9.e+-]*)")
# "Cohen et al. 2021, Gradient Descent ...; Cohen et al. 2022, ...": authors and year of each.
CITED = re.compile(r"^(.*?) (\d{4})\b")


def split_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def rule_rows(text: str, header: tuple[str, ...] = HEADER) -> dict[str, list[str]]:
    """The rows of the table headed ``header``, by rule id; a repeated id is an error."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if tuple(split_row(line)) == header)
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = split_row(line)
        assert len(cells) == len(header), f"row with {len(cells)} cells: {line[:80]}"
        match = re.fullmatch(r"`([a-z-]+)`", cells[0])
        assert match, f"first cell is not a rule id: {cells[0]!r}"
        assert match.group(1) not in rows, f"rule {match.group(1)} has two rows"
        rows[match.group(1)] = cells
    return rows


@pytest.fixture(scope="module")
def rows() -> dict[str, list[str]]:
    return rule_rows(DOC.read_text(encoding="utf-8"))


def test_the_table_lists_exactly_the_registered_rules(rows):
    registered = [r.id for r in ALL_RULES]
    assert len(set(registered)) == len(registered)
    missing = sorted(set(registered) - set(rows))
    extra = sorted(set(rows) - set(registered))
    assert not missing, f"rules without a row in docs/rules.md: {missing}"
    assert not extra, f"rows for rules that are not registered: {extra}"


def test_every_registered_rule_has_a_remedy_row():
    remedies = rule_rows(DOC.read_text(encoding="utf-8"), header=("rule", "remedy"))
    assert sorted(remedies) == sorted(RULES_BY_ID)
    assert all(cells[1] for cells in remedies.values())


@pytest.mark.parametrize("rule_id", sorted(RULES_BY_ID))
def test_a_row_says_what_the_registry_says(rows, rule_id):
    rule = RULES_BY_ID[rule_id]
    if rule_id not in rows:
        pytest.fail(f"{rule_id} has no row in docs/rules.md")
    _, severity, thresholds, flags, source = rows[rule_id]
    assert severity == rule.severity
    assert flags, f"{rule_id}: the row does not say what it flags"

    documented = {name: float(value) for name, value in PARAM.findall(thresholds)}
    if not rule.defaults:
        assert thresholds == "none"
    assert documented == pytest.approx({k: float(v) for k, v in rule.defaults.items()})

    cited = [CITED.match(part.strip()) for part in rule.citation.split(";") if part.strip()]
    if not cited:
        assert source == "", f"{rule_id} cites nothing, the row cites {source!r}"
    for match in cited:
        assert match, f"{rule_id}: citation without a year: {rule.citation!r}"
        authors, year = match.groups()
        assert authors in source and year in source, f"{rule_id}: {source!r} vs {rule.citation!r}"


def test_the_reader_sees_a_missing_row():
    """The checks above read the table through ``rule_rows``: with one row taken out of the real
    page, that rule is no longer among the rows."""
    text = DOC.read_text(encoding="utf-8")
    kept = "\n".join(line for line in text.splitlines() if not line.startswith("| `nonfinite` |"))
    assert "nonfinite" in rule_rows(text)
    assert "nonfinite" not in rule_rows(kept)
