"""The failure forecast on real recorded runs: its look-ahead against the planned lr and what
the run then did, and the gate's output of the score and its evidence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stabscope import load_run
from stabscope.cli import app
from stabscope.rules import check_run
from stabscope.rules.forecast import crossing_step, signals
from stabscope.rules.view import RunView

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ramping_sgd.py"
runner = CliRunner()


def profile(out: Path, steps: int, *sets: str, budget: int = 40) -> Path:
    args = ["profile", str(SCRIPT), "--steps", str(steps), "--budget", str(budget), "-q"]
    for s in sets:
        args += ["--set", s]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def factor(step: int, ramp: float) -> float:
    """The script's lr multiplier, written out again: ramp^clip((step - 10) / 10, 0, 1)."""
    return ramp ** min(1.0, max(0.0, (step - 10) / 10))


@pytest.fixture(scope="module")
def before_ramp(tmp_path_factory) -> Path:
    # Steps 0-8 at lr 0.05: the ramp (steps 10-20, x1000) is only in the plan.
    return profile(tmp_path_factory.mktemp("ramp") / "run", 9)


@pytest.mark.slow
def test_the_look_ahead_equals_the_index_times_the_planned_lr(before_ramp) -> None:
    df = load_run(before_ramp, metrics=["stability_index", "stability_lr"])
    index = df[df.metric == "stability_index"].set_index("step").value
    assert list(index.index) == [2, 4, 8]
    now = math.sqrt(index[4] * index[8])  # geometric mean of the last two measurements
    found = signals(RunView.open(before_ramp))
    assert found["stability_now"].value == pytest.approx(math.log10(now), abs=1e-6)
    # The plan peaks at 0.05 x 1000 = 50 from step 20 on.
    assert found["stability_forecast"].value == pytest.approx(math.log10(now * 1000), abs=1e-5)
    assert found["stability_forecast"].step == 20
    # The first planned step whose lr takes the index to 1.
    want = next(s for s in range(9, 40) if now * factor(s, 1000) >= 1)
    assert crossing_step(found) == want


@pytest.mark.slow
def test_the_crossing_of_a_flat_start_uses_the_raw_index(tmp_path) -> None:
    # At lr 1e-4 the index is ~7e-5, under the signals' log floor (1e-3); the plan ramps the
    # lr x1e5. Scaled from the floored 1e-3 the index would cross 1 at step 16; from the
    # index measured it crosses at 19.
    run = profile(tmp_path / "flat", 5, "lr=1e-4", "ramp=1e5")
    df = load_run(run, metrics=["stability_index"])
    index = df.set_index("step").value
    now = math.sqrt(index[2] * index[4])
    assert now < 1e-3
    found = signals(RunView.open(run))
    want = next(s for s in range(5, 40) if now * factor(s, 1e5) >= 1)
    assert want == 19 and crossing_step(found) == want
    assert found["stability_forecast"].value == pytest.approx(math.log10(now * 1e5), abs=1e-5)


@pytest.mark.slow
def test_the_forecast_comes_before_the_failure(before_ramp, tmp_path) -> None:
    found = signals(RunView.open(before_ramp))
    predicted = crossing_step(found)
    # The same seed trained through the ramp: the loss blows up only after the crossing.
    full = profile(tmp_path / "full", 40)
    loss = load_run(full, metrics="loss").sort_values("step").value.to_numpy(float)
    blown = int(np.flatnonzero(~(loss < 2 * loss[0]))[0])
    assert predicted is not None and predicted < blown


