"""``Recorder.last_loss``, the loss the progress bar shows: the newest one readable without a
device sync."""

from __future__ import annotations

import torch

import stabscope
from tests.conftest import batch_maker, mlp, train


def test_the_last_loss_is_the_last_steps_on_cpu_between_syncs(tmp_path):
    """``rec.last_loss`` (the progress bar's) is the step just ended on CPU, where the loss
    is in host memory, not the last recorded step's: steps 0-1 are recorded, 2-6 are not."""
    torch.manual_seed(0)
    model = mlp()
    seen = []
    with stabscope.Recorder(model, tmp_path / "run", schedule=stabscope.Schedule(2, 0)) as rec:
        losses = train(
            model, 7, batch_maker(6, 3), rec, before_step=lambda s: seen.append(rec.last_loss)
        )
        seen.append(rec.last_loss)
    # Before step s the last loss is step s-1's, the one train() returned for it (float32).
    assert seen[0] is None
    assert seen[1:] == [float(torch.tensor(v, dtype=torch.float32)) for v in losses]
