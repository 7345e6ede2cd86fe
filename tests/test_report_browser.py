"""The HTML report in a real headless Chromium (Debian's), driven by playwright.

Two runs: a real model recorded by the Recorder, one of whose ModuleDict keys is an HTML
tag, and a synthetic run with every metric and findings. The page must render every plot
with data, raise no JavaScript error, list the findings, and show the tag as text.
A screenshot is kept in tests/artifacts/report.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import stabscope
from stabscope.report.build import build_report
from tests.conftest import ROOT, batch_maker, train
from tests.report_runs import FINDINGS, write_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    reason = "Debian's chromium is not installed (`bash .ci/run` installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run the browser tests", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]'")

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = "<img src=x onerror=alert(1)>"
ARTIFACTS = ROOT / "tests" / "artifacts"

# Per plot: number of traces in _fullData, traces with data, heatmap images drawn, lines drawn.
PLOT_STATE = """() => Array.from(document.querySelectorAll('.plotly-graph-div')).map(gd => {
  const traces = gd._fullData || [];
  const filled = traces.filter(t => t.type === 'heatmap'
      ? t.z && t.z.length > 0 && t.z.some(row => Array.from(row).some(Number.isFinite))
      : t.x && t.x.length > 0);
  return {id: gd.id, traces: traces.length, filled: filled.length,
          heatmaps: traces.filter(t => t.type === 'heatmap').length,
          images: gd.querySelectorAll('svg image').length,
          lines: gd.querySelectorAll('.scatterlayer .trace').length};
})"""


class Net(nn.Module):
    """Modules with no layer index, so the depth axis is the forward order and the
    tag-named module is a heatmap row."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(
            {"first": nn.Linear(6, 8), XSS: nn.Linear(8, 8), "last": nn.Linear(8, 3)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = torch.tanh(block(x))
        return x


@pytest.fixture(scope="module")
def page_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    model = Net()
    with stabscope.Recorder(model, out=tmp / "real") as rec:
        train(model, 12, batch_maker(6, 3), rec)
    findings = [*FINDINGS, {**FINDINGS[0], "module": XSS, "message": f"module {XSS} grows"}]
    write_run(tmp / "synthetic", layers=6, steps=range(30), findings=findings)
    return build_report([tmp / "real", tmp / "synthetic"], tmp / "report.html").path


@pytest.mark.slow  # a headless browser start: ~5 s
def test_report_renders_in_chromium(page_report: Path) -> None:
    html = page_report.read_text()
    expected = html.count('class="plotly-graph-div"')
    assert expected >= 20
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            dialogs: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(page_report.as_uri())
            page.wait_for_function(
                "Array.from(document.querySelectorAll('.plotly-graph-div'))"
                ".every(gd => gd._fullLayout && gd.querySelector('svg.main-svg'))",
                timeout=60_000,
            )
            plots = page.evaluate(PLOT_STATE)
            findings = page.locator("#findings-list > li").count()
            text = page.evaluate("document.body.innerText")
            tick_labels = page.evaluate(
                "Array.from(document.querySelectorAll('.ytick text')).map(t => t.textContent)"
            )
            images = page.evaluate("document.querySelectorAll('img').length")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert dialogs == []
    assert len(plots) == expected
    for plot in plots:
        assert plot["traces"] > 0 and plot["filled"] == plot["traces"], plot
        assert plot["images"] == plot["heatmaps"], plot  # every heatmap was drawn
        assert plot["lines"] >= plot["traces"] - plot["heatmaps"], plot
    assert findings == len(FINDINGS) + 1
    # the tag is shown as text in the findings and as a heatmap row label, never as markup
    assert f"module {XSS} grows" in text
    assert f"blocks.{XSS}" in tick_labels
    assert images == 0
