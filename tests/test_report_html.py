"""The HTML report as a file and the `report` / `summary` commands: sections, findings,
run comparison, escaping, bad input. The browser test is in test_report_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from plotly.offline import get_plotlyjs
from typer.testing import CliRunner

from stabscope.cli import app
from stabscope.report.build import build_report
from stabscope.report.scales import power_label, scale_for
from tests.conftest import ROOT
from tests.report_runs import FINDINGS, write_run

runner = CliRunner()
XSS = "<img src=x onerror=alert(1)>"
PLOTS_OF_FULL_RUN = {
    "fig-propagation",
    *(f"fig-{k}" for k in ("act_rms", "grad_rms", "act_absmax", "grad_absmax")),
    *(f"fig-{k}" for k in ("param_norm", "param_grad_norm", "norm_input_rms", "token_corr")),
    *(f"fig-{k}" for k in ("res_omega", "res_ratio", "res_dependency", "res_corr", "res_beta")),
    "fig-attn_heads",
    "fig-attn_entropy",
    "fig-attn_logit_max",
    "fig-attn_logit_max_over_time",
    "fig-update_ratio",
    "fig-model_update",
    "fig-loss",
    "fig-lr",
}


def plot_ids(html: str) -> set[str]:
    return set(re.findall(r'<div id="([^"]+)" class="plotly-graph-div"', html))


def report(*args):
    return runner.invoke(app, ["report", *map(str, args)])


def test_full_run_renders_every_section_with_plotly_once(tmp_path):
    run = write_run(tmp_path / "full", findings=FINDINGS)
    result = build_report([run], tmp_path / "r.html")
    html = result.path.read_text()
    assert plot_ids(html) == PLOTS_OF_FULL_RUN
    assert result.plots == len(PLOTS_OF_FULL_RUN)
    assert html.count(get_plotlyjs()[:500]) == 1  # inlined once
    assert "cdn" not in html.split("<script")[0].lower()  # nothing fetched before the bundle
    for section in ("header", "findings", "propagation", "heatmaps", "residual", "attention"):
        assert f'<section id="{section}">' in html
    assert result.warnings == []


def test_findings_worst_first_with_evidence_and_plot_links(tmp_path):
    run = write_run(tmp_path / "full", findings=FINDINGS)
    html = build_report([run], tmp_path / "r.html").path.read_text()
    listed = re.search(r'<ol class="findings" id="findings-list">(.*?)</ol>', html).group(1)
    items = re.findall(r'<li class="finding sev-(\w+)">.*?<b>([^<]+)</b>', listed)
    assert items == [
        ("error", "entropy-collapse"),
        ("warning", "grad-growth"),
        ("info", "info-note"),
    ]
    assert "value 8, threshold 4, from grad_rms in blocks.3 at step 0" in listed
    assert "remedy: use Pre-LN" in listed and "Xiong et al. 2020" in listed
    links = re.findall(r'href="#([^"]+)">see the plot', listed)
    assert links == ["fig-attn_entropy", "fig-grad_rms", "fig-loss"]
    assert set(links) <= plot_ids(html)


def test_no_findings_file_says_no_rules_have_run(tmp_path):
    run = write_run(tmp_path / "plain", layers=2, steps=[0, 1])
    html = build_report([run], tmp_path / "r.html").path.read_text()
    assert "no rules have run on plain" in html
    assert 'id="findings-list"' not in html


def test_runs_compared_side_by_side_with_notes_for_what_one_lacks(tmp_path):
    a = write_run(tmp_path / "a" / "run", layers=3, steps=range(5))
    b = write_run(tmp_path / "b" / "run", layers=3, steps=range(5), metrics=["act_rms", "grad_rms"])
    html = build_report([a, b], tmp_path / "r.html").path.read_text()
    # same directory names: parents tell them apart
    assert "a/run" in html and "b/run" in html
    assert "res_ratio: not recorded in b/run" in html
    fig = re.search(
        r'<div id="fig-grad_rms".*?Plotly.newPlot\(\s*"fig-grad_rms",\s*(\[.*?\]),\s*\{', html, re.S
    )
    traces = json.loads(fig.group(1))
    assert [t["type"] for t in traces] == ["heatmap", "heatmap"]
    assert {t["coloraxis"] for t in traces} == {"coloraxis"}  # one colour scale for both runs
    assert [t["xaxis"] for t in traces] == ["x", "x2"]


def test_module_names_are_text_not_markup(tmp_path):
    run = write_run(tmp_path / "x", layers=3, steps=range(3), names={1: f"blocks.{XSS}"})
    html = build_report([run], tmp_path / "r.html").path.read_text()
    assert XSS not in html  # never raw
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # escaped, shown as text
    assert "\\u003cimg" not in html  # not even inside the plot data


def test_report_cli_bad_input_is_one_error_and_one_hint(tmp_path):
    (tmp_path / "notarun").mkdir()
    for target in (tmp_path / "notarun", tmp_path / "missing"):
        res = report(target, "-o", tmp_path / "r.html")
        assert res.exit_code == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:")
    assert not (tmp_path / "r.html").exists()
    run = write_run(tmp_path / "ok", layers=1, steps=[0])
    (tmp_path / "file").write_text("")
    res = report(run, "-o", tmp_path / "file" / "r.html")
    assert res.exit_code == 2 and "cannot write the report" in res.stderr


def test_empty_corrupt_foreign_and_running_runs_render_with_warnings(tmp_path):
    empty = tmp_path / "empty"
    write_run(tmp_path / "seed", layers=1, steps=[0])  # borrow a meta for the empty run
    empty.mkdir()
    (empty / "meta.json").write_text((tmp_path / "seed" / "meta.json").read_text())
    corrupt = write_run(tmp_path / "corrupt", layers=2, steps=range(4), status="running")
    (corrupt / "parts" / "part-000900.parquet").write_bytes(b"PAR1 truncated")
    pq.write_table(
        pa.table({"step": [1], "value": [1.0]}), corrupt / "parts" / "part-000901.parquet"
    )
    res = report(empty, corrupt, "-o", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    err = res.stderr
    assert "empty: no readable rows (no parts written)" in err
    gone = tmp_path / "gone"  # a run whose meta.json counts rows, its parts deleted since
    gone.mkdir()
    meta = json.loads((tmp_path / "seed" / "meta.json").read_text())
    (gone / "meta.json").write_text(json.dumps({**meta, "rows": 1954}))
    res = report(gone, "-o", tmp_path / "g.html")
    assert res.exit_code == 0, res.output
    assert "gone: no readable rows (meta.json counts 1,954 rows written; their parts are gone)" in (
        res.stderr
    )
    assert "skipping unreadable part" in err and "part-000900" in err
    assert "part-000901.parquet with another schema" in err
    assert "corrupt: still running (pid" in err  # its pid, this process, is alive
    html = (tmp_path / "r.html").read_text()
    assert "still running (pid" in html
    assert 'id="fig-act_rms"' in html  # the readable part is still drawn


def test_summary_prints_findings_worst_first(tmp_path):
    run = write_run(tmp_path / "s", layers=2, steps=range(3), findings=FINDINGS)
    res = runner.invoke(app, ["summary", str(run)])
    assert res.exit_code == 0, res.output
    out = res.stderr
    order = [out.index(rule) for rule in ("entropy-collapse", "grad-growth", "info-note")]
    assert order == sorted(order)
    assert "remedy: QK-norm" in out
    plain = write_run(tmp_path / "p", layers=2, steps=range(3))
    res = runner.invoke(app, ["summary", str(plain)])  # no findings.json: the rules run now
    assert "judged now by the rules (no findings.json)" in res.stderr
    (plain / "findings.json").write_text("{not json")
    res = runner.invoke(app, ["summary", str(plain)])
    assert res.exit_code == 0 and "(findings.json cannot be read)" in res.stderr
    assert (plain / "findings.json").read_text() == "{not json"  # left as it was


@pytest.mark.slow
def test_report_side_never_imports_torch(tmp_path):
    run = write_run(tmp_path / "t", layers=2, steps=range(3))
    code = (
        "import sys; from stabscope.report.build import build_report; "
        f"build_report([{str(run)!r}], {str(tmp_path / 'r.html')!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_deep_heatmaps_are_cut_to_the_budget(tmp_path):
    run = write_run(tmp_path / "deep", layers=200, steps=range(0, 300, 3), metrics=["act_rms"])
    result = build_report([run], tmp_path / "r.html")
    html = result.path.read_text()
    data = json.loads(
        re.search(r'Plotly.newPlot\(\s*"fig-act_rms",\s*(\[.*?\]),\s*\{', html, re.S).group(1)
    )
    z = data[0]["z"]
    rows, cols = (int(n) for n in z["shape"].split(","))
    # 200 layers merge into the 160-row cap; 100 recorded steps fit the column budget
    assert (rows, cols) == (160, 100)


def test_colour_scale_is_log_only_across_decades():
    wide = np.array([[1e-6, 1e-3], [1.0, np.nan]])
    scale = scale_for([wide], log=True)
    lo, hi = np.log10(np.percentile([1e-6, 1e-3, 1.0], [0.5, 99.9]))
    assert scale.log and scale.lo == pytest.approx(lo) and scale.hi == pytest.approx(hi)
    # zero and negatives show at the floor colour instead of vanishing
    assert scale.map(np.array([0.0, 1e-3]))[0] == pytest.approx(lo, rel=1e-6)
    assert not scale_for([np.array([1.0, 2.0, 5.0])], log=True).log  # a factor of 5
    assert [power_label(np.log10(x)) for x in (1e-4, 2e-5, 500, 0.002, 1e6)] == [
        "1e-4",
        "2e-5",
        "500",
        "0.002",
        "1e6",
    ]


def test_header_shows_a_model_scripts_config_or_a_training_scripts_arguments(tmp_path):
    runs = [write_run(tmp_path / name, layers=2, steps=range(2)) for name in ("model", "train")]
    settings = [{"script_config": {"depth": 24, "norm": "post"}}, {"script_args": ["--lr", XSS]}]
    for run, run_info in zip(runs, settings):
        meta = json.loads((run / "meta.json").read_text())
        meta["run"] = {**(meta.get("run") or {}), **run_info}
        (run / "meta.json").write_text(json.dumps(meta))
    html = build_report(runs, tmp_path / "r.html").path.read_text()
    row = re.search(r"<tr><th>script config or arguments</th>(.*?)</tr>", html).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells == ["depth=24, norm=post", "<code>--lr &lt;img src=x onerror=alert(1)&gt;</code>"]


def test_the_training_cell_names_what_each_value_is():
    """A zero-code run records its optimizer and seed but no device: "Adam, seed 0", not
    "Adam, 0" (a seed that read as a device)."""
    from stabscope.report.sections.header import _training
    from stabscope.store.run_meta import RunMeta

    assert _training(RunMeta({"run": {"optimizer": "Adam", "seed": 0}})) == "Adam, seed 0"
    full = RunMeta({"run": {"optimizer": "AdamW", "device": "cpu", "seed": 3}})
    assert _training(full) == "AdamW, on cpu, seed 3"
    assert _training(RunMeta({"run": {}})) == "–"


def test_the_header_shows_each_runs_notes_escaped(tmp_path):
    """meta.json's notes (two trained models recorded as one, modules left unhooked), as
    ``profile`` prints them: one row, a run's notes one per line, text not markup."""
    runs = [write_run(tmp_path / name, layers=2, steps=range(2)) for name in ("a", "b")]
    notes = ["2 trained models recorded as one, under the names G, D", f"a note with {XSS}"]
    meta = json.loads((runs[0] / "meta.json").read_text())
    meta["notes"] = notes
    (runs[0] / "meta.json").write_text(json.dumps(meta))
    html = build_report(runs, tmp_path / "r.html").path.read_text()
    row = re.search(r"<tr><th>notes</th>(.*?)</tr>", html).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[0].split("<br>") == [
        "2 trained models recorded as one, under the names G, D",
        "a note with &lt;img src=x onerror=alert(1)&gt;",
    ]
    assert cells[1] == "–"
