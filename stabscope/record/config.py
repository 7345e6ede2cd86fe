"""Recorder configuration: one frozen dataclass, read from ``[tool.stabscope]`` and the CLI."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OptionError
from ..settings import check_keys, find_pyproject, read_toml_table
from .schedule import Schedule

#: Presets, cheapest first. Each names what a recorded step measures.
PRESETS: dict[str, str] = {
    "cheap": "forward moments of every module, parameter norms, loss and learning rate",
    "standard": "cheap + gradient moments of every module output, gradient norms, update "
    "ratios, residual dependency, attention entropy and logits, token correlation, norm "
    "and block inputs, output logits, Adam eps ratio, the stability index at steps 2, 4, 8, "
    "... (with a probe forward)",
    "full": "standard + per-parameter weight and gradient moments (mean, absmax, non-finite) "
    "and the model update ||F(x, θ_t) − F(x, θ_0)|| on a probe batch",
}


@dataclass(frozen=True)
class RecorderConfig:
    """What to record and how often. All fields have defaults that suit a first look."""

    preset: str = "standard"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    schedule: Schedule = field(default_factory=Schedule)
    record_eval: bool = True
    part_rows: int = 500_000
    flush_seconds: float = 30.0
    #: ||F(x, θ_t) − F(x, θ_0)|| on a probe batch; None = on for the full preset only.
    model_update: bool | None = None
    #: Attention probabilities are recomputed for this many sequences and query positions;
    #: attn_queries = 0 turns the attention probe off.
    attn_batch: int = 2
    attn_queries: int = 16
    #: The structure-aware probes of the standard and full presets (residual, attention,
    #: token correlation, norm inputs, output logits, Adam); false keeps the recorder core:
    #: module moments, parameter and gradient norms, update ratios.
    structure_probes: bool = True
    #: The stability index (top eigenvalue of the optimizer-preconditioned Hessian over the
    #: optimizer's stability threshold) at steps 2, 4, 8, ...; None = on unless cheap.
    sharpness: bool | None = None
    #: Lanczos iterations per stability-index measurement at most (Hessian-vector products;
    #: a measurement stops once its estimate settles).
    sharpness_iters: int = 8
    #: The stability index's time as a fraction of the training time (of the planned run's,
    #: when the run knows its plan): a scheduled measurement that would exceed it is skipped
    #: and counted in meta.json. None: no limit.
    sharpness_budget: float | None = None
    #: The flight recorder: rms, largest |x| and NaN/Inf of every block's, the stem's and the
    #: head's output and gradient at every step, recorded or not (docs/flight-recorder.md).
    flight: bool = True
    #: Steps per ring buffer: one device->host transfer (and one part) per this many steps.
    flight_every: int = 50
    #: The rules that hold on a partial run, run while it trains each time a part is written
    #: (``rules.online``): their error findings warn, call ``on_finding`` or stop the run.
    online_rules: bool = True
    #: ||Δθ|| and ||θ|| of every residual block (a kept copy of the block parameters);
    #: None = on while the blocks hold at most 100M values.
    step_updates: bool | None = None
    #: The block update norms on every recorded step and every this many steps between (1:
    #: every step). Each one reads the block parameters four times (copy, difference): 1.8%
    #: of the sample GPT's CPU step, 0.2% at 10 (docs/benchmarks.md, "Flight recorder").
    step_updates_every: int = 10
    #: Dashboards that get the curated series and the findings while the run trains
    #: (``tensorboard:DIR``, ``wandb``, ``wandb:PROJECT``; docs/dashboards.md).
    log_to: tuple[str, ...] = ()
    #: The most live series sent (blocks are thinned evenly to fit).
    live_max_series: int = 256

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.part_rows < 1:
            raise ValueError("part_rows must be positive")
        if self.sharpness_iters < 1:
            raise ValueError("sharpness_iters must be positive")
        if self.sharpness_budget is not None and not _is_fraction(self.sharpness_budget):
            raise ValueError(
                "sharpness_budget must be a positive number (0.05: 5%; inf: no limit) or None"
            )
        if self.flight_every < 1:
            raise ValueError("flight_every must be positive")
        if self.live_max_series < 1:
            raise ValueError("live_max_series must be positive")

    @property
    def grads(self) -> bool:
        return self.preset != "cheap"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RecorderConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_fraction(v: Any) -> bool:
    """A positive share of the training time; ``inf``: no limit."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= math.inf


def _is_glob_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


