"""`stabscope amplification` reproduces the direction of Admin's theory on the sample GPT, and
`stabscope inspect` shows what structure discovery found."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app
from stabscope.drivers.amplification import linear_fit, run_amplification
from stabscope.drivers.script import load_script
from tests.conftest import SAMPLES

runner = CliRunner()


def test_linear_fit_is_exact_on_a_line():
    fit = linear_fit(np.array([1.0, 2.0, 4.0]), np.array([3.0, 5.0, 9.0]))
    assert (round(fit.slope, 9), round(fit.intercept, 9), round(fit.r2, 9)) == (2.0, 1.0, 1.0)


@pytest.mark.slow
def test_post_ln_amplifies_faster_with_depth_than_pre_ln(tmp_path):
    growth, better = {}, {}
    for norm in ("post", "pre"):
        script = load_script(SAMPLES / "gpt.py", {"norm": norm})
        result = run_amplification(script, [6, 12, 24, 48], tmp_path / norm)
        growth[norm] = result.change[-1] / result.change[0]
        better[norm] = result.better
        stored = stabscope.load_run(tmp_path / norm, metrics="amplification")
        np.testing.assert_allclose(stored.sort_values("index").value, result.change, rtol=1e-6)
    # Admin: O(N) for Post-LN, O(log N) for Pre-LN.
    assert growth["post"] > 3 * growth["pre"]
    assert (better["post"], better["pre"]) == ("N", "log N")


@pytest.mark.slow
def test_amplification_cli_and_bad_depths(tmp_path):
    res = runner.invoke(
        app,
        [
            "amplification",
            str(SAMPLES / "gpt.py"),
            "--depths",
            "2,4",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "grows like" in res.stderr
    assert stabscope.read_meta(tmp_path / "a")["kind"] == "amplification"
    res = runner.invoke(app, ["amplification", str(SAMPLES / "gpt.py"), "--depths", "2,x"])
    assert res.exit_code == 2 and res.stderr.startswith("error: bad --depths")
    res = runner.invoke(
        app,
        ["amplification", str(SAMPLES / "mlp.py"), "--depths", "2,3", "--out", str(tmp_path / "b")],
    )
    assert res.exit_code == 0, res.output  # mlp.py has a depth key too


@pytest.mark.slow
def test_inspect_tree_and_json():
    res = runner.invoke(
        app, ["inspect", str(SAMPLES / "gpt.py"), "--set", "norm=post", "--set", "depth=3"]
    )
    assert res.exit_code == 0, res.output
    assert "Post-LN" in res.stderr and "blocks.2.attn: 4 heads" in res.stderr
    res = runner.invoke(
        app,
        [
            "inspect",
            str(SAMPLES / "gpt.py"),
            "--set",
            "norm=deepnorm",
            "--set",
            "depth=8",
            "--json",
        ],
    )
    data = json.loads(res.stdout)
    assert data["recognised"] and len(data["blocks"]) == 8
    assert data["blocks"][0]["alpha"] == round((2 * 8) ** 0.25, 6)  # DeepNet's α = (2N)^(1/4)
    res = runner.invoke(app, ["inspect", str(SAMPLES / "mlp.py")])
    assert res.exit_code == 0 and "not recognised" in res.stderr


@pytest.mark.slow
def test_inspect_of_a_run_shows_the_structure_it_recorded(tmp_path):
    """A run directory: the structure in its meta.json, the same as inspecting the script
    with the same settings; a directory that is no run is one error line."""
    run = tmp_path / "run"
    sets = ["--set", "norm=post", "--set", "depth=3"]
    res = runner.invoke(
        app, ["profile", str(SAMPLES / "gpt.py"), "--steps", "2", "--out", str(run), "-q", *sets]
    )
    assert res.exit_code == 0, res.output
    recorded = runner.invoke(app, ["inspect", str(run), "--json"])
    assert recorded.exit_code == 0, recorded.output
    assert json.loads(recorded.stdout) == stabscope.read_meta(run)["structure"]
    from_script = runner.invoke(app, ["inspect", str(SAMPLES / "gpt.py"), "--json", *sets])
    assert json.loads(recorded.stdout)["blocks"] == json.loads(from_script.stdout)["blocks"]
    tree = runner.invoke(app, ["inspect", str(run)])
    assert tree.exit_code == 0 and "(3 blocks)" in tree.stderr and "Post-LN" in tree.stderr
    empty = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "no such script" in empty.stderr
    (tmp_path / "folder").mkdir()
    folder = runner.invoke(app, ["inspect", str(tmp_path / "folder")])
    assert folder.exit_code == 2 and "is a directory, not a script" in folder.stderr
