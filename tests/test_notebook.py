"""``stabscope.open_run`` on a real recorded run: the table is load_run's, the findings are
check's, each figure is the report's (its data read back from the HTML page), and the rich
display holds the headline numbers and the findings."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
from typer.testing import CliRunner

import stabscope
from stabscope.analysis.summary import summarize
from stabscope.cli import app
from stabscope.errors import UsageError
from tests.cli_inputs import snapshot
from tests.recorded_runs import gpt_run  # noqa: F401  (fixture)

runner = CliRunner()


def page_data(html: str, div_id: str) -> list[dict]:
    """The traces the report's page hands to Plotly.newPlot for ``div_id``."""
    at = re.search(rf'Plotly\.newPlot\(\s*"{re.escape(div_id)}",\s*', html)
    assert at is not None, f"no {div_id} on the page"
    data, _ = json.JSONDecoder().raw_decode(html, at.end())
    return data


def test_table_is_load_run_with_its_filters(gpt_run: Path):  # noqa: F811
    run = stabscope.open_run(gpt_run)
    pd.testing.assert_frame_equal(run.table(), stabscope.load_run(gpt_run))
    got = run.table(metric="grad_rms", module="blocks.*", step=range(2), phase="train")
    want = stabscope.load_run(
        gpt_run, metrics="grad_rms", modules="blocks.*", steps=range(2), phase="train"
    )
    pd.testing.assert_frame_equal(got, want)
    assert set(got.metric) == {"grad_rms"} and set(got.step) == {0, 1} and len(got) > 0
    assert run.meta.steps == 6 and run.meta.blocks == [f"blocks.{i}" for i in range(4)]


def test_findings_are_checks_and_nothing_is_written(gpt_run: Path, tmp_path: Path):  # noqa: F811
    copy = shutil.copytree(gpt_run, tmp_path / "run")
    before = snapshot(copy)
    found = stabscope.open_run(copy).findings()
    assert snapshot(copy) == before
    res = runner.invoke(app, ["check", str(copy), "--format", "json"])
    checked = json.loads(res.stdout)["findings"]
    assert [(f.rule, f.message) for f in found] == [(f["rule"], f["message"]) for f in checked]
    assert "gradient-growth" in [f.rule for f in found]
    assert stabscope.open_run(copy).verdict().source == "findings.json"  # check's, current now


@pytest.mark.slow
def test_each_figure_is_the_reports(gpt_run: Path, tmp_path: Path):  # noqa: F811
    run = stabscope.open_run(gpt_run)
    names = run.figures()
    assert {"act_rms", "grad_rms", "attn_entropy", "update_ratio", "loss", "lr"} <= set(names)
    res = runner.invoke(app, ["report", str(gpt_run), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text()
    for name in names:
        fig = run.figure(name)
        assert isinstance(fig, go.Figure)
        assert json.loads(fig.to_json())["data"] == page_data(html, f"fig-{name}"), name
    with pytest.raises(UsageError, match="no figure 'nope'") as err:
        run.figure("nope")
    assert "act_rms" in err.value.hint


def test_rich_display_shows_the_headline_numbers_and_findings(gpt_run: Path):  # noqa: F811
    run = stabscope.open_run(gpt_run)
    html = run._repr_html_()
    s = summarize(gpt_run)
    assert f"{s.loss_first:.4g} -&gt; {s.loss_last:.4g}" in html
    assert "complete" in html and "4 post blocks" in html
    for line in s.headlines:  # "largest attention logit: 17.84 at blocks.0.attn head 1, ..."
        label, _, value = line.partition(": ")
        assert f"{label}</th>" in html and value in html
    for f in run.findings()[:10]:
        assert f.rule in html
    assert "judged now: no findings.json" in html


def test_open_run_refuses_a_directory_that_is_no_run(tmp_path: Path):
    with pytest.raises(stabscope.NotARunError):
        stabscope.open_run(tmp_path)
