"""``block_in_rms`` (probes/block_input.py) against the rms of each block's input taken by the
test's own forward pre-hooks on the sample GPT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stabscope


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_input_rms_matches_hooks_on_the_sample_gpt(tmp_path, norm):
    import gpt

    from stabscope.drivers.script import ScriptConfig

    torch.manual_seed(0)
    cfg = ScriptConfig({**gpt.CONFIG, "depth": 3, "norm": norm, "seq_len": 8, "batch_size": 4})
    model, data = gpt.model(cfg), gpt.batches(cfg)
    opt = gpt.optimizer(model, cfg)
    expected: dict[tuple[int, str], float] = {}  # (step, block) -> rms of its input
    step = [0]

    def keep(name):
        def hook(module, args):
            x = args[0].detach().double()
            expected.setdefault((step[0], name), float(x.pow(2).mean().sqrt()))

        return hook

    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(keep(f"blocks.{i}"))
    with stabscope.Recorder(model, tmp_path / "run") as rec:  # steps 0-9 recorded
        for step[0] in range(4):
            loss = gpt.loss(model, next(data))
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    rows = stabscope.load_run(tmp_path / "run", metrics=["block_in_rms"])
    got = {(int(r.step), str(r.module)): float(r.value) for r in rows.itertuples()}
    # No probe forward: the structure is learnt from step 0, the probe runs from step 1 on.
    assert sorted(got) == sorted(k for k in expected if k[0] >= 1)
    for key, value in got.items():
        assert value == pytest.approx(expected[key], rel=1e-5), key
    # Pre-LN: every branch adds to the stream, which grows with depth.
    if norm == "pre":
        depth = [got[(1, f"blocks.{i}")] for i in range(3)]
        assert np.all(np.diff(depth) > 0)