#: What each key of ``[tool.stabscope]`` takes: a test and the words for it.
_EXPECTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "preset": (lambda v: isinstance(v, str) and v in PRESETS, f"one of {', '.join(PRESETS)}"),
    "include": (_is_glob_list, 'a list of glob strings, like ["blocks.*"]'),
    "exclude": (_is_glob_list, 'a list of glob strings, like ["*.dropout"]'),
    "schedule": (
        lambda v: isinstance(v, (dict, str)),
        'a table like { dense = 10, every = 25 } or a string like "log,dense=20"',
    ),
    "record_eval": (lambda v: isinstance(v, bool), "true or false"),
    "part_rows": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "flush_seconds": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
        "a positive number of seconds",
    ),
    "model_update": (lambda v: isinstance(v, bool), "true or false"),
    "attn_batch": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "attn_queries": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 turns it off)"),
    "structure_probes": (lambda v: isinstance(v, bool), "true or false"),
    "sharpness": (lambda v: isinstance(v, bool), "true or false"),
    "sharpness_iters": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "sharpness_budget": (
        _is_fraction,
        "a positive fraction of the training time, like 0.05 (inf: no limit)",
    ),
    "flight": (lambda v: isinstance(v, bool), "true or false"),
    "flight_every": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "online_rules": (lambda v: isinstance(v, bool), "true or false"),
    "step_updates": (lambda v: isinstance(v, bool), "true or false"),
    "step_updates_every": (lambda v: _is_int(v) and v >= 1, "a positive integer (1: every step)"),
    "log_to": (_is_glob_list, 'a list of targets, like ["tensorboard:runs/tb", "wandb"]'),
    "live_max_series": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
}
_SCHEDULE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dense": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "every": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "log": (lambda v: isinstance(v, bool), "true or false"),
    "per_decade": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
}


#: Fields whose ``None`` means "decide from the preset or the model".
_NONE_MEANS_AUTO = ("model_update", "sharpness", "sharpness_budget", "step_updates")


def with_options(
    cfg: RecorderConfig, options: dict[str, Any], where: str, valid: list[str]
) -> RecorderConfig:
    """``cfg`` with ``options`` (RecorderConfig fields given as keywords of ``where``, e.g.
    ``Recorder(model, out, part_rows=3000)``) replacing its values. An unknown keyword is
    one ``OptionError`` listing ``valid`` (every keyword ``where`` takes); a value of the wrong
    type or range is one naming what the field takes, as ``[tool.stabscope]`` does."""
    fields = {f.name for f in dataclasses.fields(RecorderConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise OptionError(
            f"{where}() got unknown keyword{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
            hint=f"the keywords it takes: {', '.join(sorted(set(valid) | fields))}",
        )
    for key, value in options.items():
        test, words = _EXPECTED[key]
        if not (value is None and key in _NONE_MEANS_AUTO) and not test(value):
            raise OptionError(
                f"{where}() {key} must be {words}, got {value!r}",
                hint="see the Recorder options in docs/recording.md",
            )
    return dataclasses.replace(cfg, **options)


def keyword_names(function: Callable[..., Any]) -> list[str]:
    """The keyword-only parameters of ``function`` (a constructor's own options)."""
    return [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def load_pyproject_config(start: Path | None = None) -> RecorderConfig:
    """Read ``[tool.stabscope]`` from the nearest pyproject.toml above ``start`` (or cwd)."""
    path = find_pyproject(start)
    if path is None:
        return RecorderConfig()
    table = read_toml_table(path, "tool", "stabscope")
    table.pop("rules", None)  # the rules' settings: see stabscope.rules
    return config_from_mapping(table, source=str(path))


def config_from_mapping(table: dict[str, Any], source: str = "config") -> RecorderConfig:
    """Build a config from a plain mapping (``[tool.stabscope]``): an unknown key, or a value
    of the wrong type or range, is a ``ConfigError`` that names the key."""
    check_keys(table, _EXPECTED, "[tool.stabscope]", source)
    values = dict(table)
    schedule = values.get("schedule")
    try:
        if isinstance(schedule, dict):
            check_keys(schedule, _SCHEDULE, "[tool.stabscope.record.schedule]", source)
            values["schedule"] = Schedule(**schedule)
        elif isinstance(schedule, str):
            values["schedule"] = Schedule.parse(schedule)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: [tool.stabscope] schedule: {err}", source) from None
    for key in ("include", "exclude", "log_to"):
        if key in values:
            values[key] = tuple(values[key])
    return RecorderConfig(**values)