@pytest.mark.slow
def test_check_reports_the_score_and_its_evidence(before_ramp, tmp_path) -> None:
    # Planned to 32x the edge of stability: a warning at least (p ~0.8 with the shipped fit).
    f = next(f for f in check_run(before_ramp).findings if f.rule == "failure-forecast")
    assert f.severity in ("warning", "error") and f.value >= 0.4
    # Planned to 320x the edge: the gate fails.
    steep = profile(tmp_path / "steep", 9, "ramp=10000")
    res = runner.invoke(app, ["check", str(steep), "--format", "json"])
    assert res.exit_code == 1, res.output
    out = json.loads(res.stdout)
    forecast = next(f for f in out["findings"] if f["rule"] == "failure-forecast")
    assert forecast["severity"] == "error" and forecast["value"] >= 0.5
    assert forecast["metric"] == "failure_probability"
    signals_named = [e["signal"] for e in forecast["evidence"]]
    assert signals_named[0].startswith("stability")  # the strongest reason comes first
    # Every entry has the same keys; the expected failure step is no signal (no share).
    assert all(
        set(e) == {"signal", "value", "contribution", "evidence"} for e in forecast["evidence"]
    )
    shares = [e["contribution"] for e in forecast["evidence"] if e["contribution"] is not None]
    assert shares == sorted(shares, reverse=True)
    step = next(e["value"] for e in forecast["evidence"] if e["signal"] == "expected_failure_step")
    assert "expected to fail near step" in forecast["message"] and step < 40
    assert forecast["remedy"].startswith("lower the peak learning rate")

    # The same run planned with a small ramp: the forecast is no error.
    calm = profile(tmp_path / "calm", 9, "ramp=2")
    f = next(f for f in check_run(calm).findings if f.rule == "failure-forecast")
    assert f.severity != "error" and f.value < 0.5


def test_a_run_without_an_index_or_plan_still_gets_a_score(tmp_path) -> None:
    # No probe forward (a bare Recorder): every signal it lacks counts as a healthy median.
    from conftest import batch_maker, mlp, train

    from stabscope import Recorder

    model = mlp()
    with Recorder(model, tmp_path / "run") as rec:
        train(model, 6, batch_maker(6, 3), rec=rec)
    assert "stability_index" not in set(load_run(tmp_path / "run").metric)
    f = next(f for f in check_run(tmp_path / "run").findings if f.rule == "failure-forecast")
    assert 0.0 <= f.value <= 1.0
    names = {e["signal"] for e in f.evidence}
    assert {"stability_now", "stability_forecast"} <= names


def forecast_of(json_output: str) -> dict:
    findings = json.loads(json_output)["findings"]
    return next(f for f in findings if f["rule"] == "failure-forecast")


@pytest.mark.slow
def test_check_of_a_script_looks_ahead_to_its_budget(tmp_path, monkeypatch) -> None:
    # `check SCRIPT --steps 9 --budget 40`: the 9 steps before the ramp, the plan to step 40.
    monkeypatch.chdir(tmp_path)  # check writes runs/ramping_sgd-check here
    args = ["check", str(SCRIPT), "--steps", "9", "--set", "ramp=10000", "--format", "json"]
    res = runner.invoke(app, [*args, "--budget", "40"])
    assert res.exit_code == 1, res.output
    forecast = next(
        f for f in json.loads(res.stdout)["findings"] if f["rule"] == "failure-forecast"
    )
    assert forecast["severity"] == "error" and "(step 40)" in forecast["message"]
    # Without the budget the plan ends where the profile does: nothing to look ahead to.
    res = runner.invoke(app, args)
    forecast = next(
        f for f in json.loads(res.stdout)["findings"] if f["rule"] == "failure-forecast"
    )
    assert forecast["severity"] == "info" and "(step 9)" in forecast["message"]
    # A budget shorter than the steps profiled is bad input: one line, exit 2.
    res = runner.invoke(app, [*args, "--budget", "5"])
    assert res.exit_code == 2 and "--budget 5 is less than --steps 9" in res.stderr


@pytest.mark.slow
def test_check_of_a_run_directory_refuses_budget_instead_of_reading_it_against_steps(
    tmp_path, monkeypatch
) -> None:
    # --budget and --steps plan a script's profile. A run directory holds its own plan, so
    # `check RUN --budget 5` is refused as an option that would change nothing (not as
    # "less than --steps 50", a --steps never given), and `check RUN` judges the run.
    monkeypatch.chdir(tmp_path)
    args = ["check", str(SCRIPT), "--steps", "9", "--set", "ramp=10000", "--format", "json"]
    assert runner.invoke(app, args).exit_code in (0, 1)
    run = tmp_path / "runs" / "ramping_sgd-check"
    plain = runner.invoke(app, ["check", str(run), "--format", "json"])
    assert plain.exit_code in (0, 1) and forecast_of(plain.stdout)["message"]
    res = runner.invoke(app, ["check", str(run), "--budget", "5", "--format", "json"])
    assert res.exit_code == 2 and "--budget is read only for a model script" in res.stderr
    assert "less than --steps" not in res.stderr and res.stdout == ""


