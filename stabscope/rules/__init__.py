"""Rules: theory turned into checks on a recorded run (no torch import).

result = check_run("runs/gpt-post")        # CheckResult(findings, skipped)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..store.findings import SEVERITIES, write_findings
from . import (
    above_constant,
    above_uniform,
    clip_throttle,
    constant_prediction,
    depth,
    far_above_chance,
    forecast,
    health,
    loss_divergence,
    loss_frozen,
    lr_negative,
    lr_ramp,
    lr_vanish,
    negligible_updates,
    no_update,
    optimizer_settings,
    prediction,
    ranks,
    residual_stream,
    training_loop,
    transformer,
    weight_decay,
)
from .base import CheckResult, Rule, RuleSettings, RunView, run_rules

ALL_RULES: list[Rule] = [
    *depth.RULES,
    *health.RULES,
    *loss_divergence.RULES,
    *loss_frozen.RULES,
    *no_update.RULES,
    *optimizer_settings.RULES,
    *weight_decay.RULES,
    *training_loop.RULES,
    *transformer.RULES,
    *residual_stream.RULES,
    *ranks.RULES,
    *prediction.RULES,
    *forecast.RULES,
    *lr_ramp.RULES,
    *lr_vanish.RULES,
    *lr_negative.RULES,
    *clip_throttle.RULES,
    *constant_prediction.RULES,
    *above_uniform.RULES,
    *far_above_chance.RULES,
    *above_constant.RULES,
    *negligible_updates.RULES,
]
RULES_BY_ID = {r.id: r for r in ALL_RULES}


def _threshold(v: Any) -> bool:
    """Every rule parameter is a threshold, factor, window or count: a finite number >= 0."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf


def settings_from_mapping(table: dict[str, Any], source: str = "config") -> RuleSettings:
    """``[tool.stabscope.rules]``: ``disable = [ids]``; ``<rule-id> = {param = value,
    severity = "warning"}``. Unknown rules or parameters are errors that list the valid ones."""
    settings = RuleSettings()
    for key, value in table.items():
        if key == "disable":
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(
                    f"{source}: [tool.stabscope.rules] disable must be a list of rule ids, "
                    f'like ["loss-spike"], got {json.dumps(value, default=str)}'
                )
            unknown = set(value) - set(RULES_BY_ID)
            if unknown:
                raise ValueError(
                    f"{source}: unknown rules {sorted(unknown)} in disable; "
                    f"valid: {sorted(RULES_BY_ID)}"
                )
            settings.disabled |= set(value)
            continue
        rule = RULES_BY_ID.get(key)
        if rule is None:
            raise ValueError(
                f"{source}: unknown key {key!r} in [tool.stabscope.rules]; valid: "
                f"disable, {', '.join(sorted(RULES_BY_ID))}"
            )
        if not isinstance(value, dict):
            raise ValueError(f"{source}: [tool.stabscope.rules.{key}] must be a table")
        for param, v in value.items():
            if param == "severity":
                if v not in SEVERITIES:
                    raise ValueError(f"{source}: severity of {key} must be one of {SEVERITIES}")
                settings.severity[key] = v
            elif param in rule.defaults:
                if not _threshold(v):
                    raise ValueError(
                        f"{source}: [tool.stabscope.rules.{key}] {param} must be a finite "
                        f"number >= 0 (default {rule.defaults[param]:g}), "
                        f"got {json.dumps(v, default=str)}"
                    )
                settings.params.setdefault(key, {})[param] = float(v)
            else:
                raise ValueError(
                    f"{source}: unknown parameter {param!r} for rule {key}; "
                    f"valid: severity, {', '.join(sorted(rule.defaults))}"
                )
    return settings


def check_run(
    run_dir: str | Path, settings: RuleSettings | None = None, until: int | None = None
) -> CheckResult:
    """All rules on a run; ``until`` limits them to the steps before it."""
    return run_rules(run_dir, ALL_RULES, settings, until)


__all__ = [
    "ALL_RULES",
    "CheckResult",
    "Rule",
    "RuleSettings",
    "RunView",
    "check_run",
    "settings_from_mapping",
    "write_findings",
]
