"""THE catalogue of metrics: every name a run's rows can carry, and what the read side needs
to know about it. No torch.

One ``Metric`` per name: what it means and its unit, what it is recorded on (``kind``: a
module, a parameter or the whole run), which probe writes it (a name of the probe registry,
``stabscope.probes.PROBES``) and from which preset up (``tier``), how the ranks of a
multi-process run merge into one value (``ranks``; ``shards`` for a run whose parameters are
sharded), which end of its range signals trouble (``worse``), and where the report and the
terminal summary show it (``heatmap``: the report section that draws its layer x step
heatmap; ``headline``: the label of its extreme in the summary). The rank merge
(``store/ranks.py``), the report's heatmaps and colour scales (``report/data.py``, the
sections) and the summary's headlines read this table; docs/probes.md lists every entry
(a test keeps the two in step).

Adding a metric = one entry here. A name that is not here (a run written by a newer version,
a user's own rows) still merges and reads: ``reduction`` says how (``UNKNOWN_MERGE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["module", "param", "run"]
#: How the ranks' rows of one (step, module, call, index) merge: rank 0 stands for all
#: (every replica holds the same value), the mean, the extremes, the sum, or the
#: root-sum-square (norms of shards, whose squares add up to the full tensor's).
Merge = Literal["rank0", "mean", "max", "min", "sum", "rss"]
Worse = Literal["higher", "lower", "none"]

#: Presets, cheapest first (``record/config.py`` describes each); ``amplification`` marks
#: the rows of the ``stabscope amplification`` command, which records no training run.
TIERS = ("cheap", "standard", "full", "amplification")


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    unit: str
    kind: Kind
    probe: str  # the registry name of the probe (or driver) that writes it
    tier: str  # the cheapest preset that records it, one of TIERS
    ranks: Merge = "mean"  # merge of the ranks of a replicated (DDP) or single-device run
    shards: Merge | None = None  # merge of the ranks of a sharded (FSDP) run; None: as ranks
    worse: Worse = "higher"
    heatmap: str | None = None  # the report section with its layer x step heatmap
    headline: str | None = None  # the summary's label of its worst value over the run

    def merge(self, sharded: bool = False) -> Merge:
        return self.shards if sharded and self.shards is not None else self.ranks


# fmt: off
# One entry per metric; positional: name, meaning, unit, kind, probe, tier.
METRICS: tuple[Metric, ...] = (
    # The recorder's own rows (module __run__).
    Metric("loss", "the step's loss, every step, recorded or not",
           "the loss's own (nats for cross-entropy)", "run", "recorder", "cheap"),
    Metric("loss_constant", "the loss a constant prediction (the targets' batch mean) scores on "
           "the step's own targets, for a loss that is one mse_loss, binary cross-entropy or "
           "cross-entropy "
           "(stabscope profile, every step)", "the loss's own", "run", "recorder", "cheap",
           worse="none"),
    Metric("target_count", "how many target values the step's loss_constant read (its calls "
           "together): an mse_loss's, or a binary cross-entropy's with one label",
           "values", "run", "recorder", "cheap", worse="none"),
    Metric("target_mean", "the mean of those targets (a binary label's rate): from it the "
           "rules pool the constant over a window of steps", "the targets' own", "run",
           "recorder", "cheap", worse="none"),
    Metric("target_var", "the variance of those targets (Bessel-corrected)",
           "the targets' own, squared", "run", "recorder", "cheap", worse="none"),
    Metric("lr", "the lr a param group's optimizer.step() used (index = group)", "learning rate",
           "run", "recorder", "cheap", ranks="rank0", worse="none"),
    # Every step (record/step_norms.py). DDP replicas share the averaged gradient (rank 0
    # stands for all); a sharded run records each rank's shard (rss).
    Metric("grad_norm", "global L2 gradient norm before clipping (the clip's own total where "
           "the script clips), every step", "loss per weight unit", "run", "recorder", "cheap",
           ranks="rank0", shards="rss"),
    Metric("grad_norm_clipped", "global L2 norm of the gradients optimizer.step() received, "
           "after the script's clip; steps with a clip only", "loss per weight unit", "run",
           "recorder", "cheap", ranks="rank0", shards="rss"),
    Metric("grad_not_zeroed", "1.0 at a step whose optimizer step received gradients never "
           "zeroed since the step before (no zero_grad in the loop); absent otherwise", "flag",
           "run", "recorder", "cheap", ranks="max"),
    Metric("block_param_norm", "||θ|| of a residual block's parameters before optimizer.step(), "
           "every step_updates_every-th step and every recorded one", "weight units", "module",
           "recorder", "cheap", ranks="rank0", shards="rss", worse="none"),
    Metric("block_update_norm", "||Δθ|| of a residual block's parameters across "
           "optimizer.step(), every step_updates_every-th step and every recorded one",
           "weight units", "module", "recorder", "cheap", ranks="rank0", shards="rss"),
    Metric("block_update_ratio", "block_update_norm / block_param_norm, at the same steps",
           "ratio",
           "module", "recorder", "cheap", ranks="rank0", shards="max"),
    # Module outputs and the gradients w.r.t. them (probes/activations.py).
    Metric("act_mean", "mean of the module's output", "output units", "module", "activations",
           "cheap"),
    Metric("grad_mean", "mean of the gradient w.r.t. the module's output", "loss per output unit",
           "module", "activations", "standard"),
    Metric("act_rms", "rms of the module's output", "output units", "module", "activations",
           "cheap", heatmap="heatmaps"),
    Metric("grad_rms", "rms of the gradient w.r.t. the module's output", "loss per output unit",
           "module", "activations", "standard", heatmap="heatmaps"),
    Metric("act_absmax", "largest |x| of the module's output", "output units", "module",
           "activations", "cheap", ranks="max", heatmap="heatmaps"),
    Metric("grad_absmax", "largest |x| of the gradient w.r.t. the output", "loss per output unit",
           "module", "activations", "standard", ranks="max", heatmap="heatmaps"),
    Metric("act_nonfinite", "the module's output held a NaN or Inf", "flag 0/1", "module",
           "activations", "cheap", ranks="max"),
    Metric("grad_nonfinite", "the gradient w.r.t. the output held a NaN or Inf", "flag 0/1",
           "module", "activations", "standard", ranks="max"),
    Metric("first_nonfinite_forward", "the first module with a NaN/Inf output, forward order",
           "marker, 1.0", "module", "activations", "cheap", ranks="max"),
    Metric("first_nonfinite_backward", "the first module with a NaN/Inf gradient, backward order",
           "marker, 1.0", "module", "activations", "standard", ranks="max"),
    # Every step, recorded or not: blocks, stem and head (probes/flight.py).
    Metric("flight_act_rms", "rms of a block's (stem's, head's) output, every step",
           "output units", "module", "flight", "cheap"),
    Metric("flight_act_absmax", "largest |x| of a block's (stem's, head's) output, every step",
           "output units", "module", "flight", "cheap", ranks="max"),
    Metric("flight_act_nonfinite", "a block's (stem's, head's) output held a NaN or Inf, every "
           "step", "flag 0/1", "module", "flight", "cheap", ranks="max"),
    Metric("flight_grad_rms", "rms of the gradient w.r.t. a block's output, every step",
           "loss per output unit", "module", "flight", "cheap"),
    Metric("flight_grad_absmax", "largest |x| of the gradient w.r.t. a block's output, every "
           "step", "loss per output unit", "module", "flight", "cheap", ranks="max"),
    Metric("flight_grad_nonfinite", "the gradient w.r.t. a block's output held a NaN or Inf, "
           "every step", "flag 0/1", "module", "flight", "cheap", ranks="max"),
    # Parameters (probes/parameters.py): every DDP replica holds the same, so rank 0 stands
    # for all; a sharded run records each rank's shard, whose squares add up (rss).
    Metric("param_norm", "L2 norm of the weight before the optimizer step", "weight units", "param",
           "parameters", "cheap", ranks="rank0", shards="rss", heatmap="heatmaps"),
    Metric("param_rms", "rms of the weight before the optimizer step", "weight units", "param",
           "parameters", "cheap", ranks="rank0", shards="rss"),
    Metric("param_grad_norm", "L2 norm of the weight's gradient", "loss per weight unit", "param",
           "parameters", "cheap", ranks="rank0", shards="rss", heatmap="heatmaps"),
    Metric("param_grad_rms", "rms of the weight's gradient", "loss per weight unit", "param",
           "parameters", "cheap", ranks="rank0", shards="rss"),
    Metric("update_norm", "||Δθ|| across optimizer.step()", "weight units", "param", "parameters",
           "standard", ranks="rank0", shards="rss"),
    # A sharded run's ratio is recomputed from the merged norms where both are read (ranks.py).
    Metric("update_ratio", "||Δθ||/||θ|| across optimizer.step(), θ before it", "ratio", "param",
           "parameters", "standard", ranks="rank0", shards="max", heatmap="updates"),
    Metric("param_mean", "mean of the weight (a shard: its sum over the full count)",
           "weight units", "param", "parameters", "full", ranks="rank0", shards="sum"),
    Metric("param_absmax", "largest |x| of the weight", "weight units", "param", "parameters",
           "full", ranks="rank0", shards="max"),
    Metric("param_nonfinite", "the weight held a NaN or Inf", "flag 0/1", "param", "parameters",
           "full", ranks="rank0", shards="max"),
    Metric("param_grad_mean", "mean of the weight's gradient", "loss per weight unit", "param",
           "parameters", "full", ranks="rank0", shards="sum"),
    Metric("param_grad_absmax", "largest |x| of the weight's gradient", "loss per weight unit",
           "param", "parameters", "full", ranks="rank0", shards="max"),
    Metric("param_grad_nonfinite", "the weight's gradient held a NaN or Inf", "flag 0/1", "param",
           "parameters", "full", ranks="rank0", shards="max"),
    # The transformer probes (probes/structured.py builds them once the structure is known).
    Metric("attn_entropy", "entropy of the sampled queries' attention / log(keys), per head",
           "normalised, in [0, 1]", "module", "attention", "standard", worse="lower",
           heatmap="attention", headline="lowest attention entropy (normalised)"),
    Metric("attn_logit_max", "largest |q·k|·scale, sampled queries, keys with weight; per head",
           "attention logit", "module", "attention", "standard", ranks="max", heatmap="attention",
           headline="largest attention logit"),
    Metric("res_ratio", "rms(f)/rms(x) of a residual branch per token, averaged", "ratio", "module",
           "residual", "standard", heatmap="residual"),
    Metric("res_dependency", "the branch's share of the variance, Var f / (α²·Var x + Var f)",
           "share in [0, 1]", "module", "residual", "standard", heatmap="residual",
           headline="largest residual dependency Var f / (Var x + Var f)"),
    Metric("res_corr", "Corr[x, f]: the branch against the stream it joins",
           "correlation in [-1, 1]", "module", "residual", "standard", worse="lower",
           heatmap="residual"),
    Metric("res_omega", "Admin's ω of a Post-LN or DeepNorm branch", "scale relative to ω₁ = 1",
           "module", "residual", "standard", heatmap="residual"),
    Metric("res_beta", "β_{i,j}: weight of component j in the stream after branch i",
           "weight, Σ_j β² = 1", "module", "residual", "standard", worse="none"),
    Metric("norm_input_rms", "rms of a normalisation layer's input", "input units", "module",
           "norm_inputs", "standard", heatmap="heatmaps", headline="largest norm-input rms"),
    Metric("token_corr", "mean correlation between token vectors at a block's output",
           "correlation, 1 = collapse", "module", "correlation", "standard", heatmap="heatmaps",
           headline="largest token correlation"),
    Metric("block_in_rms", "rms of a residual block's input, the stream entering it",
           "stream units", "module", "block_input", "standard"),
    Metric("logit_lse_mean", "mean log Z (logsumexp) of the output logits", "nats", "module",
           "logits", "standard"),
    Metric("logit_max", "largest output logit", "logit units", "module", "logits", "standard",
           ranks="max"),
    Metric("logit_min", "smallest output logit", "logit units", "module", "logits", "standard",
           ranks="min", worse="lower"),
    Metric("pred_entropy", "mean entropy of each position's output softmax, H(p_i)", "nats",
           "module", "logits", "standard", worse="none"),
    Metric("pred_marginal_entropy", "entropy of the output softmax averaged over positions, "
           "H(p̄); minus pred_entropy: what the prediction says about the input", "nats",
           "module", "logits", "standard", worse="none"),
    Metric("adam_sqrtv_over_eps", "rms of sqrt(v̂) over Adam's eps; near 1 eps damps the update",
           "ratio", "param", "adam", "standard", ranks="rank0", shards="rss", worse="lower",
           heatmap="updates"),
    Metric("model_update", "||F(x, θ_t) − F(x, θ_0)|| on a probe batch", "output units", "run",
           "model_update", "full", ranks="rank0", headline="largest model update ||F_t - F_0||"),
    Metric("model_update_rel", "model_update over ||F(x, θ_0)||", "ratio", "run", "model_update",
           "full", ranks="rank0"),
    Metric("stability_index", "λ_max of the preconditioned Hessian over the stability threshold",
           "multiples of the threshold", "run", "sharpness", "standard"),
    Metric("probe_loss", "the probe batch's loss, one forward in eval mode on the same batch "
           "at steps 2, 4, 8, ... and at the end: moves only as the model does, never with "
           "the data", "the loss's own", "run", "sharpness", "standard", worse="none"),
    Metric("stability_lr", "the largest group lr the stability index used", "learning rate", "run",
           "sharpness", "standard", worse="none"),
    # Rows of `stabscope amplification` (index = depth), not of a training run.
    Metric("amplification", "mean squared output change under a δ weight perturbation",
           "squared output units", "run", "amplification", "amplification"),
    Metric("amplification_std", "its standard deviation over the seeds", "squared output units",
           "run", "amplification", "amplification", worse="none"),
)
# fmt: on

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

#: The merge of a name that is not in the catalogue: each rank's value is kept in the merge
#: (never rank 0 alone), as the max for names that read as extremes or flags
#: (``*_max``, ``*_absmax``, ``*_nonfinite``, ``first_nonfinite_*``), the min for ``*_min``,
#: else the mean; a NaN on any rank survives each of them.
UNKNOWN_MERGE = "the ranks' max for *_max/_absmax/_nonfinite, min for *_min, else mean"


def reduction(name: str, sharded: bool = False) -> Merge:
    """How the ranks' rows of ``name`` merge (``store/ranks.py``)."""
    metric = BY_NAME.get(name)
    if metric is not None:
        return metric.merge(sharded)
    if name.endswith(("_absmax", "_max", "_nonfinite")) or name.startswith("first_nonfinite"):
        return "max"
    return "min" if name.endswith("_min") else "mean"


def worse_end(name: str) -> Worse:
    """Which end of ``name``'s range signals trouble; ``higher`` for a name not catalogued."""
    metric = BY_NAME.get(name)
    return metric.worse if metric is not None else "higher"


def heatmap_keys(section: str) -> tuple[str, ...]:
    """The metrics whose heatmap the report ``section`` draws, in catalogue order."""
    return tuple(m.name for m in METRICS if m.heatmap == section)


def headlines() -> dict[str, str]:
    """Metric -> the summary's label of its worst value over the run, in catalogue order."""
    return {m.name: m.headline for m in METRICS if m.headline is not None}


__all__ = [
    "BY_NAME",
    "METRICS",
    "TIERS",
    "UNKNOWN_MERGE",
    "Metric",
    "headlines",
    "heatmap_keys",
    "reduction",
    "worse_end",
]