@pytest.mark.slow
def test_a_finished_run_that_learned_is_judged_by_its_outcome(tmp_path) -> None:
    """At its planned end a run's outcome is known: the forecast gives way (``learned_by_the
    _end``) when the last losses sit below a uniform guess over the head's V outputs (ln V,
    computed here from the sample GPT's vocab) and under half the starting loss; before the
    end, or without a plan, it does not; nor for a run that only got below ln V."""
    from stabscope.rules.forecast import learned_by_the_end
    from tests.conftest import SAMPLES

    sets = ["depth=2", "width=32", "seq_len=16", "batch_size=8", "lr=3e-3"]
    args = ["profile", str(SAMPLES / "gpt.py"), "--steps", "40", "-q", "--out", str(tmp_path)]
    res = runner.invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    view = RunView.open(tmp_path)
    loss = load_run(tmp_path, metrics=["loss"]).sort_values("step").value.to_numpy(float)
    ln_v = math.log(json.loads((tmp_path / "meta.json").read_text())["run"]["script_config"]
                    ["vocab"])  # fmt: skip
    # It learned: below a uniform guess, and under half its start.
    assert np.median(loss[-5:]) < min(ln_v, 0.5 * min(loss[0], np.median(loss[:5])))
    said = learned_by_the_end(view, 40, 40)
    assert said is not None and f"ln V = {ln_v:.3g}" in said and "under half its start" in said
    assert learned_by_the_end(view, 100, 40) is None  # not at its planned end yet
    assert learned_by_the_end(view, None, 40) is None  # no plan: no end to be at
    # The run's first k steps, k the first cut whose last losses sit below ln V: not yet
    # under half its start, so it has not learned by a run of k steps' end.
    k = next(k for k in range(6, 41) if np.median(loss[k - 5 : k]) < ln_v)
    assert np.median(loss[k - 5 : k]) > 0.5 * min(loss[0], np.median(loss[:5]))
    assert learned_by_the_end(RunView.open(tmp_path, k), k, k) is None


def test_an_index_already_past_one_has_no_crossing_step() -> None:
    """S_now = 5.24 under a constant planned lr: no planned step takes it past 1 (it is there),
    so no expected failure step is claimed; at 0.5 the plan's doubling is where it crosses."""
    from stabscope.rules.stability_features import Ahead, crossing

    steps = np.arange(100, 200, 10)  # (10,) planned steps after the last measurement
    flat = np.full(10, 1e-3)  # (10,) lr held
    held = Ahead(steps[-1], 1e-3, 1e-3, 99, "the planned lr rises no further")
    past = crossing(5.24, held, steps, flat)
    assert math.isnan(past.value) and past.evidence == "the index is already past 1 (5.24)"
    doubling = np.where(steps >= 150, 2e-3, 1e-3)  # (10,) the lr doubles at step 150
    rising = Ahead(150, 2e-3, 1e-3, 99, "")
    assert crossing(0.5, rising, steps, doubling).value == 150


@pytest.mark.slow
def test_a_finished_run_of_few_losses_is_not_called_learned(tmp_path) -> None:
    """Two steps at their planned end: too few losses for a start and an end level, so the
    outcome does not override the forecast (and reading it does not fail)."""
    from stabscope.rules.forecast import learned_by_the_end

    run = profile(tmp_path / "two", 2, budget=2)
    assert learned_by_the_end(RunView.open(run), 2, 2) is None
    assert "failure-forecast" not in check_run(run).failed


