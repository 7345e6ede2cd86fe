"""``failure-forecast``: one calibrated probability that the run fails by its planned end.

The signals (each scale-free, larger is worse) come from three sources: the look-ahead of
the stability index under the planned lr (``stability_features``), trends over the steps seen
so far (``forecast_features``), and risks at init (rank collapse). A monotone logistic model
fitted on a grid of healthy and failing runs of six model families (``forecast_model``)
combines them into p; the finding carries every signal with its share of the log-odds.

Severity: an error from p >= ``error`` (0.8), a warning from p >= ``warning`` (0.4), and an
info finding below that, so ``--format json`` always carries the score. The error needs strong
evidence: a CI gate that fails healthy runs gets switched off, and at 0.8 no healthy run of
the development grid fails at K = 10% (docs/forecast.md has the scores at 0.5 too). A run that
has already gone non-finite gets no forecast: it has failed, and ``nonfinite`` says where. The
expected failure step is the first planned step at which the stability index, scaled by the
planned lr, reaches 1 (when the run has a planned lr curve and that signal is among the
reasons).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from ..store.findings import Finding
from . import forecast_features, nonfinite, stability_features
from .base import Rule, RunView, finding
from .forecast_model import load_default
from .loss_divergence import MIN_WINDOW, loss_levels, loss_series, window
from .output_features import log_classes
from .residual_placement import all_pre_ln
from .trends import Feature
from .view import Request

COHEN = (
    "Cohen et al. 2021, Gradient Descent on Neural Networks Typically Occurs at the Edge of "
    "Stability; Cohen et al. 2022, Adaptive Gradient Methods at the Edge of Stability"
)

#: Per signal: what to do when it is the main reason.
REMEDIES = {
    "stability": "lower the peak learning rate (below the planned peak / the forecast index) "
    "or warm up longer, so the step stays under the edge of stability",
    "init_logit_scale": "initialise the output head small (or zero) so the first loss is near "
    "ln(classes); check the logit scaling",
    "attn_logit_growth": "qk-layernorm or σReparam on the attention logits, or a lower lr "
    "(Wortsman et al. 2023)",
    "entropy_drop": "qk-layernorm or σReparam on the attention logits, or a lower lr",
    "init_token_corr": "use Pre-LN, or scale the residual branches (DeepNorm / DeepScaleLM "
    "init) so depth does not wash out token differences",
}
DEFAULT_REMEDY = "lower the learning rate or lengthen the warm-up; clip gradients"
#: An info score: nothing to do.
NO_REMEDY = "none: the forecast is below the warning threshold"

#: What ``already_failed`` reads: the loss, and the non-finite flags with the steps that
#: stepped (``nonfinite.skipped_overflow_steps``).
FAILED_READS = (Request(("loss",)), Request((*nonfinite.FLAGS, "lr")))
READS = (
    *stability_features.READS,
    *forecast_features.READS,
    Request(("token_corr",), step="first"),
    *FAILED_READS,
)


def init_token_corr(view: RunView) -> Feature:
    """The most collapsed block's token correlation at the first step: a risk (a deep Post-LN
    model near 1 at init may still train), not a verdict."""
    name = "init_token_corr"
    if not view.has("token_corr"):
        return Feature(name, math.nan, "token correlation not recorded")
    corr = view.metrics("token_corr", step="first")
    corr = corr[np.isfinite(corr.value.to_numpy(float))]
    if corr.empty:
        return Feature(name, math.nan, "no finite token correlation")
    row = corr.loc[corr.value.idxmax()]
    # 1 - ρ on a log scale: 0.9 -> 1, 0.99 -> 2, 0.999 -> 3.
    value = -math.log10(max(1.0 - float(row.value), 1e-6))
    return Feature(
        name,
        value,
        f"token correlation {row.value:.4f} at {row.module} at step {int(row.step)}",
        int(row.step),
    )


def signals(view: RunView) -> dict[str, Feature]:
    """Every signal of the forecast for this run (NaN where it was not recorded), and the
    look-ahead's crossing step (``stability_features.CROSSING``, not a signal)."""
    found = {**stability_features.stability_features(view)}
    found.update(forecast_features.trend_features(view))
    found["init_token_corr"] = init_token_corr(view)
    answered = learned(view, REPAIRED)
    if answered is not None:
        # The loss already fell to about a uniform guess and under half its start: whatever
        # the init signals said, training repaired it (HF T5's own init starts at 10x ln V
        # and learns). They count as not recorded; the other signals still look ahead.
        for name in INIT_SIGNALS:
            if name in found:
                said = f"{found[name].evidence} (answered: {answered})"
                found[name] = replace(found[name], value=math.nan, evidence=said)
    return found


