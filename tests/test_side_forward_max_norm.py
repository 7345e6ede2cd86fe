"""Training stays bit-identical under stabscope when an embedding renormalises its weight in
forward (``nn.Embedding(max_norm=...)`` rescales, in place, every row it looks up). The
stability index runs extra forward passes of the model; without giving that weight back,
its rows were renormalised by them and the script's losses drifted by ~1e-7 from step 3 on
(a hierarchical text classifier, held-out trial)."""

from __future__ import annotations

import json

from stabscope.record.config import RecorderConfig
from tests.scripts.harness import run_both

SCRIPT = """
import json
import sys
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(50, 16, max_norm=0.5), nn.Flatten(), nn.Linear(16 * 6, 3))
opt = torch.optim.Adam(model.parameters(), lr=3e-2)
g = torch.Generator().manual_seed(1)
with open(sys.argv[1], "w") as log:
    for step in range(12):
        x = torch.randint(0, 50, (8, 6), generator=g)
        y = x[:, 0] % 3
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.write(json.dumps(loss.item()) + "\\n")
"""


def losses(path) -> list[float]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_embedding_that_renormalises_in_forward_trains_as_without_stabscope(tmp_path):
    config = RecorderConfig(sharpness=True)  # extra forward passes at steps 2, 4, 8
    plain, profiled, _ = run_both(tmp_path, SCRIPT, config, budget=12)
    assert len(losses(plain)) == 12
    assert losses(profiled) == losses(plain)
