"""What must import without an optional stack: the read side without torch (reports and the
CI gate run where no GPU stack is installed), and the tests without transformers (those that
need it skip themselves, not their neighbours). Each runs in a fresh process where the package
is blocked as if uninstalled (tests/blocked_imports.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stabscope
from tests.conftest import ROOT, record_steps, sample_gpt

#: The read side: every module under these packages, and these modules.
READ_PACKAGES = ("store", "rules", "report", "theory", "analysis", "notebook", "export")
READ_MODULES = (
    "stabscope",
    "stabscope.metrics",
    "stabscope.settings",
    "stabscope.errors",
    "stabscope.version",
    "stabscope.wording",
    "stabscope.grow.sizes",
    "stabscope.grow.table",
    "stabscope.cli",
)


def read_side_modules() -> list[str]:
    names = [m for m in READ_MODULES if (ROOT / (m.replace(".", "/") + ".py")).is_file()]
    names += [m for m in READ_MODULES if (ROOT / m.replace(".", "/") / "__init__.py").is_file()]
    for package in READ_PACKAGES:
        for path in sorted((ROOT / "stabscope" / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(set(names))


def run_blocked(blocked: str, code: str, *args: str, timeout: float = 300) -> str:
    """``code`` in a fresh interpreter where the ``blocked`` packages cannot be imported."""
    env = {**os.environ, "BLOCK": blocked, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", "import tests.blocked_imports\n" + code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


READ_WITHOUT_TORCH = """
import importlib, json, sys
from typer.testing import CliRunner
from stabscope.cli import app

run, html, modules = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in modules:
    importlib.import_module(name)
codes = {}
commands = (["summary", run], ["report", run, "-o", html], ["check", run])
commands += (["export", run, "--to", "tensorboard", "-o", html + ".tb"],)
for command in commands:
    result = CliRunner().invoke(app, command)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    codes[command[0]] = result.exit_code
import stabscope  # the notebook's Run: its display and a figure
notebook = stabscope.open_run(run)
codes["notebook"] = int("findings" not in notebook._repr_html_() or not notebook.figure("loss"))
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""


@pytest.mark.slow
def test_the_read_side_imports_and_runs_without_torch(tmp_path: Path):
    # A real recorded run (the sample GPT, its structure found) ...
    model, forward = sample_gpt("post", depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = record_steps(model, tmp_path / "run", forward, opt, 3, schedule=stabscope.Schedule(3, 0))
    # ... imported, summarised, reported on and checked where torch cannot be imported.
    modules = read_side_modules()
    assert "stabscope.store.reader" in modules and "stabscope.rules.gate" in modules
    html = tmp_path / "report.html"
    out = json.loads(run_blocked("torch", READ_WITHOUT_TORCH, str(run), str(html), *modules))
    codes = {"summary": 0, "report": 0, "check": 0, "export": 0, "notebook": 0}
    assert out == {"codes": codes, "torch": False}
    assert html.stat().st_size > 10_000
    assert (run / "findings.json").is_file()


#: Test modules that need no transformers, though some of their neighbours do.
WITHOUT_TRANSFORMERS = [
    "tests/test_structure.py",
    "tests/test_probes_other.py",
    "tests/test_probes_residual.py",
    "tests/test_report_residual.py",
    "tests/test_rules_residual.py",
]

COLLECT = """
import sys, pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_tests_without_transformers_still_run_where_it_is_missing():
    """Collection is the same with and without transformers: a module-level importorskip (or
    an import of a module that has one) would drop whole files."""

    def collected(blocked: str) -> list[str]:
        out = run_blocked(blocked, COLLECT, *WITHOUT_TRANSFORMERS)
        return [line for line in out.splitlines() if "::" in line]

    with_transformers = collected("")
    assert any(t.startswith("tests/test_probes_other.py::") for t in with_transformers)
    assert collected("transformers") == with_transformers