def crossing_step(features: dict[str, Feature]) -> int | None:
    """The first planned step at which the extrapolated index S_now x lr(s) / base reaches 1,
    ``base`` being the lr S was measured with (or, inside a warm-up, the warm-up's peak:
    ``stability_features.lr_growth_ahead``); None without an index, a plan or a crossing."""
    found = features.get(stability_features.CROSSING)
    return found.step if found is not None else None


#: ``init_token_corr``'s remedy where every block is Pre-LN already: depth is not what made
#: the tokens alike, and "use Pre-LN" would name what the model has.
PRE_LN_TOKEN_CORR = (
    "every block is Pre-LN already, so the tokens start alike from the input, not the depth: "
    "check the embedding's init scale against the terms every token shares (positions, "
    "biases), and the size of the first updates (a lower lr or a warm-up)"
)


def _remedy(name: str, view: RunView) -> str:
    if name.startswith("stability"):
        return REMEDIES["stability"]
    if name == "init_token_corr" and all_pre_ln(view.structure):
        return PRE_LN_TOKEN_CORR
    return REMEDIES.get(name, DEFAULT_REMEDY)


def already_failed(view: RunView) -> bool:
    """A non-finite loss, activation or gradient in the steps seen: the run has failed and the
    ``nonfinite`` rule says where; a forecast would only repeat it."""
    seen = [w.get("step") for w in view.meta.first_nonfinite.values()]
    if any(isinstance(s, int) and (view.until is None or s < view.until) for s in seen):
        # Gradients that overflowed only at steps the loss scaler skipped: no failure.
        return not nonfinite.skipped_overflow_steps(view)
    loss = view.metrics("loss").value.to_numpy(float)
    return bool(len(loss)) and not np.isfinite(loss).all()


#: The share of its starting loss a finished run must have shed to count as having learned.
LEARNED_SHARE = 0.5


def learned_by_the_end(view: RunView, budget: int | None, seen: int) -> str | None:
    """On a run that reached its planned end, the outcome overrides the forecast where the
    loss shows the model learned: why, or None. Learned: its last losses sit below a uniform
    guess over its outputs (ln V) and at most half its starting level (both as
    ``loss-divergence`` reads them). A forecast says "fails by the planned end"; once there,
    how the run ended is known, and the rules on the outcome (``loss-divergence``,
    ``nonfinite``, ``no-update``) judge it. Below ln V alone is too weak a bar: a model stuck
    at its data's unigram loss sits there too (a GRU seq2seq at 2.22 against ln 12 = 2.48,
    where its healthy twin reaches 0.53), and one that ends above ln V (a bad init whose loss
    fell from 1e3 to 20) still predicts worse than chance. Either keeps the forecast's
    error."""
    if budget is None or seen < budget:
        return None
    said = learned(view, own_classes=True)
    return f"{said}: the rules on the outcome judge it" if said else None


