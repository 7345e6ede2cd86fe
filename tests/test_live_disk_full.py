"""A TensorBoard destination whose disk fills while the run trains: one warning, the training
completes, and every Parquet row is written (the run directory is on a normal filesystem).

The event file sits on a real tmpfs of 64 KiB (mounted here, as root). Where mounting is not
allowed the child runs under ``RLIMIT_FSIZE`` with SIGXFSZ ignored instead, which refuses any
file past the limit with EFBIG: the run's own files are kept under it (small parts, a small
model), the event file grows past it. Both modes run where both are possible."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

import stabscope
from stabscope.store import count_rows
from tests.conftest import ROOT
from tests.run_children import parts_on_disk, run_python_child
from tests.test_disk_full import mount_tmpfs

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

STEPS = 400
#: The rlimit mode's file-size limit: above meta.json and a part of PART_ROWS rows, below the
#: event file of STEPS steps (~40 series a step, ~1.8 KB).
LIMIT = 96_000
PART_ROWS = 2000

#: argv: run, tb, mode. Prints one JSON line: the StabscopeWarnings seen, the steps trained.
CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys, warnings, torch
    sys.path.insert(0, {root!r})
    import stabscope
    from stabscope.errors import StabscopeWarning
    from tests.conftest import sample_gpt

    run, tb, mode = sys.argv[1:4]
    if mode == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    model, forward = sample_gpt("post", depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = stabscope.RecorderConfig(
        schedule=stabscope.Schedule(3, 5), flight_every=4, part_rows={part_rows},
        step_updates_every=1,  # the block update series every step: the event file's size
    )
    steps = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_to = "tensorboard:" + tb
        with stabscope.Recorder(model, run, cfg, forward=forward, log_to=log_to) as rec:
            for step in range({steps}):
                loss = forward(model)
                opt.zero_grad(); loss.backward(); opt.step()
                rec.step(loss=loss)
                steps += 1
    seen = [str(w.message) for w in caught if issubclass(w.category, StabscopeWarning)]
    print(json.dumps({{"warnings": seen, "steps": steps}}))
    """
)


@pytest.fixture(params=["tmpfs", "rlimit"])
def tb_disk(request, tmp_path):
    """(mode, the TensorBoard directory, on a disk that fills)."""
    where = tmp_path / "tbdisk"
    if request.param == "tmpfs":
        if not mount_tmpfs(where, "64k"):
            pytest.skip("mounting a tmpfs is not allowed here; the rlimit mode covers it")
        yield request.param, where / "tb"
        subprocess.run(["umount", "-l", str(where)], check=False)
    else:
        yield request.param, where / "tb"


@pytest.mark.slow
def test_a_tensorboard_disk_full_mid_run_warns_once_and_loses_no_row(tb_disk, tmp_path):
    mode, tb = tb_disk
    run = tmp_path / "run"
    code = CHILD.format(root=str(ROOT), limit=LIMIT, part_rows=PART_ROWS, steps=STEPS)
    child = run_python_child(code, str(run), str(tb), mode)
    assert child["steps"] == STEPS
    (warning,) = child["warnings"]  # exactly one
    assert warning.startswith(f"live logging to tensorboard:{tb} stopped: ")
    reason = "No space left on device" if mode == "tmpfs" else "File too large"
    assert reason in warning and warning.endswith("the run keeps recording")
    meta = stabscope.read_meta(run)
    assert meta["status"] == "complete" and meta["steps"] == STEPS
    assert meta["rows"] == count_rows(run) and meta["parts"] == len(parts_on_disk(run))
    assert meta["parts"] > 1  # the run wrote parts after the dashboard stopped
    assert any(n == warning for n in meta["notes"])
    loss = stabscope.load_run(run, metrics=["loss"], modules=["__run__"])
    assert sorted(loss.step.tolist()) == list(range(STEPS))
    # The dashboard stopped mid-run: what reached the event file is a prefix of the steps.
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    sent = [e.step for e in acc.Scalars("loss")]
    assert 0 < len(sent) < STEPS and sent == list(range(len(sent)))
