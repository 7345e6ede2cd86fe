"""The structure discovery found, read back on the torch-free side as the same dataclasses
(``stabscope.store.structure``): what the rules see is what discovery built, and a meta.json
written by a newer or another tool (unknown keys, missing optional keys, α as "nan") reads
without a rule failing."""

from __future__ import annotations

import math

from stabscope.rules.view import RunView
from stabscope.store.structure import Structure
from stabscope.structure import discover
from tests.conftest import sample_gpt
from tests.rule_runs import checked, write

LOSS = [(s, "__run__", "loss", -1, 1.0) for s in range(3)]


def test_the_rules_see_the_structure_discovery_found(tmp_path):
    model, forward = sample_gpt("deepnorm", depth=3)
    found = discover(model, forward)
    assert found.recognised and len(found.blocks) == 3
    view = RunView.open(write(tmp_path / "run", LOSS, structure=found.to_dict()))
    assert view.structure == found
    assert view.block_names == ["blocks.0", "blocks.1", "blocks.2"]
    assert [b.norm for b in view.structure.branches][:2] == ["blocks.0.ln1", "blocks.0.ln2"]


def test_a_structure_from_another_writer_reads_without_failing_a_rule(tmp_path):
    branch = {"name": "blocks.0.attn", "output": "blocks.0.attn", "norm": "blocks.0.ln"}
    structure = {
        "recognised": True,
        "blocks": [
            {
                "name": "blocks.0",
                "placement": "deepnorm",
                "alpha": "nan",  # save_meta writes a non-finite float as its repr
                "branches": [{**branch, "placement": "deepnorm", "gain": 2.0}],  # a newer key
                "attention": [{"name": "blocks.0.attn", "heads": 4}],
                "rotary": True,  # a newer key
            },
            {"name": "blocks.1", "alpha": None},
        ],
    }
    run = write(tmp_path / "run", LOSS, structure=structure)
    read = RunView.open(run).structure
    assert isinstance(read, Structure)
    assert [b.name for b in read.blocks] == ["blocks.0", "blocks.1"]
    assert math.isnan(read.blocks[0].alpha) and math.isnan(read.blocks[1].alpha)
    assert read.blocks[0].branches[0].placement == "deepnorm"
    assert math.isnan(read.blocks[0].branches[0].alpha)  # absent
    assert read.blocks[1].branches == [] and read.blocks[1].stack == ""
    assert read.attention[0].heads == 4
    checked(run)  # every rule ran; none raised on the structure
