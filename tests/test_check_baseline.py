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


def record_scaled(run: Path, scaled_steps: set[int]) -> Path:
    """A 12-step MLP at lr 0 (every step's weights the same, the batches seeded alike), its
    middle layer's output x100 at ``scaled_steps``: the runs differ there and nowhere else."""
    import torch

    from stabscope import Schedule
    from tests.conftest import mlp

    torch.manual_seed(0)
    model = mlp(hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(1)
    step = [0]
    model[2].register_forward_hook(lambda m, a, out: out * 100 if step[0] in scaled_steps else out)
    with stabscope.Recorder(model, run, schedule=Schedule(dense=12)) as rec:
        for step[0] in range(12):
            x = torch.randn(32, 6, generator=g)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return run


def test_a_one_step_transient_is_not_a_regression_a_lasting_change_is(tmp_path):
    """A layer x100 at one step of twelve (a seed's transient) is no regression; x100 at every
    step (a change to the model) is, with the factor applied."""
    from stabscope.rules.baseline import compare_to_baseline
    from stabscope.rules.view import RunView

    base = record_scaled(tmp_path / "base", set())
    once = record_scaled(tmp_path / "once", {5})
    always = record_scaled(tmp_path / "always", set(range(12)))
    rows = stabscope.load_run(once, modules="2", metrics="act_rms", phase="train")
    ref = stabscope.load_run(base, modules="2", metrics="act_rms", phase="train")
    ratio = rows.set_index("step").value / ref.set_index("step").value
    assert ratio[5] == pytest.approx(100, rel=1e-5) and (ratio.drop(5) == 1).all()
    assert list(compare_to_baseline(RunView.open(once), RunView.open(base))) == []
    found = {f.metric: f for f in compare_to_baseline(RunView.open(always), RunView.open(base))}
    assert found["act_rms"].module == "2"
    assert found["act_rms"].value == pytest.approx(100, rel=1e-5)  # the scale applied
    assert "12 module-steps moved" in found["act_rms"].message  # every step of module 2