def test_a_regression_heads_growth_to_its_targets_scale_is_not_residual_growth(tmp_path) -> None:
    """Only the head trains (the hidden layer is frozen) on targets of std 100: the head's
    output rms grows past 10 while every module before it keeps its rms, so the plain net's
    residual_growth is the hidden modules' (below 0), not the head's (above 1)."""
    import torch
    from torch import nn

    from stabscope import Recorder
    from stabscope.rules.forecast_features import residual_growth

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    model[0].requires_grad_(False)
    x = torch.randn(64, 8)
    y = 100 * x[:, :1]
    opt = torch.optim.Adam(model[2].parameters(), lr=0.3)
    with Recorder(model, tmp_path / "run") as rec:
        for _ in range(30):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    view = RunView.open(tmp_path / "run")
    act = view.metrics("act_rms")
    head = act[act.module == "2"].sort_values("step").value.to_numpy()
    hidden = act[act.module == "1"].value.to_numpy()
    assert head[-1] > 10 * max(head[0], 1.0)  # the head grew to the targets' scale
    assert hidden.max() < 1.0  # the frozen layer's features stay below rms 1
    # Each module before the head: log10(last rms / max(first rms, 1)), the largest of them.
    before = act[act.module.isin(["0", "1"])].sort_values("step").groupby("module").value
    expected = max(np.log10(v.iloc[-1] / max(v.iloc[0], 1.0)) for _, v in before)
    assert residual_growth(view).value == pytest.approx(expected, abs=1e-6)
    assert expected < 0.01
    # One output: no ln V, and the evidence says which module is the head, and why.
    from stabscope.rules.output_features import init_loss_ratio

    ratio = init_loss_ratio(view)
    assert np.isnan(ratio.value)
    assert (
        ratio.evidence == "the output head (2) has one output: no classes to read the loss against"
    )


@pytest.mark.slow
def test_a_constant_lr_is_not_read_as_rising_from_its_float32_row(tmp_path) -> None:
    # The lr the index used is stored as float32: 0.03 reads back as 0.029999999, just under
    # the plan's 0.03, which is not a rise of the lr.
    run = profile(tmp_path / "const", 9, "lr=0.03", "ramp=1")
    df = load_run(run, metrics=["stability_lr"])
    assert (df.value.to_numpy(np.float64) < 0.03).all()  # the case: it rounds down
    found = signals(RunView.open(run))
    assert found["stability_forecast"].evidence.endswith("; the planned lr rises no further")
    assert "has trained at" not in found["stability_forecast"].evidence  # no second lr
    assert np.isnan(found["stability_forecast"].value)  # no rise: stability_now reads it


@pytest.mark.slow
def test_an_init_the_loss_has_already_repaired_no_longer_counts(tmp_path) -> None:
    """A head started 30x too large: the first loss is 15x ln 16, and 20 steps of Adam bring it
    under 1.5 ln 16 and under half its start (checked here from the loss rows). The init
    signals then count as not recorded: no warning from them. Started 3000x too large, the loss
    is still far above ln 16 at step 20, and they make the forecast's error."""
    script = ROOT / "tests" / "scripts" / "head_scaled.py"

    def forecast(scale: str) -> tuple[dict, np.ndarray]:
        out = tmp_path / scale
        args = ["profile", str(script), "--steps", "20", "--budget", "400", "-q"]
        res = runner.invoke(app, [*args, "--set", f"head_scale={scale}", "--out", str(out)])
        assert res.exit_code == 0, res.output
        loss = load_run(out, metrics=["loss"]).sort_values("step").value.to_numpy(float)
        (found,) = [f for f in check_run(out).findings if f.rule == "failure-forecast"]
        return {e["signal"]: e for e in found.evidence} | {"": found}, loss

    init = ("init_logit_scale", "init_loss_ratio")
    repaired, loss = forecast("30")
    assert loss[0] > 10 * math.log(16)
    assert np.mean(loss[-4:]) < min(1.5 * math.log(16), 0.5 * loss[0])
    assert all(repaired[s]["contribution"] == 0 and "answered" in repaired[s]["evidence"]
               for s in init)  # fmt: skip
    assert repaired[""].severity == "info"
    bad, loss = forecast("3000")
    assert np.mean(loss[-4:]) > 10 * math.log(16)
    assert all(bad[s]["contribution"] > 0 for s in init) and bad[""].severity == "error"


