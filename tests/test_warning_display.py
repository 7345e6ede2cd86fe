"""Warnings are shown once per location while a run records, however often something resets
Python's per-module registries.

Every ``catch_warnings()`` exit invalidates those registries; pandas and numpy call it inside
the online rules' worker, so a script's warning came back after each check. The references
are Python's own behaviour in the same process: a warning raised at one line in a loop with
no reset in between is shown once, and under an ``always`` filter every time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

LOOP = """
import warnings
{setup}
for i in range(40):
    warnings.warn("same place")
    {reset}
"""


def shown(setup: str, reset: str) -> int:
    code = textwrap.dedent(LOOP).format(setup=setup, reset=reset)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stderr.count("UserWarning: same place")


RESET = "with warnings.catch_warnings(): pass"
INSTALL = "from stabscope.record import warning_display; warning_display.install()"


def test_a_reset_registry_shows_the_warning_again_in_plain_python():
    assert shown("", "pass") == 1  # the reference: once per location
    assert shown("", RESET) == 40  # what every reset did to a script's warning


@pytest.mark.slow
def test_with_the_display_installed_it_is_shown_once_despite_the_resets():
    assert shown(INSTALL, RESET) == 1


@pytest.mark.slow
def test_an_always_filter_is_still_shown_every_time():
    always = INSTALL + "; warnings.simplefilter('always')"
    assert shown(always, RESET) == 40 == shown("warnings.simplefilter('always')", "pass")


@pytest.mark.slow
def test_a_once_filter_is_once_per_text_across_lines():
    once = INSTALL + "; warnings.simplefilter('once')"
    code = textwrap.dedent(
        f"""
        import warnings
        {once}
        for i in range(10):
            warnings.warn("text")
            warnings.warn("text")
            {RESET}
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.count("UserWarning: text") == 1


SCRIPT = """
import warnings
import torch

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(300):
    x = torch.randn(16, 4)
    loss = (model(x).squeeze(1) - x.sum(1)).pow(2).mean()
    warnings.warn("the script's own warning")
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.mark.slow
def test_a_profiled_script_shows_its_warning_as_often_as_without_stabscope(tmp_path):
    script = tmp_path / "warns.py"
    script.write_text(textwrap.dedent(SCRIPT))
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    profiled = subprocess.run(
        [sys.executable, "-m", "stabscope", "profile", str(script), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert plain.returncode == profiled.returncode == 0, profiled.stderr[-2000:]
    text = "UserWarning: the script's own warning"
    assert plain.stderr.count(text) == 1 == profiled.stderr.count(text)
