"""One version: pyproject.toml's, read from the package metadata or, in a source checkout
that was never installed, from pyproject.toml itself; ``stabscope --version`` prints it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app
from tests.conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_is_the_pyproject_version():
    assert stabscope.__version__ == PYPROJECT_VERSION
    assert "__version__ =" not in (ROOT / "stabscope" / "__init__.py").read_text()


def test_cli_prints_the_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"stabscope {PYPROJECT_VERSION}\n"


@pytest.mark.slow
def test_module_entry_point_prints_the_version():
    done = subprocess.run(
        [sys.executable, "-m", "stabscope", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stabscope {PYPROJECT_VERSION}"


def test_source_checkout_without_metadata_reads_pyproject():
    # -S: no site-packages, so no installed stabscope metadata; version.py runs on its own.
    code = (
        "import importlib.metadata as m, runpy\n"
        "try:\n    m.version('stabscope'); print('installed')\n"
        "except m.PackageNotFoundError:\n"
        f"    print(runpy.run_path({str(ROOT / 'stabscope' / 'version.py')!r})['__version__'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == PYPROJECT_VERSION
