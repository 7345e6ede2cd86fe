"""A pretraining and a fine-tune in one script (``tests/scripts/two_phases.py``): the fine-tune's
optimizer, over a fresh head, takes over from the pretraining's. The run records both and
says where the last phase began (meta.json ``phases``); the rules judge that phase alone. The
references are the script's own printed losses and the phase boundary it was written with:
judged whole, its healthy fine-tune read as a loss that fell to 0.015 and rose back to 0.77,
a divergence."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.rules import check_run
from stabscope.rules.view import RunView
from stabscope.store import RUN_MODULE
from stabscope.store.run_meta import load_meta

SCRIPT = Path(__file__).parent / "scripts" / "two_phases.py"


def profile(tmp_path, capfd, *args: str):
    run = tmp_path / "run"
    profile_training_script(SCRIPT, list(args), run, RecorderConfig(online_rules=False))
    printed = [float(v) for v in re.findall(r"^step \d+ loss (\S+)$", capfd.readouterr().out, re.M)]
    return run, np.array(printed)


@pytest.mark.parametrize("keep", [False, True])
def test_a_fine_tune_after_a_pretraining_is_judged_from_its_first_step(tmp_path, capfd, keep):
    """Deleted, or kept alive and silent: the first optimizer's phase ends where the new
    one's first step is, step 60."""
    run, printed = profile(tmp_path, capfd, *(["--keep"] if keep else []))
    meta = load_meta(run)
    assert meta.doc["phases"] == [{"step": 0}, {"step": 60, "optimizers": ["Adam"]}]
    assert meta.phase_start == 60
    assert any("a new training phase began at step 60" in n for n in meta.notes)
    loss = RunView.open(run).metrics("loss")
    loss = loss[loss.module == RUN_MODULE].sort_values("step")
    assert loss.step.tolist() == list(range(60, 120))
    np.testing.assert_allclose(loss.value.to_numpy(float), printed[60:], rtol=1e-6)
    rules = {f.rule for f in check_run(run).findings}
    assert "loss-divergence" not in rules and "loss-spike" not in rules


def test_an_optimizer_rebuilt_over_the_same_parameters_continues_the_phase(tmp_path, capfd):
    run, printed = profile(tmp_path, capfd, "--same")
    meta = load_meta(run)
    assert "phases" not in meta.doc and meta.phase_start is None
    loss = RunView.open(run).metrics("loss")
    assert sorted(loss[loss.module == RUN_MODULE].step) == list(range(120))
    assert len(printed) == 120
