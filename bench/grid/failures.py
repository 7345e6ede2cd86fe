"""The grid: failure configs and their healthy twins, per family.

Each config is bench/grid/script.py with ``--set`` overrides; ``expect`` is what the config was
designed to do (the truth is measured, bench/grid/truth.py). Kinds:

    postln-still   deep Post-LN that stands still; twins: the init (DeepNorm) or warm-up
                   that rescues it
    lr-too-high    Pre-LN at a learning rate too high to learn (attention logit growth,
                   entropy collapse); twin: the high lr that still trains
    warmup-peak    linear warm-up to a peak past stability: fails late; twin: a stable peak
    nan-adam       Adam with an lr that ramps geometrically: reaches NaN/Inf; twin: a
                   smaller ramp
    nan-sgd        the same with SGD (momentum 0.9)
    bad-init       output head x a huge factor: loss ~1e3-1e8 at step 0, never recovers;
                   twin: a moderately bad init that recovers
    collapse       learns, then the lr ramps and the model falls back to the unigram loss;
                   twin: a smaller ramp
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    name: str
    family: str
    kind: str
    expect: str  # fail | healthy
    sets: dict[str, str] = field(default_factory=dict, hash=False)


def pair(family: str, kind: str, base: dict, fail: dict, *healthy: dict) -> list[Config]:
    """A failing config and its healthy twins: ``base`` updated by each one's changes. Names
    are family-kind-fail and family-kind-ok (ok2, ok3 ... for more twins)."""
    fails = [Config(f"{family}-{kind}-fail", family, kind, "fail", _str({**base, **fail}))]
    oks = [
        Config(f"{family}-{kind}-ok{i + 1 if i else ''}", family, kind, "healthy",
               _str({**base, **h}))
        for i, h in enumerate(healthy)
    ]  # fmt: skip
    return fails + oks


def _str(sets: dict) -> dict[str, str]:
    return {k: str(v) for k, v in sets.items()}


GRID: list[Config] = [
    # placeholder until the configs are measured
    *pair("gpt", "lr-too-high", {"task": "succ"}, {"lr": 3e-1}, {"lr": 3e-2}),
    *pair("llama", "lr-too-high", {"task": "text"}, {"lr": 3e-1}, {"lr": 3e-3}),
]
