"""The report and the summary judge a run by themselves: without a current findings.json
(none, or older than the run) they run the rules in memory and show what `check` finds,
writing nothing into the run."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabscope.cli import app
from tests.cli_inputs import snapshot
from tests.recorded_runs import gpt_run  # noqa: F401  (fixture)

runner = CliRunner()


def listed_rules(html: str) -> list[str]:
    listed = re.search(r'<ol class="findings" id="findings-list">(.*?)</ol>', html, re.S)
    assert listed is not None, "the report lists no findings"
    return re.findall(r'<li class="finding sev-\w+">.*?<b>([^<]+)</b>', listed.group(1))


def checked_rules(run: Path) -> list[str]:
    res = runner.invoke(app, ["check", str(run), "--format", "json"])
    assert res.exit_code in (0, 1), res.output
    return [f["rule"] for f in json.loads(res.stdout)["findings"]]


@pytest.mark.slow
def test_report_of_a_fresh_run_shows_what_check_finds(gpt_run: Path, tmp_path: Path):  # noqa: F811
    run = shutil.copytree(gpt_run, tmp_path / "run")
    before = snapshot(run)
    res = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text()
    shown = listed_rules(html)
    assert "judged now by the rules (no findings.json)" in html
    assert snapshot(run) == before  # the report wrote nothing into the run
    assert shown == checked_rules(run) and "gradient-growth" in shown
    # check wrote findings.json: now current, the report shows it as it is.
    res = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "r2.html")])
    html = (tmp_path / "r2.html").read_text()
    assert "judged now" not in html and listed_rules(html) == shown


def test_a_findings_json_older_than_the_run_is_judged_again(gpt_run: Path, tmp_path: Path):  # noqa: F811
    run = shutil.copytree(gpt_run, tmp_path / "run")
    (run / "findings.json").write_text("[]\n")  # the rules "found nothing" ...
    res = runner.invoke(app, ["summary", str(run)])
    assert "findings: none" in res.stderr and "judged now" not in res.stderr
    meta = run / "meta.json"
    later = (run / "findings.json").stat().st_mtime_ns + 10**9
    os.utime(meta, ns=(later, later))  # ... before the run went on
    res = runner.invoke(app, ["summary", str(run)])
    assert res.exit_code == 0, res.output
    assert "judged now by the rules (findings.json is older than the run)" in res.stderr
    assert "gradient-growth" in res.stderr
    assert (run / "findings.json").read_text() == "[]\n"  # not rewritten


def test_summary_json_has_the_headline_numbers_and_findings(gpt_run: Path):  # noqa: F811
    res = runner.invoke(app, ["summary", str(gpt_run), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    from stabscope.analysis.summary import summarize
    from stabscope.rules.gate import judge

    s = summarize(gpt_run)
    assert out["summary"]["steps"] == s.steps == 6
    assert out["summary"]["loss_first"] == s.loss_first
    assert out["summary"]["largest"] == [[n, v] for n, v in s.largest]
    assert out["summary"]["headlines"] == s.headlines
    assert [f["rule"] for f in out["findings"]] == [f.rule for f in judge(gpt_run).findings]
    assert out["findings_source"].startswith("judged now by the rules (no findings.json)")
