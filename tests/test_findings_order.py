"""One worst-first order of findings everywhere: the rule engine's result, the gate's output,
findings.json and what the report and the summary read back. Errors, then warnings, then
infos; within a severity the earliest step first and findings without a step (about the whole
run) after those with one; then by rule and module."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from stabscope.cli import app
from stabscope.rules import ALL_RULES, RULES_BY_ID, check_run
from stabscope.rules.base import Rule, RunView
from stabscope.store.findings import FINDINGS_FILE, Finding, load_findings
from tests.rule_runs import write

# (severity, step, module), yielded in this scrambled order ...
YIELDED = [
    ("warning", None, None),
    ("warning", 3, "b"),
    ("error", 7, None),
    ("error", None, None),
    ("info", 1, None),
    ("warning", 3, "a"),
]
# ... and shown worst first, written out by hand.
WORST_FIRST = [
    ("error", 7, None),
    ("error", None, None),
    ("warning", 3, "a"),
    ("warning", 3, "b"),
    ("warning", None, None),
    ("info", 1, None),
]


def _scrambled(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    for severity, step, module in YIELDED:
        yield Finding("order-probe", severity, f"{severity} {step}", module=module, step=step)


ORDER_PROBE = Rule("order-probe", "Order probe", "", ("loss",), {}, _scrambled)


@pytest.fixture
def order_probe() -> Iterator[Rule]:
    ALL_RULES.append(ORDER_PROBE)
    RULES_BY_ID[ORDER_PROBE.id] = ORDER_PROBE
    try:
        yield ORDER_PROBE
    finally:
        ALL_RULES.remove(ORDER_PROBE)
        del RULES_BY_ID[ORDER_PROBE.id]


def _mine(items) -> list[tuple]:
    get = (lambda f, k: f[k]) if items and isinstance(items[0], dict) else getattr
    return [
        (get(f, "severity"), get(f, "step"), get(f, "module"))
        for f in items
        if get(f, "rule") == ORDER_PROBE.id
    ]


def test_every_list_of_findings_is_worst_first_in_one_order(tmp_path, order_probe):
    run = write(tmp_path / "run", [(s, "__run__", "loss", -1, 1.0) for s in range(4)])
    assert _mine(check_run(run).findings) == WORST_FIRST

    result = CliRunner().invoke(app, ["check", str(run), "--format", "json", "--fail-on", "info"])
    assert result.exit_code == 1, result.output
    assert _mine(json.loads(result.stdout)["findings"]) == WORST_FIRST
    assert _mine(json.loads((run / FINDINGS_FILE).read_text())) == WORST_FIRST
    assert _mine(load_findings(run)) == WORST_FIRST