@pytest.mark.slow
def test_a_forecast_read_at_the_planned_end_speaks_of_the_run_it_saw(tmp_path) -> None:
    """The head 3000x too large, profiled to its planned end: the forecast's error is read at
    the end, where it looks ahead no more, and says the run had a failing run's signals
    (its loss still far above ln 16, checked here from the loss rows) in the past tense."""
    script = ROOT / "tests" / "scripts" / "head_scaled.py"
    out = tmp_path / "run"
    args = ["profile", str(script), "--steps", "40", "--budget", "40", "-q"]
    res = runner.invoke(app, [*args, "--set", "head_scale=3000", "--out", str(out)])
    assert res.exit_code == 0, res.output
    loss = load_run(out, metrics=["loss"]).sort_values("step").value.to_numpy(float)
    assert np.mean(loss[-4:]) > 10 * math.log(16)
    (found,) = [f for f in check_run(out).findings if f.rule == "failure-forecast"]
    assert found.severity == "error"
    assert found.message.startswith(
        "the run reached the planned end (step 40) with the signals of a failing run"
    )
    assert "fails by" not in found.message


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_the_token_correlation_remedy_follows_the_blocks_placement(tmp_path, norm) -> None:
    """ "Use Pre-LN" is the remedy for tokens that start alike in a Post-LN stack; a model whose
    blocks are all Pre-LN (as structure discovery finds the sample GPT's) is told to look at
    its input and first updates instead."""
    from stabscope.rules.forecast import PRE_LN_TOKEN_CORR, REMEDIES, _remedy
    from tests.conftest import SAMPLES

    sets = ["depth=2", "width=32", "seq_len=16", "batch_size=8", f"norm={norm}"]
    args = ["profile", str(SAMPLES / "gpt.py"), "--steps", "2", "-q", "--out", str(tmp_path)]
    res = runner.invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    view = RunView.open(tmp_path)
    assert {b.placement for b in view.structure.blocks} == {norm}
    expected = PRE_LN_TOKEN_CORR if norm == "pre" else REMEDIES["init_token_corr"]
    assert _remedy("init_token_corr", view) == expected


def _tied_head_run(run, scale: float, steps: int = 60, noisy: bool = False):
    """A next-token model whose logits are ``scale`` x F.linear(h, emb.weight): its head is
    applied by function (no module has the 12 outputs), so only the loss's graph says how
    many classes there are. Target: the token after x, (x + 1) mod 12; ``noisy``: a random
    token for half the batch (the best loss is then 1.79 nats, ln 12 = 2.48)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from stabscope import Recorder

    torch.manual_seed(0)
    emb, body = nn.Embedding(12, 16), nn.Linear(16, 16)
    model = nn.ModuleDict({"emb": emb, "body": body})
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(1)
    with Recorder(model, run, budget=steps) as rec:
        for _ in range(steps):
            x = torch.randint(0, 12, (64,), generator=g)
            logits = scale * F.linear(torch.tanh(body(emb(x))), emb.weight)
            y = (x + 1) % 12
            if noisy:
                y[::2] = torch.randint(0, 12, (32,), generator=g)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return RunView.open(run)


def test_a_head_applied_by_function_is_read_against_the_losss_own_classes(tmp_path) -> None:
    """No module holds the 12 outputs, so the head's ln V is unknown; at the run's end the
    loss's own 12 classes give ln 12, with the start counted as at most ln 12. Learned: it
    ends under half of ln 12. A start 3x too hot (8 nats) that falls only to between half of ln 12
    and ln 12 has not (against its own start it would read as learned)."""
    from stabscope.rules.forecast import learned, learned_by_the_end
    from stabscope.rules.output_features import log_classes

    view = _tied_head_run(tmp_path / "tied", 1.0)
    assert view.meta.doc["loss_classes"] == 12 and not isinstance(log_classes(view), tuple)
    loss = load_run(tmp_path / "tied", metrics=["loss"]).sort_values("step").value.to_numpy()
    assert np.median(loss[-5:]) < 0.5 * math.log(12)  # the reference: it learned
    said = learned_by_the_end(view, 60, 60)
    assert said is not None and "ln N = 2.48, the loss's 12 classes" in said
    assert learned(view) is None  # the forecast's own signals keep the head's reading

    hot = _tied_head_run(tmp_path / "hot", 3.0, noisy=True)
    loss = load_run(tmp_path / "hot", metrics=["loss"]).sort_values("step").value.to_numpy()
    assert 0.5 * math.log(12) < np.median(loss[-5:]) < math.log(12) < 0.5 * loss[0]
    assert learned_by_the_end(hot, 60, 60) is None
