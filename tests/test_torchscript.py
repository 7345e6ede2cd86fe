"""Scripts whose model holds TorchScript modules (``torch.jit.script`` blocks), or is one
(``torch.jit.trace`` of the whole model). TorchScript runs their forward where no Python hook
fires, and a scripted root refuses hooks outright (``RuntimeError: register_forward_hook is
not supported on ScriptModules``): stabscope leaves them unhooked, says so in meta.json's
notes, and records the rest. The reference is the same script run without stabscope: its
losses, to the bit, which the recorded loss rows must equal."""

from __future__ import annotations

import json

import pytest

import stabscope
from stabscope.record.config import RecorderConfig
from stabscope.store.run_meta import load_meta
from tests.scripts.harness import classify_loop, run_both

SCRIPT = """
import json, sys
import torch
import torch.nn.functional as F
from torch import nn

KIND = {kind!r}


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):  # (B, d) -> (B, d)
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class Net(nn.Module):
    def __init__(self, script_blocks):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        wrap = torch.jit.script if script_blocks else (lambda m: m)
        self.blocks = nn.ModuleList([wrap(Block(16)), Block(16), wrap(Block(16))])
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
model = Net(script_blocks=KIND == "blocks")
if KIND == "traced":
    model = torch.jit.trace(model, torch.randn(4, 8))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
{loop}json.dump(log, open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("kind", ["blocks", "traced"])
def test_scripted_modules_are_left_unhooked_and_the_run_is_recorded(tmp_path, kind):
    text = SCRIPT.format(kind=kind, loop=classify_loop(8))
    plain_log, profiled_log, run = run_both(tmp_path, text, RecorderConfig(online_rules=False))
    plain, profiled = (json.loads(p.read_text()) for p in (plain_log, profiled_log))
    assert profiled == plain  # training unchanged, to the bit
    meta = load_meta(run)
    assert meta.tool_error is None and meta.steps == len(plain) == 12
    loss = stabscope.load_run(run, metrics=["loss"]).sort_values("step").value.tolist()
    assert loss == pytest.approx(plain, rel=1e-6)
    (note,) = [n for n in meta.doc["notes"] if "TorchScript" in n]
    acts = set(stabscope.load_run(run, metrics=["act_rms"]).module.astype(str))
    if kind == "blocks":
        assert note.startswith("blocks.0, blocks.2 run as TorchScript")
        # The Python block and the layers around the scripted ones are hooked; nothing
        # inside a scripted block is.
        assert {"inp", "blocks.1", "blocks.1.fc1", "out"} <= acts
        assert not any(m.startswith(("blocks.0", "blocks.2")) for m in acts)
    else:
        assert note.startswith("the model runs as TorchScript")
        assert acts <= {"<root>"}  # nothing inside the traced model
