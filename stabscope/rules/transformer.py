"""Rules the transformer-stability literature gives: attention logits and entropy, rank
collapse, residual dependency and DeepNorm's constants."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..analysis.summary import layer_param_grad_trends
from ..store.findings import Finding
from ..theory.deepnorm import deepnorm_constants
from . import residual_placement
from .base import Rule, RunView, finding, finding_at, graded
from .depth import GRAD_GROWTH
from .health import WORTSMAN
from .view import Request


def _finite(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a finite value: a NaN or Inf statistic is the nonfinite rule's error, and
    would otherwise win every max, ratio or threshold here."""
    return frame[np.isfinite(frame.value.to_numpy(float))]


def _attention_logits(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    logits = _finite(view.metrics("attn_logit_max"))
    if logits.empty:
        return
    row = logits.loc[logits.value.idxmax()]
    grade = graded(float(row.value), p)
    if grade is None:
        return
    severity, threshold = grade
    # The peak over the largest logit of the first recorded step: a figure the run keeps once
    # its peak is seen, whether read while it trains or after (the last step's would change).
    per_step = logits.groupby("step").value.max().sort_index()
    growth = ""
    first_step, first = int(per_step.index[0]), float(per_step.iloc[0])
    if int(row.step) > first_step and first > 0:
        growth = (
            f", x{row.value / first:.3g} over {int(row.step) - first_step} steps (from "
            f"{first:.3g}, the largest at step {first_step})"
        )
    yield finding_at(
        ATTN_LOGITS,
        severity,
        f"attention logit {row.value:.4g} in {row.module} head {int(row['index'])} at "
        f"step {int(row.step)}{growth}; runs past ~1e4 diverged",
        row,
        threshold=threshold,
        metric="attn_logit_max",
        remedy="qk-layernorm (normalise queries and keys), or a lower learning rate",
    )


ATTN_LOGITS = Rule(
    "attention-logit-growth",
    "Attention logit growth",
    WORTSMAN,
    ("attn_logit_max",),
    {"warning": 1e3, "error": 1e4},
    _attention_logits,
)

ZHAI = "Zhai et al. 2023, Stabilizing Transformer Training by Preventing Attention Entropy Collapse"


def _attention_entropy(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    ent = _finite(view.metrics("attn_entropy"))
    # Per module and head: the value at its last finite step against its first value.
    by_head = ent.sort_values("step").groupby(["module", "index"])
    first, last = by_head.value.first(), by_head.value.last()
    low = last[last < p["min_entropy"]]
    dropped = last[(first > 0) & (last < p["max_drop"] * first)]
    heads = low.index.union(dropped.index)
    if not len(heads):
        return
    (module, head) = min(heads, key=lambda k: last[k])
    last_step = int(by_head.step.last()[heads].max())
    yield finding(
        ATTN_ENTROPY,
        "warning",
        f"{len(heads)} attention heads collapsed by step {last_step}: lowest "
        f"normalised entropy {last[(module, head)]:.3g} ({module} head {int(head)}, "
        f"{first[(module, head)]:.3g} at the start)",
        module=str(module),
        step=last_step,
        value=float(last[(module, head)]),
        threshold=p["min_entropy"],
        metric="attn_entropy",
        remedy="σReparam or qk-layernorm on the attention logits, or a lower learning rate",
    )


ATTN_ENTROPY = Rule(
    "attention-entropy-collapse",
    "Attention entropy collapse",
    ZHAI,
    ("attn_entropy",),
    {"min_entropy": 0.1, "max_drop": 0.25},
    _attention_entropy,
    "warning",
)


def attention_unharmed(view: RunView) -> str | None:
    """Where the run recorded attention logits and none passed the logit rule's warning
    (1e3), what they reached, for a message; None where no attention was recorded or a logit
    passed it. A growing residual stream fails a transformer through its attention logits
    (Wortsman et al. 2023); Pre-LN blocks and QK-norm read the stream through norms, which
    absorb its scale, so growth with bounded logits is a symptom of large updates, not that
    failure. Entropy is not read: a head that learns to attend to one token is sharp in a
    healthy run too."""
    logits = _finite(view.metrics("attn_logit_max"))
    if logits.empty:
        return None
    largest = float(logits.value.max())
    if largest > ATTN_LOGITS.defaults["warning"]:
        return None
    return f"the attention it feeds keeps its logits bounded (largest {largest:.3g})"


KEDIA = "Kedia et al. 2024, Transformers get Stable: An End-to-End Signal Propagation Theory"


#: How a rank collapse present at step 0 that has not lasted as an error is told.
AT_INIT = "from the start (a risk at init: the failure forecast weighs it)"


def _rank_collapse(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    """Collapse at init is a risk, not a verdict: deep Post-LN models whose tokens are 0.999
    correlated at step 0 train well with a warm-up or at a lower lr, so it is a warning, and
    the failure forecast weighs it with the other signals (``init_token_corr``); one that
    never came apart (still above ``error`` at the latest step) is judged as a collapse
    that appeared, from the start. Collapse that appears during training is often a
    transient plateau (healthy runs at a high learning
    rate sit near 1 for a few steps, then recover), so it is an error only once it has lasted
    ``persist`` steps, and half the planned run where the budget is known (``_persist``), a
    warning before that; and only at the output block (the last block
    in forward order), whose tokens the head reads: an encoder that collapses while the
    decoder keeps its tokens apart trains (an encoder-decoder on a task the decoder can learn
    alone), and in a sequential stack a collapse anywhere reaches the last block. And only
    where the model's output keeps that block's positions (``Structure.output_positions``):
    the harm is every position's prediction becoming one; a pooled output (a classifier, a
    Perceiver's latents read as one) has no positions to lose, and a Perceiver whose 8
    latents became one vector learned anyway."""
    corr = _finite(view.metrics("token_corr"))
    if corr.empty:
        return
    # Per step, the most collapsed block among those with a finite correlation.
    by_step = corr.groupby("step").value.max().sort_index()
    first_step, last_step = int(by_step.index[0]), int(by_step.index[-1])
    out, out_note, pooled_note = None, "", False
    at_init = by_step.iloc[0] > p["error"]
    if at_init and not by_step.iloc[-1] > p["error"]:
        step, severity, threshold = first_step, "warning", p["error"]
        how = AT_INIT
    else:
        grade = graded(float(by_step.iloc[-1]), p)
        if grade is None:
            return
        severity, threshold = grade
        since = None
        if severity == "error":
            out = _output_block(view, corr)
            at_out = corr[corr.module == out].groupby("step").value.max().sort_index()
            since = _since_above(at_out, p["error"])
            pooled = view.structure is not None and view.structure.output_positions is False
            if since is None or last_step - since < _persist(view, p) or pooled:
                severity, threshold = "warning", p["warning"]
                if since is None:
                    out_note = f"; the output block {out} keeps them apart ({at_out.iloc[-1]:.3f})"
                elif pooled:
                    out_note = (
                        f"; the model's output keeps none of {out}'s positions (pooled): "
                        "no output collapses with them"
                    )
                    pooled_note = True
                out = None
        step = last_step
        how = f"since step {since}" if severity == "error" else f"at step {last_step}"
        if at_init and severity != "error":  # not lasted long enough yet: the init's risk
            step, threshold, out_note, pooled_note = first_step, p["error"], "", False
            how = AT_INIT
    rows = corr[corr.step == step]
    row = rows.loc[rows[rows.module == out].value.idxmax() if out else rows.value.idxmax()]
    collapsed = int((rows.value > p["warning"]).sum())
    carry = f"outputs of {collapsed} blocks carry" if collapsed > 1 else "output of 1 block carries"
    yield finding_at(
        RANK_COLLAPSE,
        severity,
        f"token correlation {row.value:.4f} at {row.module} {how}: the {carry} nearly the "
        "same vector at every "
        f"position (rank collapse; {by_step.iloc[0]:.3f} "
        f"at step {first_step}, {by_step.iloc[-1]:.3f} at step {last_step}){out_note}",
        row,
        threshold=threshold,
        metric="token_corr",
        remedy=POOLED_REMEDY if pooled_note else _collapse_remedy(view),
    )


#: A collapse of positions a pooled output does not keep: nothing to change for it.
POOLED_REMEDY = (
    "none for the collapse itself: the output pools the positions, so no prediction "
    "collapses with them; look further only if the loss stalls"
)


def _collapse_remedy(view: RunView) -> str:
    """Post-LN (or unknown) blocks: the placement and the branch scale are the levers
    (Kedia et al. 2024). Pre-LN blocks already keep the stream's tokens apart at init: a
    collapse there comes with training, the output falling back to one prediction for every
    position (the unigram), which a learning rate past what the model takes brings."""
    if residual_placement.all_pre_ln(view.structure):
        return (
            "lower the peak learning rate or lengthen the warm-up: every position predicting "
            "the same distribution is the unigram fallback a too-large step brings"
        )
    return (
        "use Pre-LN, or scale the residual branches (DeepScaleLM / DeepNorm init) so that "
        "depth does not wash out token differences"
    )


def _persist(view: RunView, p: dict[str, float]) -> float:
    """How many steps a collapse at the output block must last to be an error: ``persist``,
    or ``persist_share`` of the planned run where the budget is known. A healthy GPT-2 at a
    high lr sat at 0.99 for its first 100 of 300 steps and then learned: a plateau of a
    third of the run, which a fixed 50 steps would call a failure at step 51."""
    budget = view.meta.budget
    share = p["persist_share"] * budget if budget is not None else 0.0
    return max(p["persist"], share)


def _output_block(view: RunView, corr: pd.DataFrame) -> str:
    """Of the blocks with a token correlation, the last in forward order (meta.json's
    ``forward_order``, else the structure's block order, else the last name)."""
    names = sorted(corr.module.astype(str).unique())
    order: dict[str, int] = {
        m["name"]: int(m["forward_order"])
        for m in view.meta.modules
        if m.get("forward_order") is not None
    }
    known = {n: order[n] for n in names if n in order}
    if len(known) == len(names):
        return max(names, key=known.__getitem__)
    blocks = view.block_names
    if all(n in blocks for n in names):
        return max(names, key=blocks.index)
    return names[-1]


def _since_above(series: pd.Series, threshold: float) -> int | None:
    """The step since which ``series`` (indexed by step, in order) has stayed above
    ``threshold``; None when its last value is not above it."""
    if not len(series) or series.iloc[-1] <= threshold:
        return None
    below = series[series <= threshold]
    return int(series.index[0] if below.empty else series[series.index > below.index[-1]].index[0])


RANK_COLLAPSE = Rule(
    "rank-collapse",
    "Rank collapse",
    KEDIA,
    ("token_corr",),
    {"warning": 0.95, "error": 0.99, "persist": 50, "persist_share": 0.5},
    _rank_collapse,
)

ADMIN = "Liu et al. 2020, Understanding the Difficulty of Training Transformers (Admin)"


def _residual_dependency(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    beta = view.metrics("res_beta", step="first")
    step = int(beta.step.min())  # step 0 is init; later only if step 0 has no β
    rows = beta[beta.step == step].sort_values("index").groupby("module")
    # β_{i,i}: the weight of branch i's own output in the sum right after it (last index;
    # tail, not last(): a NaN β_ii must not be replaced by the β before it); row i holds
    # components 0..i+1, so i is the branch's position in its stack. Then the branches with
    # a finite β_ii: a NaN one is no evidence either way.
    own = rows.tail(1).set_index("module").value
    own = own[np.isfinite(own.to_numpy(float))]
    if len(own) < 2:
        return
    position = rows["index"].max().reindex(own.index) - 1
    placements = residual_placement.branch_placements(view.structure)
    placement = np.array([placements.get(m, "unknown") for m in own.index])
    judged = residual_placement.judged(placement, position.to_numpy(), p["beta_ii"])
    own = own[judged]
    is_heavy = own.to_numpy() > p["beta_ii"]
    n, heavy = len(own), int(is_heavy.sum())
    if n < 2 or heavy / n < p["share"]:
        return
    kinds = set(placement[judged][is_heavy])
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    meaning, remedy = residual_placement.explain(kind, view.structure)
    scope = ""
    if (placement == "pre").any():
        first = residual_placement.first_judged_pre_ln(p["beta_ii"])
        scope = (
            f" (Pre-LN: branches {first} and later of each stack)"
            if first
            else " (Pre-LN branches not judged)"
        )
    severity, threshold, starved = "warning", p["beta_ii"], ""
    if own.median() >= p["error_median"]:
        growth = _depth_growth(view)
        if growth is not None and growth[0] >= p["gradient_growth"]:
            severity, threshold = "error", p["error_median"]
            starved = (
                f"; with the skips carrying under {1 - p['error_median']:.0%} of the stream, "
                f"the gradient of the last layer is {growth[0]:.3g}x the first's by step "
                f"{growth[1]} (Xiong et al. 2020): the stack trains as one without residuals"
            )
    yield finding(
        RESIDUAL,
        severity,
        f"heavy dependency on the residual branch {residual_placement.when(step)}: β_ii > "
        f"{p['beta_ii']:g} in {heavy} of {n} branches{scope}, median {own.median():.3g}; "
        f"{meaning}{starved}",
        module=str(own.idxmax()),
        step=step,
        value=float(own.median()),
        threshold=threshold,
        metric="res_beta",
        remedy=remedy,
    )


def _depth_growth(view: RunView) -> tuple[float, int] | None:
    """The largest last-layer / first-layer parameter-gradient norm ratio over the steps
    seen and its step (``gradient-growth``'s measure), or None without one."""
    trends = layer_param_grad_trends(view.metrics("param_grad_norm"), view.meta)
    finite = [t for t in trends if np.isfinite(t.first_to_last)]
    if not finite:
        return None
    worst = max(finite, key=lambda t: t.first_to_last)
    return float(worst.first_to_last), worst.step


RESIDUAL = Rule(
    "residual-dependency",
    "Residual dependency",
    ADMIN,
    ("res_beta",),
    # error_median: the median β_ii at which the skips carry under a tenth of the stream;
    # an error only together with gradient-growth's warning-level depth ratio.
    {
        "beta_ii": 0.4,
        "share": 0.5,
        "error_median": 0.9,
        "gradient_growth": GRAD_GROWTH.defaults["warning"],
    },
    _residual_dependency,
    "error",
    (Request(("res_beta",), step="first"), Request(("param_grad_norm",))),
)

WANG = "Wang et al. 2022, DeepNet: Scaling Transformers to 1,000 Layers"


def deepnorm_alpha(n_encoder: int, n_decoder: int) -> dict[str, float]:
    """DeepNet's α per stack (the table lives in ``stabscope.theory.deepnorm``)."""
    return {stack: c.alpha for stack, c in deepnorm_constants(n_encoder, n_decoder).items()}


def _deepnorm(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    blocks = view.structure.blocks if view.structure else []
    deep = [b for b in blocks if b.placement == "deepnorm"]
    if not deep:
        return
    counts = {s: sum(b.stack == s for b in blocks) for s in ("encoder", "decoder", "")}
    enc, dec = counts["encoder"] or 0, counts["decoder"] + counts[""]
    expected = deepnorm_constants(enc, dec)
    for b in deep:
        constants = expected.get(b.stack, expected.get(""))
        if constants is None:  # a stack DeepNet gives no constants for
            continue
        want = constants.alpha
        if abs(b.alpha / want - 1) > p["tolerance"]:
            yield finding(
                DEEPNORM,
                "warning",
                f"{b.name} scales its residual by α={b.alpha:.4g}; DeepNet gives "
                f"α={want:.4g} for this depth",
                module=b.name,
                step=0,
                value=float(b.alpha),
                threshold=want,
                metric=None,
                remedy=f"use α={want:.4g} and β={constants.beta:.4g} (xavier_normal gain of "
                "the v, out and FFN weights)",
            )
            return


DEEPNORM = Rule(
    "deepnorm-constants", "DeepNorm constants", WANG, (), {"tolerance": 0.05}, _deepnorm, "warning"
)

RULES = [ATTN_LOGITS, ATTN_ENTROPY, RANK_COLLAPSE, RESIDUAL, DEEPNORM]
