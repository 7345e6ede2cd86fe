"""One readable-parts policy for every reader: a part with a foreign schema, one without the
``value`` column, one with a float64 ``value`` and a truncated one, next to good parts, are
skipped (warned once, with the reason) by load_run, check, summary and report alike, which all
read exactly the good rows; the gate fails on the rows lost (``run-status``) unless told to
gate on what is readable (``--allow-incomplete``)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from stabscope.analysis.summary import summarize
from stabscope.cli import app
from stabscope.cli import common as cli_common
from stabscope.report.build import build_report
from stabscope.report.runs import open_run
from stabscope.rules import check_run
from stabscope.store import StabscopeWarning, list_parts, load_run
from tests.report_runs import loss_at, write_run

REASONS = {
    "part-000100.parquet": "no column 'step'",
    "part-000101.parquet": "no column 'value'",
    "part-000102.parquet": "column 'value' is double, expected float",
    "part-000103.parquet": "unreadable",
}


@pytest.fixture
def mixed_run(tmp_path):
    """A real run of 4 good parts (2 steps each), the rows they hold (read back with plain
    pyarrow), and four bad parts beside them."""
    run = write_run(tmp_path / "run", layers=2, steps=range(8), part_rows=96)
    good = sorted((run / "parts").glob("part-*.parquet"))
    assert len(good) == 4
    rows = pa.concat_tables([pq.read_table(p) for p in good]).to_pandas()
    parts = run / "parts"
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), parts / "part-000100.parquet")
    # The run's own columns without `value`: loss rows a dataset scan would fill with NaN.
    table = pq.read_table(good[0])
    loss = pc_equal(table, "metric", "loss")
    pq.write_table(loss.drop_columns(["value"]), parts / "part-000101.parquet")
    doubled = loss.set_column(7, "value", pa.array(np.full(loss.num_rows, 1e9), pa.float64()))
    pq.write_table(doubled, parts / "part-000102.parquet")
    (parts / "part-000103.parquet").write_bytes(good[1].read_bytes()[:200])
    return run, rows


def pc_equal(table: pa.Table, column: str, value: str) -> pa.Table:
    keep = np.array([v == value for v in table.column(column).to_pylist()])
    return table.filter(pa.array(keep))


def key(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows as plain values in a fixed order, to compare two readers' rows."""
    cols = ["step", "rank", "phase", "module", "call", "metric", "index", "value"]
    out = frame[cols].astype({c: str for c in ("phase", "module", "metric")})
    return out.sort_values(cols[:-1], kind="stable", ignore_index=True)


def caught_notes(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, StabscopeWarning)]


def test_policy_lists_each_bad_part_with_its_reason(mixed_run):
    run, rows = mixed_run
    parts = list_parts(run)
    assert [p.name for p in parts.files] == [f"part-00000{i}.parquet" for i in range(4)]
    assert parts.rows == len(rows)
    assert {path.name: note for path, note in parts.skipped}.keys() == REASONS.keys()
    for path, note in parts.skipped:
        assert str(path) in note and REASONS[path.name] in note


def test_load_run_reads_the_good_rows_and_warns_once(mixed_run):
    run, rows = mixed_run
    frame, notes = caught_notes(lambda: load_run(run))
    pd.testing.assert_frame_equal(key(frame), key(rows))
    assert sorted(notes) == sorted(n for _, n in list_parts(run).skipped)
    again, notes = caught_notes(lambda: load_run(run, metrics="loss", merge_ranks=True))
    assert not notes  # each part once per process
    assert np.isfinite(again.value).all() and again.value.max() < 1e9


@pytest.mark.slow
def test_check_sees_no_false_nonfinite_and_summary_and_report_the_good_rows(mixed_run, tmp_path):
    run, rows = mixed_run
    with warnings.catch_warnings():  # as outside pytest, which records warnings instead
        warnings.simplefilter("default")
        warnings.showwarning = cli_common._show_warning
        strict = CliRunner().invoke(app, ["check", str(run), "--format", "json"])
        res = CliRunner().invoke(app, ["check", str(run), "--format", "json", "--allow-incomplete"])
    # The skipped parts' rows are lost to every rule: the gate fails on them, naming them;
    # --allow-incomplete gates on the good rows, where nothing is wrong.
    assert strict.exit_code == 1, strict.output
    (status,) = [f for f in json.loads(strict.stdout)["findings"] if f["severity"] == "error"]
    assert status["rule"] == "run-status" and "4 of 8 parts cannot be read" in status["message"]
    assert res.exit_code == 0, res.output
    assert not json.loads(res.stdout)["failed"]
    for name, reason in REASONS.items():  # one line per skipped part, with its reason
        lines = [line for line in strict.stderr.splitlines() if name in line]
        assert len(lines) == 1 and lines[0].startswith("warning: skipping") and reason in lines[0]
    result = check_run(run)
    assert "nonfinite" not in {f.rule for f in result.findings}
    assert "nonfinite" not in result.skipped  # the rule ran, on the good loss rows
    losses = rows[rows.metric == "loss"].sort_values("step").value.to_numpy(float)
    assert losses.tolist() == pytest.approx([loss_at(s) for s in range(8)])
    s = summarize(run)
    assert s.loss_first == losses[0]
    assert s.loss_last == np.mean(losses[-1:])
    report = build_report([run], tmp_path / "r.html")
    for name, reason in REASONS.items():
        assert any(name in w and reason in w for w in report.warnings), name
    opened = open_run(run, "run")
    assert opened.rows == len(rows) and len(opened.files) == 4