def learned(view: RunView, ceiling: float = 1.0, own_classes: bool = False) -> str | None:
    """Why the loss of the steps seen shows the model learned (``learned_by_the_end``): its
    last losses below ``ceiling`` x ln V and at most half its start; or None. With
    ``own_classes``, where no output head gives V, the classes of the cross-entropy itself
    (meta.json ``loss_classes``, read from the loss's graph) do: a head applied by function,
    ``F.linear(x, wte.weight)``, is no module, and a uniform guess over the loss's N classes
    costs ln N wherever its logits came from. Read so, the start counts as at most ln N: no
    head's logits at the first step say that the init was sane, and a loss that fell from 31
    to 3.6 against ln 64 = 4.16 (LayerNorm gains of 100: blind trial 46) has shed a bad
    init's excess, not learned."""
    classes = log_classes(view)
    count = view.meta.doc.get("loss_classes")
    by_loss = not isinstance(classes, tuple) and own_classes
    if by_loss and isinstance(count, int) and count > 1:
        classes = (math.log(count), f"ln N = {math.log(count):.3g}, the loss's {count} classes")
    if not isinstance(classes, tuple):
        return None  # no ln V: nothing to read the loss against
    loss = loss_series(view)
    if not np.isfinite(loss.to_numpy(float)[-window(len(loss)) :]).all():
        return None
    loss = loss[np.isfinite(loss.to_numpy(float))]
    if len(loss) < 2 * MIN_WINDOW:  # a start and an end level that share no loss
        return None
    start, _, _, level, _ = loss_levels(loss, MIN_WINDOW)
    ln_v, where = classes
    if by_loss:
        start = min(start, ln_v)
    if level >= ceiling * ln_v or level > LEARNED_SHARE * start:
        return None
    bar = "below a uniform guess" if ceiling == 1 else f"under {ceiling:g}x a uniform guess"
    return f"its loss ends at {level:.3g}, {bar} ({where}) and under half its start ({start:.3g})"


#: Signals of the model at its first steps: the output's scale and loss against a uniform
#: guess, and token correlation. They forecast a bad init that training cannot repair.
INIT_SIGNALS = ("init_logit_scale", "init_loss_ratio", "init_token_corr")
#: A loss under this many times ln V, and under half its start, has shed an init's excess:
#: the grid's unrepaired bad inits sit at 12-112x ln V at 10% of their runs.
REPAIRED = 1.5


#: While the run trains, the forecast speaks between these shares of a known budget: the
#: horizons the development grid scored it at, 10% and 25% (gate precision 0.99 and 0.98
#: pooled; docs/forecast.md). Not before: a model's own init (HF T5's first loss is 10x
#: ln V) reads as a bad init until its first steps repair it. Not after: at 50-90% the same
#: gate's precision falls to 0.95-0.96 while the rules alone keep 1.00, and a check every few
#: seconds over the rest of a run would give each healthy run many chances to be stopped
#: (``--on-error stop``) on one of them; the rules on what the run shows act there.
ONLINE_FROM, ONLINE_UNTIL = 0.10, 0.25


def not_online_now(view: RunView) -> bool:
    """Whether a run still training is outside the forecast's window (``ONLINE_FROM`` to
    ``ONLINE_UNTIL`` of its budget; always, without a budget): it gives no forecast now. A
    run no longer training is judged at every step of a known budget (``check``, and a
    replay with ``until``); without a budget only at its end, since a replay inside such a
    run would know where it ends only in hindsight, which its live judge did not."""
    budget = view.meta.budget
    seen = view.until if view.until is not None else view.meta.steps
    if view.meta.status != "running":
        return budget is None and seen < view.meta.steps
    return budget is None or not ONLINE_FROM * budget <= seen < ONLINE_UNTIL * budget


def score_view(view: RunView) -> tuple[float, dict[str, Feature], list[tuple[str, float]]]:
    """(p, the signals, each signal's share of the log-odds, largest first) on ``view``."""
    model = load_default()
    features = signals(view)
    values = {k: f.value for k, f in features.items()}
    shares = sorted(model.contributions(values).items(), key=lambda kv: -kv[1])
    return model.probability(values), features, shares


def window_score(
    view: RunView, budget: int
) -> tuple[int, tuple[float, dict[str, Feature], list[tuple[str, float]]]] | None:
    """On a run judged at its planned end: the forecast at the window's cuts (the first
    ``ONLINE_FROM`` and ``ONLINE_UNTIL`` of ``budget``, where the grid validated it and
    where the live judge gave it), the higher of the two with its cut; None where neither
    could be read (a run non-finite by then). The end's own score reads a run past the
    window: a collapsed model's signals fade as it sits still (a ViT at lr 5e-2 went from
    0.96 at 10% to 0.78 at its end, stuck at 1.82 against a twin's 0.31), and the verdict
    on the whole run would then take back the error its live judge gave."""
    best = None
    for share in (ONLINE_FROM, ONLINE_UNTIL):
        cut = math.ceil(share * budget)
        if cut < 1:
            continue
        early = RunView.open(view.run_dir, until=cut, memory=view.memory)
        early.plan(FORECAST.reads)
        if already_failed(early):
            continue
        scored = score_view(early)
        if best is None or scored[0] > best[1][0]:
            best = (cut, scored)
    return best


