"""Every ``RecorderConfig`` field is a keyword of ``Recorder`` (and of the callbacks over it);
an unknown keyword or a bad value is one error naming what is valid; a directory that holds
a run is refused in one line with the ``force`` hint, by the Recorder and by a real
Lightning and transformers Trainer run twice, and the first run stays as it was."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

import stabscope
from stabscope import RecorderConfig
from stabscope.errors import OptionError, RunExistsError
from tests.conftest import batch_maker, mlp, train

#: A value other than the default for every field a keyword can set (preset, include,
#: exclude, schedule and log_to are keywords of their own).
NON_DEFAULT = {
    "record_eval": False,
    "part_rows": 100,
    "flush_seconds": 5.0,
    "model_update": True,
    "attn_batch": 3,
    "attn_queries": 4,
    "structure_probes": False,
    "sharpness": False,
    "sharpness_iters": 5,
    "sharpness_budget": 0.1,
    "flight": False,
    "flight_every": 7,
    "online_rules": False,
    "step_updates": False,
    "step_updates_every": 4,
    "live_max_series": 17,
}


def test_the_table_covers_every_field():
    explicit = {"preset", "include", "exclude", "schedule", "log_to"}
    assert set(NON_DEFAULT) | explicit == {f.name for f in dataclasses.fields(RecorderConfig)}
    defaults = RecorderConfig()
    assert all(getattr(defaults, k) != v for k, v in NON_DEFAULT.items())


def test_every_field_is_a_keyword_and_lands_in_meta_json(run_dir):
    with stabscope.Recorder(mlp(), run_dir, **NON_DEFAULT) as rec:
        train(rec.model, 3, batch_maker(6, 3), rec)
    config = stabscope.read_meta(run_dir)["config"]
    assert {k: config[k] for k in NON_DEFAULT} == NON_DEFAULT
    # part_rows took effect: three recorded steps of a few hundred rows each are several parts
    parts = sorted((run_dir / "parts").glob("part-*.parquet"))
    rows = len(stabscope.load_run(run_dir))
    assert len(parts) >= rows // 100 > 1


def test_a_keyword_overrides_the_config(run_dir):
    config = RecorderConfig(part_rows=10, flight=False)
    rec = stabscope.Recorder(mlp(), run_dir, config, part_rows=99)
    rec.close()
    config = stabscope.read_meta(run_dir)["config"]
    assert (config["part_rows"], config["flight"]) == (99, False)


def test_none_keeps_its_meaning_of_auto(run_dir):
    rec = stabscope.Recorder(mlp(), run_dir, RecorderConfig(sharpness=False), sharpness=None)
    rec.close()
    assert stabscope.read_meta(run_dir)["config"]["sharpness"] is None


def test_an_unknown_keyword_names_the_valid_ones(tmp_path):
    with pytest.raises(TypeError) as caught:
        stabscope.Recorder(mlp(), tmp_path / "run", part_row=3000)
    error = caught.value
    assert isinstance(error, OptionError)
    assert error.message == "Recorder() got unknown keyword part_row"
    for name in ("part_rows", "flight_every", "force", "schedule", "on_error"):
        assert name in error.hint
    assert "\n" not in str(error)
    assert not (tmp_path / "run").exists()  # refused before the directory was made


@pytest.mark.parametrize("model", [None, "model.pt"])
def test_a_model_that_is_not_a_module_is_refused_before_the_directory(tmp_path, model):
    with pytest.raises(TypeError) as caught:
        stabscope.Recorder(model, tmp_path / "run")
    error = caught.value
    assert isinstance(error, OptionError)
    assert error.message == f"Recorder records an nn.Module, got {type(model).__name__}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "key, value, words",
    [("part_rows", "3000", "a positive integer"), ("flight", 1, "true or false")],
)
def test_a_value_of_the_wrong_type_names_what_the_field_takes(tmp_path, key, value, words):
    with pytest.raises(ValueError, match=f"Recorder\\(\\) {key} must be {words}, got"):
        stabscope.Recorder(mlp(), tmp_path / "run", **{key: value})


def test_a_schedule_is_a_schedule_or_its_text(tmp_path):
    rec = stabscope.Recorder(mlp(), tmp_path / "text", schedule="dense=3,every=5")
    assert rec.config.schedule == stabscope.Schedule(dense=3, every=5)
    rec.close()
    with pytest.raises(ValueError, match="bad schedule item 'x'"):
        stabscope.Recorder(mlp(), tmp_path / "bad", schedule="x")
    with pytest.raises(TypeError, match="schedule takes a Schedule or its text, got int"):
        stabscope.Recorder(mlp(), tmp_path / "bad", schedule=3)
    assert not (tmp_path / "bad").exists()


def test_an_out_that_is_a_file_is_one_error(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(stabscope.errors.UsageError, match="is a file, not a directory"):
        stabscope.Recorder(mlp(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_loss_of_more_than_one_number_is_one_error(tmp_path):
    model = mlp()
    x, y = batch_maker(6, 3)(0)
    with stabscope.Recorder(model, tmp_path / "run") as rec:
        per_output = (model(x) - y).pow(2).mean(0)  # (3,): the caller forgot the mean
        with pytest.raises(ValueError, match=r"got a tensor of shape \(3,\)"):
            rec.step(loss=per_output)
        rec.step(loss=per_output.mean())  # the recorder goes on
    loss = stabscope.load_run(tmp_path / "run", metrics="loss").value
    assert loss.tolist() == pytest.approx([per_output.mean().item()])


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run (dot-files included) and a hash of its bytes."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def assert_refused_with_the_force_hint(error: BaseException, run: Path) -> None:
    assert type(error) is RunExistsError
    assert str(error) == (
        f"{run} already holds a run "
        "(hint: pass force=True to overwrite it, or choose another out directory)"
    )
    assert error.__suppress_context__  # no chained traceback from inside the store


def test_the_recorder_refuses_an_existing_run_with_the_force_hint(run_dir):
    with stabscope.Recorder(mlp(), run_dir) as rec:
        train(rec.model, 2, batch_maker(6, 3), rec)
    before = snapshot(run_dir)
    with pytest.raises(RunExistsError) as caught:
        stabscope.Recorder(mlp(), run_dir)
    assert_refused_with_the_force_hint(caught.value, run_dir)
    assert snapshot(run_dir) == before
    stabscope.Recorder(mlp(), run_dir, force=True).close()  # and the hint works
    assert stabscope.read_meta(run_dir)["steps"] == 0


def test_lightning_trainer_run_twice(run_dir):
    from tests.test_integrations_lightning import Regressor, fit

    fit(Regressor(), run_dir)
    before = snapshot(run_dir)
    with pytest.raises(RunExistsError) as caught:
        fit(Regressor(), run_dir)
    assert_refused_with_the_force_hint(caught.value, run_dir)
    assert snapshot(run_dir) == before
    assert stabscope.read_meta(run_dir)["status"] == "complete"


@pytest.mark.slow
def test_hf_trainer_run_twice(run_dir):
    from tests.test_integrations_hf import train as hf_train

    hf_train(run_dir, 1, steps=2)
    before = snapshot(run_dir)
    with pytest.raises(RunExistsError) as caught:
        hf_train(run_dir, 1, steps=2)
    assert_refused_with_the_force_hint(caught.value, run_dir)
    assert snapshot(run_dir) == before
    assert stabscope.read_meta(run_dir)["status"] == "complete"
