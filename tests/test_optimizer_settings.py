"""meta.json's ``optimizers`` and the rule ``adam-betas`` on real recorded runs.

The settings recorded are compared with the torch optimizer's own param groups; the rule's
value with β1 / √β2 computed here from the betas the script chose."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stabscope import RecorderConfig
from stabscope.rules import check_run
from tests.conftest import mlp, record_steps


def record(run_dir, make_optimizer, steps: int = 3) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    net = mlp()
    opt = make_optimizer(net)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    config = RecorderConfig(preset="cheap", online_rules=False)
    record_steps(net, run_dir, lambda m: (m(x) - y).pow(2).mean(), opt, steps, config)
    return opt


def two_groups(betas: tuple[float, float]):
    """Adam with the first layer at the default betas and the rest at ``betas``."""

    def make(net: torch.nn.Module) -> torch.optim.Optimizer:
        first, rest = list(net[0].parameters()), list(net[2:].parameters())
        groups = [{"params": first}, {"params": rest, "betas": betas, "lr": 3e-3}]
        return torch.optim.Adam(groups, lr=1e-3, weight_decay=0.01)

    return make


def test_the_optimizer_settings_are_those_of_its_param_groups(run_dir):
    opt = record(run_dir, two_groups((0.99, 0.9)))
    (recorded,) = json.loads((run_dir / "meta.json").read_text())["optimizers"]
    assert recorded["class"] == "Adam"
    assert len(recorded["groups"]) == len(opt.param_groups)
    for entry, group in zip(recorded["groups"], opt.param_groups):
        assert entry["params"] == len(group["params"])
        assert entry["betas"] == list(group["betas"])
        for key in ("lr", "eps", "weight_decay"):
            assert entry[key] == group[key]


def test_beta1_above_the_root_of_beta2_is_an_error_that_names_the_group(run_dir):
    record(run_dir, two_groups((0.99, 0.9)))
    (found,) = [f for f in check_run(run_dir).findings if f.rule == "adam-betas"]
    assert found.severity == "error"
    assert found.value == pytest.approx(0.99 / math.sqrt(0.9))
    assert "param group 1" in found.message and "(0.99, 0.9)" in found.message


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95), (0.0, 0.99)])
def test_betas_with_beta1_below_the_root_of_beta2_pass(run_dir, betas):
    record(run_dir, two_groups(betas))
    result = check_run(run_dir)
    assert "adam-betas" not in result.skipped
    assert not [f for f in result.findings if f.rule == "adam-betas"]


def test_sgd_and_a_run_recorded_before_the_settings_are_not_judged(tmp_path):
    sgd = tmp_path / "sgd"
    record(sgd, lambda net: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    (recorded,) = json.loads((sgd / "meta.json").read_text())["optimizers"]
    assert recorded["class"] == "SGD" and recorded["groups"][0]["momentum"] == 0.9
    assert "betas" not in recorded["groups"][0]
    assert not [f for f in check_run(sgd).findings if f.rule == "adam-betas"]
    # Adamax divides by a running max, not √v: its betas are not judged by √β2.
    adamax = tmp_path / "adamax"
    record(adamax, lambda net: torch.optim.Adamax(net.parameters(), betas=(0.99, 0.9)))
    assert json.loads((adamax / "meta.json").read_text())["optimizers"][0]["class"] == "Adamax"
    assert not [f for f in check_run(adamax).findings if f.rule == "adam-betas"]
    # An older run's meta.json has no ``optimizers``: nothing to judge, no crash.
    old = tmp_path / "old"
    record(old, two_groups((0.99, 0.9)))
    meta = json.loads((old / "meta.json").read_text())
    del meta["optimizers"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert not [f for f in check_run(old).findings if f.rule == "adam-betas"]
