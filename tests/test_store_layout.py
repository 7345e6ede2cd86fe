"""The run directory's owner: its file names in one place, the typed view of meta.json that
readers use, and the one way meta.json is changed from outside the Recorder."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import stabscope
from stabscope.cli import app
from stabscope.store import RunMeta, load_meta, new_meta, save_meta, update_meta_file
from stabscope.store.layout import FINDINGS_FILE, META_FILE, PARTS_DIR, PREDICTION_FILE, part_name
from tests.conftest import batch_maker, mlp, train


def test_layout_names_the_files_every_writer_writes(run_dir):
    """The names in layout.py are the files a recorded and checked run really holds, and the
    theory's own name for its file is the same."""
    from stabscope.theory.prediction import PREDICTION_FILE as THEORY_NAME

    assert THEORY_NAME == PREDICTION_FILE
    model = mlp()
    with stabscope.Recorder(model, run_dir) as rec:
        train(model, 3, batch_maker(6, 3), rec)
    CliRunner().invoke(app, ["check", str(run_dir)])  # writes findings.json
    names = {p.name for p in run_dir.iterdir()}
    assert {META_FILE, PARTS_DIR, FINDINGS_FILE} <= names
    assert part_name(0) in {p.name for p in (run_dir / PARTS_DIR).iterdir()}


def test_run_meta_reads_what_the_recorder_wrote(run_dir):
    """Each property agrees with the document a real Recorder wrote, read independently."""
    model = mlp()
    with stabscope.Recorder(model, run_dir) as rec:
        train(model, 5, batch_maker(6, 3), rec)
    doc = json.loads((run_dir / META_FILE).read_text())
    meta = load_meta(run_dir)
    assert (meta.status, meta.steps, meta.world_size) == ("complete", 5, 1)
    assert meta.recorded_steps == doc["recorded_steps"] and meta.rows == doc["rows"] > 0
    assert meta.module_names == [name or "<root>" for name, _ in model.named_modules()]
    weights = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert meta.matrices == weights == {"0.weight", "2.weight", "4.weight"}
    assert meta.first_nonfinite == {} and meta.error is None and not meta.sharded
    assert dict(meta) == doc  # a Mapping over the document: keys without a property too


def test_run_meta_defaults_for_missing_keys():
    """A minimal meta (only the required keys): the defaults readers assumed key by key."""
    meta = RunMeta({"schema_version": 1, "status": "running"})
    assert (meta.steps, meta.recorded_steps, meta.rows, meta.parts) == (0, 0, 0, 0)
    assert meta.world_size == 1 and meta.modules == [] and meta.blocks == []
    assert meta.structure is None and meta.lr_plan is None and meta.error is None
    assert meta.config == {} and meta.run_info == {} and meta.notes == []
    assert RunMeta({"schema_version": 1}).status == "unknown"


def test_update_meta_file_merges_like_the_hand_edit_it_replaces(tmp_path):
    """Merging nested blocks keeps their other keys and the key order, so the bytes are those
    of the old read-modify-write; notes are appended."""
    meta = new_meta(["x"], config={"preset": "standard"}, run={"script_config": {"lr": 1}})
    meta["notes"] = ["first"]
    save_meta(tmp_path, meta)
    # The old edit, by hand, on a copy.
    expected = json.loads((tmp_path / META_FILE).read_text())
    expected["config"]["grow"] = {"role": "base"}
    expected["run"]["script_config"] = {**expected["run"]["script_config"], "grow": "base model"}
    expected["notes"].append("second")
    update_meta_file(
        tmp_path,
        ["second"],
        config={"grow": {"role": "base"}},
        run={"script_config": {"grow": "base model"}},
    )
    text = (tmp_path / META_FILE).read_text()
    assert text == json.dumps(expected, indent=1) + "\n"
