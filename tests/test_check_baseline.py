"""``check RUN --baseline BASE`` on real runs of the sample MLP: a change that scales a
layer is an error whose factor equals the two runs' own rows; a baseline of the same model
grown by two layers is compared; a run of another model is refused as bad input, with
nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import stabscope
from stabscope.cli import app

pytestmark = pytest.mark.slow  # four profiles: about 20 s

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
runner = CliRunner()


def profile(out: Path, script: str = "mlp.py", *sets: str) -> Path:
    args = ["profile", str(SAMPLES / script), "--steps", "3", "--out", str(out), "-q"]
    res = runner.invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baseline")
    return {
        "base": profile(root / "base"),
        "tanh": profile(root / "tanh", "mlp.py", "act=tanh"),  # the change under test
        "deeper": profile(root / "deeper", "mlp.py", "depth=10"),
        "gpt": profile(root / "gpt", "gpt.py", "depth=2", "width=32"),
    }


def test_a_changed_layer_scale_fails_with_the_runs_own_factor(runs):
    res = runner.invoke(
        app, ["check", str(runs["tanh"]), "--baseline", str(runs["base"]), "--format", "json"]
    )
    found = [f for f in json.loads(res.stdout)["findings"] if f["rule"] == "baseline-regression"]
    assert res.exit_code == 1 and found
    f = found[0]
    rows = {
        name: stabscope.load_run(runs[name], metrics=f["metric"], phase="train")
        for name in ("tanh", "base")
    }
    pick = {n: r[(r.module == f["module"]) & (r.step == f["step"])].value for n, r in rows.items()}
    ratio = float(pick["tanh"].iloc[0]) / float(pick["base"].iloc[0])
    assert f["value"] == pytest.approx(max(ratio, 1 / ratio), rel=1e-6) and f["value"] > 10


def test_the_same_model_grown_by_two_layers_is_a_baseline(runs):
    res = runner.invoke(app, ["check", str(runs["deeper"]), "--baseline", str(runs["base"])])
    assert res.exit_code in (0, 1), res.output  # compared: a verdict, not bad input


def test_a_run_of_another_model_is_refused(runs):
    findings = runs["base"] / "findings.json"
    findings.unlink(missing_ok=True)
    res = runner.invoke(app, ["check", str(runs["base"]), "--baseline", str(runs["gpt"])])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    meta = stabscope.read_meta(runs["base"])
    n = sum(len(p["shape"]) >= 2 for p in meta["parameters"])
    assert lines[0] == (
        f"error: --baseline {runs['gpt']} is a run of another model: 0 of this run's {n} "
        "weight matrices are in it with the same name and shape"
    )
    assert lines[1].startswith("hint: pass a run of this model from before the change")
    assert not findings.exists()  # refused before anything was written
