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


def pair(
    family: str, kind: str, base: dict, fail: dict, *healthy: dict, name: str = ""
) -> list[Config]:
    """A failing config and its healthy twins: ``base`` updated by each one's changes. Names:
    family-kind[-name]-fail and -ok (-ok2, -ok3 ... for more twins)."""
    stem = "-".join(p for p in (family, kind, name) if p)
    fails = [Config(f"{stem}-fail", family, kind, "fail", _str({**base, **fail}))]
    oks = [
        Config(f"{stem}-ok{i + 1 if i else ''}", family, kind, "healthy", _str({**base, **h}))
        for i, h in enumerate(healthy)
    ]
    return fails + oks


def _str(sets: dict) -> dict[str, str]:
    return {k: str(v) for k, v in sets.items()}


# fmt: off
GRID: list[Config] = [
    # --- hand-written GPT (sample_models/gpt.py), successor task; 2 layers unless noted ---
    *pair("gpt", "postln-still", {"task": "succ", "depth": 6, "norm": "post", "lr": 1e-2},
          {}, {"warmup": 60}),                                 # warm-up rescues
    *pair("gpt", "postln-still", {"task": "succ", "depth": 12, "lr": 2e-3},
          {"norm": "post"}, {"norm": "deepnorm"}, name="deep"),  # the init rescues
    *pair("gpt", "lr-too-high", {"task": "succ"}, {"lr": 3e-1}, {"lr": 3e-2}),
    *pair("gpt", "warmup-peak", {"task": "succ", "warmup": 60}, {"lr": 3e-1}, {"lr": 3e-2}),
    *pair("gpt", "nan-sgd", {"task": "succ", "optim": "sgd", "lr": 3e-2, "ramp_at": 0.1},
          {"ramp": 1e4}, {"ramp": 10}),
    *pair("gpt", "bad-init", {"task": "succ"}, {"out_scale": 1e3}, {"out_scale": 10}),
    *pair("gpt", "collapse", {"task": "text", "lr": 1e-3, "ramp_at": 0.3, "ramp_end": 0.6},
          {"ramp": 300}, {"ramp": 10}),
    # --- LLaMA-style (transformers): byte-level text, successor task for the warm-up ---
    *pair("llama", "lr-too-high", {"task": "text"}, {"lr": 3e-1}, {"lr": 3e-3}),
    *pair("llama", "warmup-peak", {"task": "succ", "warmup": 60}, {"lr": 1.0}, {"lr": 1e-1}),
    *pair("llama", "nan-sgd", {"task": "text", "optim": "sgd", "lr": 3e-2, "ramp_at": 0.1},
          {"ramp": 1e4}, {"ramp": 10}),
    *pair("llama", "bad-init", {"task": "text"}, {"out_scale": 1e3}, {"out_scale": 10}),
    *pair("llama", "collapse", {"task": "text", "lr": 1e-3, "ramp_at": 0.3, "ramp_end": 0.5},
          {"ramp": 500}, {"ramp": 10}),
    # --- GPT-2-style (transformers), successor task ---
    *pair("gpt2", "lr-too-high", {"task": "succ"}, {"lr": 3e-1}, {"lr": 3e-2}),
    *pair("gpt2", "warmup-peak", {"task": "succ", "warmup": 60}, {"lr": 1.0}, {"lr": 3e-2}),
    *pair("gpt2", "bad-init", {"task": "succ"}, {"out_scale": 1e4}, {"out_scale": 10}),
    *pair("gpt2", "collapse", {"task": "succ", "lr": 1e-3, "ramp_at": 0.3, "ramp_end": 0.5},
          {"ramp": 500}, {"ramp": 10}),
    # --- BERT-style (transformers, Post-LN) as a causal LM, successor task, 8 layers ---
    *pair("bert", "postln-still", {"task": "succ", "depth": 8, "lr": 1e-3},
          {"init_std": 0.2}, {"init_std": 0.02}),              # BERT's own init rescues
    *pair("bert", "warmup-peak", {"task": "succ", "depth": 8, "warmup": 100},
          {"lr": 1e-1}, {"lr": 3e-3}),
    *pair("bert", "bad-init", {"task": "succ", "depth": 8}, {"out_scale": 1e4},
          {"out_scale": 10}),
    *pair("bert", "collapse", {"task": "succ", "depth": 8, "lr": 1e-3, "ramp_at": 0.3,
                               "ramp_end": 0.5}, {"ramp": 500}, {"ramp": 3}),
    # --- nn.Transformer encoder-decoder, reverse task ---
    *pair("encdec", "postln-still", {"task": "reverse", "norm": "post", "lr": 3e-3},
          {"depth": 6}, {"depth": 4, "warmup": 60},           # shallower + warm-up trains
          {"task": "succ", "depth": 6, "lr": 1e-3},           # the same depth trains on
          {"task": "succ", "depth": 6, "lr": 1e-3, "warmup": 60}),  # succ, with or without
    *pair("encdec", "lr-too-high", {"task": "reverse", "norm": "pre"}, {"lr": 3e-2},
          {"lr": 3e-3}),
    *pair("encdec", "bad-init", {"task": "reverse", "norm": "pre", "lr": 3e-3},
          {"out_scale": 1e3}, {"out_scale": 10}),
    *pair("encdec", "collapse", {"task": "reverse", "norm": "pre", "lr": 3e-3, "ramp_at": 0.4,
                                 "ramp_end": 0.5}, {"ramp": 30}, {"ramp": 3}),
    # --- residual causal-conv net without normalisation, byte-level text ---
    *pair("resconv", "nan-sgd", {"task": "text", "depth": 8, "optim": "sgd", "lr": 1e-2,
                                 "ramp_at": 0.1}, {"ramp": 1e3}, {"ramp": 10}),
    *pair("resconv", "nan-adam", {"task": "text", "depth": 16, "lr": 1e-3, "ramp_at": 0.1,
                                  "ramp_end": 0.5}, {"ramp": 1e7}, {"ramp": 10}),
    *pair("resconv", "bad-init", {"task": "text", "depth": 8}, {"init_gain": 3},
          {"init_gain": 1.5}),
    # --- OPT (transformers, Pre-LN, ReLU FFN); its ramps start at half the budget ---
    *pair("opt", "lr-too-high", {"task": "text"}, {"lr": 3e-1}, {"lr": 3e-3}),
    *pair("opt", "warmup-peak", {"task": "succ", "warmup": 60}, {"lr": 1.0}, {"lr": 3e-2}),
    *pair("opt", "nan-adam", {"task": "text", "lr": 1e-3, "ramp_at": 0.5, "ramp_end": 0.8},
          {"ramp": 1e5}, {"ramp": 10}),
    *pair("opt", "bad-init", {"task": "text"}, {"out_scale": 1e3}, {"out_scale": 10}),
    *pair("opt", "collapse", {"task": "text", "lr": 1e-3, "ramp_at": 0.5, "ramp_end": 0.7},
          {"ramp": 300}, {"ramp": 10}),
    # --- GPT-NeoX (transformers), parallel attention and MLP branches, rotary ---
    *pair("neox", "lr-too-high", {"task": "text"}, {"lr": 1.0}, {"lr": 1e-2}),
    *pair("neox", "warmup-peak", {"task": "succ", "warmup": 80}, {"lr": 1.0}, {"lr": 3e-2}),
    *pair("neox", "nan-sgd", {"task": "succ", "optim": "sgd", "lr": 3e-2, "ramp_at": 0.3},
          {"ramp": 1e4}, {"ramp": 10}),
    *pair("neox", "bad-init", {"task": "succ"}, {"out_scale": 1e4}, {"out_scale": 10}),
    *pair("neox", "collapse", {"task": "succ", "lr": 1e-3, "ramp_at": 0.6, "ramp_end": 0.8},
          {"ramp": 500}, {"ramp": 10}),
    # --- a stacked LSTM: no attention and no residual blocks, byte-level text ---
    *pair("lstm", "nan-sgd", {"task": "text", "optim": "sgd", "lr": 0.3, "ramp_at": 0.2},
          {"ramp": 1e4}, {"ramp": 10}),
    *pair("lstm", "nan-adam", {"task": "text", "lr": 3e-3, "ramp_at": 0.4, "ramp_end": 0.7},
          {"ramp": 1e5}, {"ramp": 10}),
    *pair("lstm", "bad-init", {"task": "text", "lr": 3e-3}, {"out_scale": 1e4},
          {"out_scale": 10}),
    *pair("lstm", "collapse", {"task": "text", "lr": 3e-3, "ramp_at": 0.4, "ramp_end": 0.6},
          {"ramp": 1000}, {"ramp": 10}),
]
# fmt: on
