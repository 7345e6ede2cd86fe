"""Every figure of the report by name in a notebook (``Run.figure``): the sections' own
pictures (signal propagation, attention heads and largest logit, β, the non-finite timeline,
the per-rank spread) carry the same data as the report's page, read back from its HTML; and
the report of a fresh ``profile`` (no ``check`` run) shows its findings in a real headless
Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app
from stabscope.errors import UsageError
from stabscope.store import update_meta_file
from tests.conftest import ROOT
from tests.recorded_runs import gpt_run  # noqa: F401  (fixture)
from tests.report_runs import write_run
from tests.test_notebook import page_data

runner = CliRunner()
DIVERGING = ROOT / "tests" / "scripts" / "diverging_sgd.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def fresh_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model script that goes non-finite at step 14-16, profiled; ``check`` never ran."""
    run = tmp_path_factory.mktemp("fresh") / "run"
    res = runner.invoke(app, ["profile", str(DIVERGING), "-o", str(run), "--steps", "20", "-q"])
    assert res.exit_code == 0, res.output
    assert not (run / "findings.json").exists()
    return run


def two_ranks(run: Path) -> Path:
    """A synthetic run as two ranks: rank 1's parts are rank 0's rows with the rank column
    set to 1 and the values doubled, written under rank 1's part numbers."""
    for part in sorted((run / "parts").glob("part-*.parquet")):
        table = pq.read_table(part)
        n = int(part.stem.split("-")[1])
        ranks = pa.array([1] * len(table), table.schema.field("rank").type)
        table = table.set_column(table.schema.get_field_index("rank"), "rank", ranks)
        value = pa.compute.multiply(table["value"], pa.scalar(2.0, pa.float32()))
        table = table.set_column(table.schema.get_field_index("value"), "value", value)
        pq.write_table(table, part.with_name(f"part-{10_000_000 + n:06d}.parquet"))
    update_meta_file(run, world_size=2)
    return run


def assert_figures_are_the_pages(run: Path, names: set[str], tmp_path: Path) -> None:
    notebook = stabscope.open_run(run)
    assert names <= set(notebook.figures())
    page = tmp_path / f"{run.name}.html"
    res = runner.invoke(app, ["report", str(run), "-o", str(page), "-q"])
    assert res.exit_code == 0, res.output
    html = page.read_text()
    for name in names:
        data = json.loads(notebook.figure(name).to_json())["data"]
        assert data == page_data(html, f"fig-{name}"), name
        assert data, name


@pytest.mark.slow
def test_section_figures_of_a_transformer_are_the_reports(gpt_run: Path, tmp_path: Path):  # noqa: F811
    names = {"propagation", "attn_heads", "attn_logit_max_over_time", "res_beta"}
    assert_figures_are_the_pages(gpt_run, names, tmp_path)


@pytest.mark.slow
def test_the_nonfinite_timeline_is_the_reports(fresh_profile: Path, tmp_path: Path):
    assert_figures_are_the_pages(fresh_profile, {"nonfinite", "propagation"}, tmp_path)
    # the counts are the run's: one marker per recorded step with a non-finite tensor
    data = json.loads(stabscope.open_run(fresh_profile).figure("nonfinite").to_json())["data"]
    assert data and all(len(trace["x"]["bdata"]) > 0 for trace in data)


@pytest.mark.slow
def test_the_per_rank_figures_are_the_reports(tmp_path: Path):
    run = two_ranks(write_run(tmp_path / "r", layers=3, steps=range(6)))
    names = {"ranks-loss", "ranks-param_grad_norm", "ranks-act_rms", "ranks-grad_rms"}
    assert_figures_are_the_pages(run, names, tmp_path)
    # a single-rank run has none of them
    single = write_run(tmp_path / "one", layers=3, steps=range(6))
    assert not [n for n in stabscope.open_run(single).figures() if n.startswith("ranks-")]


def test_an_unknown_name_lists_the_run_s_figures(gpt_run: Path):  # noqa: F811
    run = stabscope.open_run(gpt_run)
    with pytest.raises(UsageError, match="no figure 'heads'") as err:
        run.figure("heads")
    for name in ("attn_heads", "propagation", "res_beta", "loss", "act_rms"):
        assert name in err.value.hint


@pytest.mark.slow
def test_the_report_of_a_fresh_profile_shows_its_findings_in_chromium(
    fresh_profile: Path, tmp_path: Path
):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (`bash .ci/run` installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]'")
    from tests.test_report_browser import ARGS

    page_file = tmp_path / "fresh.html"
    res = runner.invoke(app, ["report", str(fresh_profile), "-o", str(page_file)])
    assert res.exit_code == 0, res.output
    want = json.loads(runner.invoke(app, ["summary", str(fresh_profile), "--json"]).stdout)
    rules = [f["rule"] for f in want["findings"]]
    assert "nonfinite" in rules
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri())
            items = page.locator("#findings-list > li")
            shown = [items.nth(i).locator("b").inner_text() for i in range(items.count())]
            section = page.locator("#findings").inner_text()
        finally:
            browser.close()
    assert errors == []
    assert shown == rules  # every finding, worst first, as the rules gave them
    assert "no rules have run" not in section
    assert "judged now by the rules" in section
