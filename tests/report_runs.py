"""Synthetic runs for the report tests, written through the real run store.

Every value is a closed-form function of (layer, step, index), given in ``VALUES``, so a test
can compute what any plot cell must show without reading the table back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from stabscope.store import PartWriter, new_meta, save_meta

HEADS = 2

# metric -> (module name pattern, value(layer, step, index)); "{i}" is the layer index.
VALUES: dict[str, tuple[str, Callable[[int, int, int], float]]] = {
    "act_rms": ("blocks.{i}", lambda i, s, h: (i + 1) * (1 + s / 100)),
    "grad_rms": ("blocks.{i}", lambda i, s, h: 1e-3 * 2.0**i / (1 + s)),
    "act_absmax": ("blocks.{i}", lambda i, s, h: 10.0 * (i + 1)),
    "grad_absmax": ("blocks.{i}", lambda i, s, h: 1e-2 / (i + 1)),
    "token_corr": ("blocks.{i}", lambda i, s, h: 0.1 * i),
    "norm_input_rms": ("blocks.{i}.ln", lambda i, s, h: 1.0 + i),
    "res_ratio": ("blocks.{i}.attn", lambda i, s, h: 0.5 / (i + 1)),
    "res_dependency": ("blocks.{i}.attn", lambda i, s, h: 0.2),
    "res_corr": ("blocks.{i}.attn", lambda i, s, h: -0.1 * i),
    "res_omega": ("blocks.{i}.attn", lambda i, s, h: 1.0 + i),
    "res_beta": ("blocks.{i}.attn", lambda i, s, h: 1.0 / (h + 1)),
    "attn_entropy": ("blocks.{i}.attn", lambda i, s, h: 0.9 - 0.1 * h - 0.01 * s),
    "attn_logit_max": ("blocks.{i}.attn", lambda i, s, h: (i + 1) * (h + 1) + s),
}
# parameters of each layer: (name, weight norm, update norm); norms 3, 4 -> layer norm 5
PARAMS = (("blocks.{i}.attn.weight", 3.0, 0.03), ("blocks.{i}.ln.weight", 4.0, 0.04))
INDEXED = {"res_beta": 3, "attn_entropy": HEADS, "attn_logit_max": HEADS}


def loss_at(step: int) -> float:
    return 4.0 * math.exp(-step / 10)


def meta_for(layers: int, names: dict[int, str] | None = None, structure: bool = True) -> dict:
    names = names or {}
    modules = [{"name": "<root>", "type": "Net", "layer": None, "role": "model", "depth": 0}]
    blocks = []
    for i in range(layers):
        block = names.get(i, f"blocks.{i}")
        modules += [
            {"name": block, "type": "Block", "layer": i, "role": "block", "depth": 2},
            {"name": f"blocks.{i}.ln", "type": "LayerNorm", "layer": i, "role": "norm", "depth": 3},
            {
                "name": f"blocks.{i}.attn",
                "type": "Attn",
                "layer": i,
                "role": "attention",
                "depth": 3,
            },
        ]
        blocks.append(
            {
                "name": block,
                "index": i,
                "stack": "",
                "placement": "pre",
                "alpha": None,
                "branches": [
                    {"name": f"blocks.{i}.attn", "kind": "attention", "norm": f"blocks.{i}.ln"}
                ],
                "attention": [{"name": f"blocks.{i}.attn", "heads": HEADS}],
            }
        )
    for order, m in enumerate(modules):
        m["forward_order"] = order
    params = [
        {"name": p.format(i=i), "shape": [4], "numel": 4, "layer": i}
        for i in range(layers)
        for p, _, _ in PARAMS
    ]
    meta = new_meta(
        command=["synthetic"],
        status="complete",
        model_type="Net",
        modules=modules,
        parameters=params,
        steps=0,
        config={"preset": "standard", "schedule": {"dense": 10, "every": 25, "log": False}},
    )
    if structure:
        meta["structure"] = {"recognised": True, "notes": [], "blocks": blocks}
    return meta


def write_run(
    run_dir: Path,
    layers: int = 4,
    steps: Iterable[int] = range(12),
    metrics: Iterable[str] | None = None,
    names: dict[int, str] | None = None,
    status: str = "complete",
    part_rows: int = 2_000,
    findings: list[dict] | None = None,
    loss: Callable[[int], float] = loss_at,
) -> Path:
    """A run of ``layers`` blocks recorded at ``steps`` with every metric in ``VALUES``
    (or those in ``metrics``), parameter norms and updates, and loss and lr at every step
    from 0 to the last recorded one. ``names`` renames blocks (to test escaping)."""
    steps = list(steps)
    metrics = list(VALUES if metrics is None else metrics)
    names = names or {}
    meta = meta_for(layers, names)
    meta.update(status=status, steps=max(steps) + 1, recorded_steps=len(steps))
    save_meta(run_dir, meta)
    w = PartWriter(run_dir, part_rows=part_rows, flush_seconds=1e9)
    train = w.phases("train")
    recorded = set(steps)
    for s in range(max(steps) + 1):
        rows: list[tuple[str, str, int, float]] = [("__run__", "loss", -1, loss(s))]
        rows.append(("__run__", "lr", 0, 1e-3))
        rows.append(("__run__", "lr", 1, 1e-4))
        if s in recorded:
            rows.append(("__run__", "model_update", -1, 0.1 / (1 + s)))
            for i in range(layers):
                for metric in metrics:
                    pattern, f = VALUES[metric]
                    module = pattern.format(i=i)
                    if pattern == "blocks.{i}":
                        module = names.get(i, module)
                    for h in range(INDEXED.get(metric, 0)) or [-1]:
                        rows.append((module, metric, h, f(i, s, max(h, 0))))
                for p, norm, update in PARAMS:
                    rows.append((p.format(i=i), "param_norm", -1, norm * (i + 1)))
                    rows.append((p.format(i=i), "param_grad_norm", -1, norm * 1e-2 / (1 + s)))
                    rows.append((p.format(i=i), "update_norm", -1, update * (i + 1)))
        n = len(rows)
        w.append(
            np.full(n, s),
            np.full(n, train),
            np.array([w.modules(r[0]) for r in rows]),
            np.zeros(n),
            np.array([w.metrics(r[1]) for r in rows]),
            np.array([r[2] for r in rows]),
            np.array([r[3] for r in rows], np.float32),
        )
    w.flush()
    if findings is not None:
        (Path(run_dir) / "findings.json").write_text(json.dumps(findings))
    return Path(run_dir)


FINDINGS = [
    {
        "rule": "grad-growth",
        "severity": "warning",
        "module": "blocks.3",
        "step": 0,
        "value": 8.0,
        "threshold": 4.0,
        "message": "gradient rms grows 8x from the first layer to the last",
        "citation": "Xiong et al. 2020",
        "remedy": "use Pre-LN",
        "metric": "grad_rms",
    },
    {
        "rule": "info-note",
        "severity": "info",
        "module": None,
        "step": 5,
        "value": None,
        "threshold": None,
        "message": "an informational note",
        "citation": "",
        "remedy": "",
        "metric": "loss",
    },
    {
        "rule": "entropy-collapse",
        "severity": "error",
        "module": "blocks.1.attn",
        "step": 9,
        "value": 0.01,
        "threshold": 0.1,
        "message": "attention entropy collapsed",
        "citation": "Zhai et al. 2023",
        "remedy": "QK-norm",
        "metric": "attn_entropy",
    },
]