def band(prob: float, p: dict[str, float]) -> int:
    """2 from ``p["error"]``, 1 from ``p["warning"]``, else 0."""
    return 2 if prob >= p["error"] else int(prob >= p["warning"])


def _forecast(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    if not_online_now(view) or already_failed(view):
        return
    prob, features, shares = score_view(view)
    # The budget where one was given, else the last step of a script that ran to its end.
    budget = view.meta.planned_end
    seen = view.until if view.until is not None else view.meta.steps
    said_at = None  # the window's cut whose score is reported, where it says more
    if budget is not None and seen >= budget and not view.meta.phase_start:
        window = window_score(view, budget)
        # Only where it reaches a severity the end's does not: else the end's, which speaks
        # of the whole run.
        if window is not None and band(window[1][0], p) > band(prob, p):
            said_at, (prob, features, shares) = window
    evidence = tuple(
        {
            "signal": name,
            "value": features[name].value if name in features else None,
            "contribution": round(share, 4),
            "evidence": features[name].evidence if name in features else "",
        }
        for name, share in shares
    )
    reasons = [name for name, share in shares if share > 0.5][:3]  # a clear share of the log-odds
    end = f"the planned end (step {budget})" if budget else "the end of training"
    severity = ("info", "warning", "error")[band(prob, p)]
    threshold = p["error"] if severity == "error" else p["warning"]
    said = "; ".join(features[r].evidence for r in reasons if r in features)
    message = f"fails by {end} with probability {prob:.2f}" + (f": {said}" if said else "")
    if severity != "info" and budget is not None and seen >= budget:
        # Read at the end, the forecast is no look-ahead: it says the run has a failing
        # run's signals (the rules on the outcome say how it ended).
        message = f"the run reached {end} with the signals of a failing run (probability "
        message += f"{prob:.2f})" + (f": {said}" if said else "")
        if said_at is not None:
            message = (
                f"the run reached {end}; by step {said_at} ({said_at / budget:.0%} of it, "
                f"where the forecast is judged while it trains) it had the signals of a "
                f"failing run (probability {prob:.2f})" + (f": {said}" if said else "")
            )
    if severity == "info" and budget is not None and seen >= budget:
        # Past its end a low score is no news about the run: how it ended is (the rules on
        # the outcome judge it), and "fails with probability 0.03" next to a loss-divergence
        # error would read as a contradiction.
        message = (
            f"the run reached {end}: the forecast of a failure before it ({prob:.2f}) no "
            "longer applies; the rules on the outcome judge how it ended"
        )
    outcome = learned_by_the_end(view, budget, seen)
    if severity == "error" and outcome is not None:
        severity, threshold = "warning", p["warning"]
        message += f"; but the run reached its planned end and {outcome}"
    lookahead = any(r.startswith("stability") for r in reasons) and severity != "info"
    crossing = crossing_step(features) if lookahead else None
    if crossing is not None:
        message += f"; expected to fail near step {crossing}, where the planned lr takes the "
        message += "stability index past 1"
        evidence += (
            {
                "signal": "expected_failure_step",
                "value": crossing,
                "contribution": None,  # not a signal: when the look-ahead says it fails
                "evidence": f"the planned lr takes the stability index past 1 at step {crossing}",
            },
        )
    yield finding(
        FORECAST,
        severity,
        message,
        module="__run__",
        step=max((seen if said_at is None else said_at) - 1, 0),  # the last step it read
        value=prob,
        threshold=threshold,
        metric="failure_probability",
        # A low score asks nothing of the user: the remedy of its strongest signal would
        # read as advice (an output-head init for a normalising flow's 0.04).
        remedy=NO_REMEDY
        if severity == "info"
        else (_remedy(reasons[0], view) if reasons else DEFAULT_REMEDY),
        evidence=evidence,
    )


FORECAST = Rule(
    "failure-forecast",
    "Failure forecast",
    COHEN,
    ("loss",),
    {"error": 0.8, "warning": 0.4},
    _forecast,
    reads=READS,
    # A probability of failing by the planned end: while the run trains, at 10-25% of a
    # known budget (``not_online_now``), so `--on-error stop` ends a run the gate fails there.
    online=True,
)

RULES = [FORECAST]
