"""Rule ``residual-stream-growth``: the residual stream's rms growing by orders of magnitude.

Per place the stream is seen (a residual block's output, a norm's input; the same places as
the failure forecast's ``residual_growth`` signal, ``forecast_features``; a block's output
at every step where the every-step tier recorded it), the ratio of its rms at the latest
step with a finite value to its rms at the first step, or to 1 when it started below 1
(``UNIT_RMS``). The worst place is graded: a warning above
100 (two orders of magnitude), an error above 1000 (three).

Why a floor of 1: the unit is the scale a norm hands on (LayerNorm and RMSNorm outputs have
rms 1 before their gain) and the scale of standardised inputs. A stream that starts far below
it grows to it as the model learns, which no norm or softmax feels: GPT-2 and LLaMA
initialisations (``initializer_range`` 0.02) give embeddings of rms ~0.03, and a healthy
GPT-2-style model at a high learning rate grows x2,000 from there to rms ~70. Measured
without the floor, that run was an error; with it, x73.

Why those thresholds: a healthy run's stream grows a little (the sample GPT's Pre-LN norm
inputs x2.1 over 100 steps; a 4-block sample GPT at lr 3e-2, AdamW, x28 by step 125), while a
stream that gains three orders of magnitude has left the range where the norms and the
softmax behave (their Jacobians scale like 1/||x||, logits like ||x||², Xiong et al. 2020;
Wortsman et al. 2023 reproduce the resulting logit divergence at small scale). A nanoGPT run
at lr 3e-2 reached x16,000 at ``transformer.h.3`` before it diverged.

Growth past the error threshold is an error only where the attention it feeds shows the
failure it leads to, logits past the logit rule's warning of 1e3 (Wortsman et al. 2023), or
where the model records no attention. Where the logits stay bounded it is a warning that says
so: Pre-LN blocks and QK-norm read the stream through norms, which absorb its scale. Measured
on a 2-layer byte-level Pre-LN model with QK-norm at AdamW lr 0.1: the stream grew x4,000 in
29 steps with its largest attention logit at 5.6, and the run trained (final loss 0.81 of the
unigram baseline); a Qwen3-style model with QK-norm at lr 0.2, x4.7e5 with logits at most
30.7, trained too (0.80), while its twin without QK-norm reached logits of 4.5e4 and did not.

Non-finite rows are left out (the ``nonfinite`` rule reports them); a run without residual
blocks is not judged (its module outputs have no stream to grow).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..store.findings import Finding
from .base import Rule, RunView, finding, graded
from .forecast_features import UNIT_RMS, residual_stream
from .health import WORTSMAN
from .transformer import attention_unharmed
from .trends import ends
from .view import Request

#: The every-step tier's block rms (``flight_act_rms``) has the scheduled ``act_rms``'s
#: definition: with it the stream is read at every step, not only the recorded ones.
METRICS = ("act_rms", "norm_input_rms", "flight_act_rms")
#: Read as well: growth past the error threshold is an error only where the attention it
#: feeds shows the failure, logits past 1e3 (``transformer.attention_unharmed``).
ATTENTION = ("attn_logit_max",)


def _residual_stream_growth(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    stream = residual_stream(view)
    if stream is None:
        return
    frame, what = stream
    every_step = view.metrics("flight_act_rms")
    every_step = every_step[every_step.module.isin(view.block_names)]
    if not every_step.empty:
        frame = pd.concat([frame, every_step])
    frame = frame[np.isfinite(frame.value.to_numpy(float))]
    # One value per place and step (the first call: the stream as the block hands it on).
    per_step = frame[frame.call == 0].groupby(["module", "step"]).value.first()
    growth = ends(per_step.rename_axis(["key", "step"]).reset_index(), floor=UNIT_RMS)
    if growth.empty:
        return
    worst = growth["log"].idxmax()
    e = growth.loc[worst]
    factor = float(10 ** e["log"])
    grade = graded(factor, p)
    if grade is None:
        return
    severity, threshold = grade
    spread = attention_unharmed(view) if severity == "error" else None
    if spread is not None:  # the failure's mechanism is not at work: a warning
        severity, threshold = "warning", p["warning"]
    below = f", measured from rms {UNIT_RMS:g}" if e["first"] < UNIT_RMS else ""
    grown = growth[growth["log"] > np.log10(p["warning"])]
    yield finding(
        RESIDUAL_STREAM_GROWTH,
        severity,
        f"the {what} at {worst} grew x{factor:.3g} from step {int(e['from'])} to "
        f"{int(e['to'])} ({e['first']:.3g} -> {e['last']:.3g}{below}); {len(grown)} of "
        f"{len(growth)} places grew more than x{p['warning']:g}"
        + (f"; {spread}: a warning" if spread else ""),
        module=str(worst),
        step=int(e["to"]),
        value=factor,
        threshold=threshold,
        metric=str(frame[frame.module == worst].metric.iloc[0]),
        remedy="lower the peak learning rate or add warm-up; weight decay, QK-layernorm and "
        "a z-loss keep activations and logits bounded (Wortsman et al. 2023)",
    )


RESIDUAL_STREAM_GROWTH = Rule(
    "residual-stream-growth",
    "Residual stream growing by orders of magnitude",
    WORTSMAN,
    METRICS,
    {"warning": 100.0, "error": 1000.0},
    _residual_stream_growth,
    reads=(Request(METRICS + ATTENTION),),
)

RULES = [RESIDUAL_STREAM_GROWTH]
