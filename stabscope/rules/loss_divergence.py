"""Rule ``loss-divergence``: the run un-learned what it had learned, without a NaN.

On the loss of every step (finite values only; a NaN/Inf is the ``nonfinite`` rule's):

- ``start``: the median of the first ``w`` losses, ``w = max(min_window, n // 20)`` for ``n``
  finite losses, so that a noisy mini-batch loss is read as its level, not its draws; or the
  first loss, when it is lower (a run that diverges from its first update);
- ``best``: the lowest median over ``w`` consecutive losses;
- ``end``: the median of the last ``w`` losses.

An error in three cases:

- it learned and gave it back: the loss fell by at least ``min_gain`` (10%) of its start,
  ``start - best >= min_gain * |start|``, then rose back by at least ``give_back`` (half) of
  what it had gained, ``end - best >= give_back * (start - best)``, and by at least
  ``min_rise`` (20%) of its best level, ``end - best >= min_rise * |best|``;
- it ends worse than it started: ``end - start >= above_start * |start|`` (50% above), with
  or without learning first (a run that diverges at once; a fine-tune from a converged
  model that a too-high learning rate throws off);
- it jumped and did not come back: a loss spike (``loss-spike``'s reading, z 6 over the 64
  losses before it) at least ``recover_steps`` (50) steps before the end, and an ``end`` at
  least ``min_rise`` (20%) above the level of the ``w`` losses before the spike. A spike
  that healthy training recovers from (a corrupt batch) is back within a few dozen steps;
  one it does not is damage the run keeps: a warm restart far above the peak, a shard
  tokenised otherwise (blind trial 40: a PatchTST whose loss jumped 11x at step 261 and
  ended at 2x its level before it; a NeoX at 1.26x; each had given back a third of its
  gain or less, so the first case did not see it). Over the stored runs with a truth (the
  grid and ten blind trials), judged every 10 steps from 50 steps after each spike, no
  healthy run's level passed 1.06x its level before a spike.

The rise back from the best (or from the level before the jump) must also stand out of the
loss's own noise: at least ``min_z`` (3) times the standard deviation that noise alone gives
a difference of two levels, plus
what picking the lowest of k levels lowers the best by chance. Read in log space when the
losses are all positive: a batch loss that is a sum of squares is skewed far to the right
(a few batches at 4x the level), and a loss that diverges wobbles in proportion to its
level, so its logs have one spread before and after it turns.

- ``level_noise``: σ of one loss from the median second difference of all the losses (a
  linear trend does not move it); a median of ``w`` draws has 1.2533·σ/√w, a difference of
  two √2 that. Medians of a few skewed draws spread more than that formula says, so where
  there are 6 disjoint levels or more the spread of their own second differences (robust:
  an lr jump or the end of a warm-up bends the trend at one point) is taken where larger.
- ``selection``: √(ln k) of those deviations for the k disjoint levels up to the best (the
  expected minimum of k Gaussian draws lies about σ·√(2 ln k) below their mean).
- A start that is the first loss alone (lower than the median of the first ``w``) is one
  draw: its own σ joins the level's.

``python bench/divergence_noise.py --seeds 100 --steps 200 --every 10`` (an MLP regression
on batches of 4 under SGD with momentum, judged after every 10th step as the online checks
judge it): with σ in linear units from the losses before the best and none of the three
terms, 40 of 100 healthy seeds were called diverged at some cut; now 5. The same regression
at 5x the lr diverges and is caught in 100 of 100 either way, its median first cut step 40
then, 60 now. A loss as noisy as its learning (a time-series regression whose per-batch
losses range 0.35-1.8 while its level falls 0.78 -> 0.67) makes none of its wobbles a
divergence; a run that climbs from 2 to 7 clears it many times over. A healthy regression
on batches of 4 read at 12 to 100 steps ended "above its start" in 24-38% of 100 seeds
without any noise test.

The 10% gain keeps a loss that never moved much (a GAN's summed losses wander around their
start; a fine-tune's flat loss) from reading its noise as learning given back.

Why these thresholds. They define un-learning, not a tuned score: giving back half of what
was learned is the point where the run has lost more than it kept, and the 20% floor keeps a
loss near its floor (a best of 0.003 whose noise doubles it) from counting as divergence.
Measured on the development grid (docs/benchmarks.md: 58 healthy runs of six model families):
healthy runs give back at most 9% of their gain; the runs that collapse or diverge after a
learning-rate ramp or a warm-up past stability give back 69% to far above 100%. A spike that
recovers moves no median over ``w`` steps, and an lr schedule that ends in a plateau keeps
``end`` near ``best``.

Three kinds of run are read apart:

- a game (``a_game``: an optimizer stepped between two backward calls of one step, a
  GAN's two halves, an actor and a critic): the step's loss sums the players' scores,
  which settle at an equilibrium (3 ln 2 for a GAN) from wherever they started. Not judged;
- batches that get harder: where the probe batch's loss (``probe_loss``, the same batch in
  eval mode at steps 2, 4, 8, ... and at the end: the model's loss with the data held
  still) ends below its first reading and gave back less than ``give_back`` of its own
  gain, the model kept what it learned and the rise is the data's (a curriculum from easy
  to hard, a stream that drifts): a warning, not an error. After a jump, where its latest
  reading is less than ``min_rise`` above its last reading before the jump (a curriculum's
  next, harder stage). A run judged while it trains,
  whose latest probe reading is older than the loss's end window, stays an error;
- targets that grow: where every step has a ``loss_constant`` (the loss a constant
  prediction of that step's own targets scores) and the loss over it does not read as
  diverged by the same tests, the loss rose with its targets' spread (a value network's
  bootstrapped targets, returns that grow as a policy learns): a warning. A diverging
  regression or classifier rises against a bar that stays put. The loss checks while a
  run trains read each step's bar beside its loss (record/losses.py), so it holds there too;
- a loss that hovers about zero: it changes sign between at least ``sign_changes`` (10%) of
  its consecutive steps. An error measure (a cross-entropy, a squared error, an NLL) does
  not: it is at or above 0, or crosses 0 once on its way down (a flow's NLL). A surrogate
  does: a policy gradient's −log π(a)·A over centred advantages is 0 on average whatever
  the policy, and its entropy bonus −β·H rises as the policy sharpens, which is the policy
  learning (blind trial 34: a REINFORCE run whose return went to its maximum while this
  loss rose from −0.02 to +0.04, changing sign at 30% of its steps). A warning, not an
  error: its level says nothing of progress;
- a loss of samples drawn from the model's own outputs (meta.json ``samples_model``:
  ``sample()`` of a ``Categorical``, ``Bernoulli`` or ``Normal`` whose parameters require
  grad, as ``Categorical(logits=policy(x)).sample()``; record/model_samples.py): the same
  surrogate, whatever its sign. A warning. So is the loss of a run that moves inputs along
  its model's input gradient at two steps or more (``torch.autograd.grad`` w.r.t. leaf
  tensors that are no parameters, keeping no graph): an energy model's Langevin negatives,
  whose contrastive-divergence loss E(data) − E(samples) returns toward 0 as the sampler
  catches up with the model (blind trial 38's energy MLP: −0.13 → −0.56 → −0.13 while its
  held-out NLL fell throughout), or adversarial examples, a game against its own attacker.

What it cannot see: a run that never learned and did not get worse (its ``start`` is its
``best``), and one that learned only a little before it stalled; those need a reference the
loss alone does not give (the data's unigram loss). A loss that is not meant to fall (a GAN's
generator loss alone rises as the discriminator learns) is not a training loss to judge:
give the recorder the sum of the losses, or disable the rule. It needs ``min_steps`` finite
losses, twice ``min_window``: the fewest for a start and an end level that share no loss (a
compiled run whose probes are blind still has its loss at every step, and one that rose
x230 in 12 steps is an error at once); it acts online, on the losses written so far, so a
collapse is reported while the run trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..store import RUN_MODULE
from ..store.findings import Finding
from ..store.meta_check import INPUT_GRADIENT
from .base import Rule, RunView, finding
from .spikes import LOSS_SPIKE, spikes
from .view import Request

#: The fewest losses a level is the median of (``min_window``'s default).
MIN_WINDOW = 5
#: The fewest disjoint levels whose own differences measure the noise of a level.
MIN_LEVELS = 6


def window(n: int, min_window: int = MIN_WINDOW) -> int:
    """How many consecutive losses a level is the median of, for ``n`` losses."""
    return max(int(min_window), n // 20)


def loss_series(view: RunView) -> pd.Series:
    """The loss of every step (module ``__run__``; micro-batches averaged), indexed by step
    in step order; non-finite values kept."""
    loss = view.metrics("loss")
    loss = loss[loss.module == RUN_MODULE]
    return loss.groupby("step").value.mean().sort_index().astype(float)


def finite_losses(view: RunView, at_least: int = 2 * MIN_WINDOW) -> pd.Series | None:
    """The run's finite losses by step (``loss_series`` without NaN/Inf), or None with fewer
    than ``at_least`` of them (two level windows by default: a start and an end)."""
    series = loss_series(view)
    series = series[np.isfinite(series.to_numpy(float))]
    return series if len(series) >= at_least else None


def loss_levels(series: pd.Series, min_window: int) -> tuple[float, float, int, float, int]:
    """``(start, best, best_step, end, w)`` of a finite loss series indexed by step (in step
    order): medians over ``w`` consecutive losses (module docstring)."""
    w = window(len(series), min_window)
    level = series.rolling(w).median().dropna()  # the median of the w losses ending there
    values = series.to_numpy(float)
    at = int(np.argmin(level.to_numpy(float)))
    # The start: the first loss (before any update) unless the next ones sit lower: a run
    # that diverges at once has no median to speak of at its start.
    return (
        float(min(values[0], np.median(values[:w]))),
        float(level.iloc[at]),
        int(level.index[at]),
        float(np.median(values[-w:])),
        w,
    )


def level_noise(values: np.ndarray, w: int) -> float:
    """The standard deviation of the difference of two levels (medians over ``w`` losses)
    that noise alone gives: the per-step noise σ from the second differences, robustly
    (median |Δ²| = 0.6745·√6·σ for independent Gaussian draws; a linear trend cancels), a
    median over ``w`` draws has 1.2533·σ/√w (its asymptotic standard error), and a
    difference of two such levels √2 times that. Medians of a few skewed draws spread more
    than that: where there are ``MIN_LEVELS`` disjoint levels or more, the difference noise
    read from the levels themselves (the robust spread of their second differences,
    1.4826 · median absolute deviation / √6 for a level, √2 that for a difference) is taken
    where it is larger."""
    gaussian = float(np.sqrt(2) * 1.2533 * draw_noise(values) / np.sqrt(w))
    k = len(values) // w
    if k < MIN_LEVELS:
        return gaussian
    levels = np.median(values[: k * w].reshape(k, w), axis=1)  # (k,) disjoint levels
    # Second differences of iid levels have √6 times a level's σ; a trend that bends only
    # at a few points (an lr jump, the end of a warm-up) moves few of them.
    bends = np.diff(levels, 2)
    spread = 1.4826 * float(np.median(np.abs(bends - np.median(bends)))) / np.sqrt(6)
    return max(gaussian, float(np.sqrt(2) * spread))


def draw_noise(values: np.ndarray) -> float:
    """The noise σ of one loss, from the median |second difference| (0.6745·√6·σ for
    independent Gaussian draws; a linear trend cancels)."""
    if len(values) < 3:
        return 0.0
    return float(np.median(np.abs(np.diff(values, 2)))) / (0.6745 * np.sqrt(6))


def selection(n: int, w: int) -> float:
    """How far below its true level, in level-difference deviations, the lowest of the
    k = n // w disjoint levels of ``n`` losses lies by chance: the expected minimum of k
    Gaussian draws is about σ·√(2 ln k) below their mean (the extreme-value approximation),
    and a level's σ is a level difference's over √2, so √(ln k) of those."""
    k = n // max(w, 1)
    return float(np.sqrt(np.log(k))) if k > 1 else 0.0


def _stands_out(
    values: np.ndarray, low: float, high: float, w: int, z: float, one_draw: bool = False
) -> bool:
    """Whether level ``high`` stands ``z`` deviations of noise above ``low`` (a level, or one
    loss where ``one_draw``: the first, taken as the start), with σ read from ``values``; in
    log space where they are all positive (a loss wobbles in proportion to its level: a
    batch loss that is a sum of squares is skewed far to the right, and one that has
    diverged swings with its size)."""
    if low > 0 and np.all(values > 0):
        values, low, high = np.log(values), float(np.log(low)), float(np.log(high))
    noise = level_noise(values, w)
    if one_draw:  # one loss against a level: the draw's own σ and half the difference's
        noise = float(np.sqrt(draw_noise(values) ** 2 + noise**2 / 2))
    return high - low >= z * noise


def a_game(view: RunView) -> bool:
    """Whether each step's loss sums several players' (meta.json ``players``: an optimizer
    stepped between two backward calls of one step, a GAN's discriminator then its
    generator, an actor then a critic): their scores settle where neither player can
    improve, not where one loss is lowest (a GAN at its equilibrium sums 3 ln 2 from a lower
    start). Two optimizers stepped after one backward (an encoder's and a decoder's) train
    one loss: that is judged."""
    return bool(view.meta.doc.get("players"))


#: ``loss_levels``' reading: (start, best, best step, end, window).
Levels = tuple[float, float, int, float, int]


def probe_readings(view: RunView) -> pd.Series:
    """The probe batch's finite losses (``probe_loss``) by step, in step order."""
    rows = view.metrics("probe_loss")
    probe = rows[rows.module == RUN_MODULE].groupby("step").value.mean().sort_index()
    return probe[np.isfinite(probe.to_numpy(float))]


def held_on_the_probe_batch(
    view: RunView, series: pd.Series, levels: Levels, give_back: float
) -> tuple[float, float, float] | None:
    """``(first, best, end)`` of the probe batch's loss (``probe_loss``: the same batch,
    eval mode, at steps 2, 4, 8, ... and at the end) where the model kept what it learned on
    it: its end below its first and less than ``give_back`` of its gain given back. None
    where it did not, or where it cannot tell: fewer than 3 readings, or a latest reading
    older than the training loss's (``series``, read as ``levels``) end window that came
    before half of its rise from its best level (a run judged while it trains reads the last
    power-of-two step's: at step 40, step 32's, which speaks for the rise where the rise had
    mostly come by then).

    The first reading comes at step 2, after two updates: a run that blew up at once has its
    probe batch's first reading far above where it began. So ``first`` is at most the
    training loss's ``start`` (the loss of the first batches, before any update, which a
    batch from the same data scores alike): a model that ends worse on the batch than it
    began kept nothing.

    A model that diverges un-learns on any batch, this one too; a loss that rises because
    the batches got harder (a curriculum, a stream that drifts) leaves the model's loss on
    a fixed batch where it was."""
    probe = probe_readings(view)
    if len(probe) < 3:
        return None
    start, best_level, best_step, end_level, w = levels
    reading = int(probe.index[-1])
    if reading < int(series.index[-1]) - w:
        upto = series[series.index <= reading]  # the training losses up to the reading
        if reading <= best_step or len(upto) < w:
            return None
        level = float(upto.iloc[-w:].median())
        if not level - best_level >= 0.5 * (end_level - best_level):
            return None
    first = min(float(probe.iloc[0]), start)
    best, end = float(probe.min()), float(probe.iloc[-1])
    if end < first and end - best < give_back * (first - best):
        return first, best, end
    return None


@dataclass(frozen=True)
class Divergence:
    """What the rule read: its message, value and threshold, the last step, the loss's
    levels, and the step of the jump it did not come back from (``unrecovered_jump``; None
    for the other two cases)."""

    message: str
    value: float
    threshold: float
    last: int
    levels: Levels
    jump: int | None = None


def divergence(series: pd.Series, p: dict[str, float]) -> Divergence | None:
    """The rule's reading of a finite loss series indexed by step (module docstring), or
    None where it did not diverge."""
    levels = loss_levels(series, int(p["min_window"]))
    start, best, best_step, end, w = levels
    gained, rise, last = start - best, end - best, int(series.index[-1])
    # A change counts only past min_z times what the loss's own noise moves a level
    # difference, and the best level, the lowest of the k levels up to it, by what
    # choosing the lowest of k moves it by chance.
    values = series.to_numpy(float)
    z = p["min_z"] + selection(int(series.index.get_loc(best_step)) + 1, w)
    # A loss that never fell learned nothing (a loss at exactly 0 throughout gained 0 >= 0).
    learned = gained > 0 and gained >= p["min_gain"] * abs(start)
    rose = rise >= p["min_rise"] * abs(best) and _stands_out(values, best, end, w, z)
    if learned and rise >= p["give_back"] * gained and rose:
        given = rise / gained
        share = f"{given:.0%} of" if given < 10 else f"{given:.3g} times"
        message = (
            f"the loss fell from {start:.4g} to {best:.4g} (step {best_step}) and rose back "
            f"to {end:.4g} by step {last}: the run gave back {share} what it had learned "
            f"(medians over {w} steps)"
        )
        return Divergence(message, given, p["give_back"], last, levels)
    if (
        start != 0
        and end - start >= p["above_start"] * abs(start)
        and _stands_out(
            values, start, end, w, p["min_z"], one_draw=start < float(np.median(values[:w]))
        )
    ):
        message = (
            f"the loss rose from {start:.4g} at the start to {end:.4g} by step {last}: "
            f"{end / start:.3g}x worse than it started (medians over {w} steps)"
        )
        return Divergence(message, (end - start) / abs(start), p["above_start"], last, levels)
    return unrecovered_jump(series, p, levels)


def unrecovered_jump(series: pd.Series, p: dict[str, float], levels: Levels) -> Divergence | None:
    """The first loss spike (``loss-spike``'s reading: z 6 over the 64 losses before it)
    that the loss had not come back from ``recover_steps`` steps or more later: its end
    level (the median of the last ``w`` losses) at least ``min_rise`` above the level before
    the spike (the median of the ``w`` losses before it), standing ``min_z`` deviations of
    noise above it. None where every spike was recovered from, or came too late to tell."""
    found = spikes(series, LOSS_SPIKE.defaults)
    w, end = levels[4], levels[3]
    values = series.to_numpy(float)  # (n,)
    last = int(series.index[-1])
    for step in found.step.astype(int):
        at = int(series.index.get_loc(step))
        if at < w or last - step < p["recover_steps"]:
            continue
        before = float(np.median(values[at - w : at]))
        if before == 0:
            continue  # a loss at exactly 0 (a hinge met): no level to be a share above
        if end - before >= p["min_rise"] * abs(before) and _stands_out(
            values, before, end, w, p["min_z"]
        ):
            worse = f"{end / before:.3g}x" if before > 0 else f"{end - before:+.3g} above"
            message = (
                f"the loss jumped at step {step} (to {values[at]:.4g}, from a level of "
                f"{before:.4g}) and had not come back {last - step} steps later: by step "
                f"{last} it sat at {end:.4g}, {worse} its level before the jump (medians over "
                f"{w} steps)"
            )
            return Divergence(
                message, (end - before) / abs(before), p["min_rise"], last, levels, step
            )
    return None


def held_after_the_jump(view: RunView, jump: int, min_rise: float) -> tuple[float, float] | None:
    """``(before, after)`` of the probe batch's loss (``probe_loss``) where the model kept
    what it had before the jump: its latest reading, taken after the jump, less than
    ``min_rise`` above its last reading before it. The batches got harder (a curriculum's
    next stage); a model that an lr restart or a bad shard threw off scores worse on a batch
    it had learned (a blind trial's PatchTST, 0.235 -> 0.499; its NeoX fed a shard tokenised
    otherwise, 0.995 -> 4.18). None where it did not, or where no reading came before or
    after the jump."""
    probe = probe_readings(view)
    earlier, later = probe[probe.index < jump], probe[probe.index > jump]
    if earlier.empty or later.empty:
        return None
    before, after = float(earlier.iloc[-1]), float(later.iloc[-1])
    return (before, after) if after - before < min_rise * abs(before) else None


def against_the_bar(view: RunView, series: pd.Series) -> pd.Series | None:
    """Each step's loss over its ``loss_constant`` (the loss a constant prediction of that
    step's own targets scores: record/constant_loss.py), where every step has one; None
    where any lacks it (a loss of several terms, a language model's rare tokens)."""
    rows = view.metrics("loss_constant")
    bars = rows[rows.module == RUN_MODULE].groupby("step").value.mean()
    bars = bars.reindex(series.index).to_numpy(float)
    if not (np.isfinite(bars) & (bars > 0)).all():
        return None
    return series / bars


def sign_changes(series: pd.Series) -> float:
    """The share of consecutive losses of opposite signs (a 0 counts as no sign)."""
    signs = np.sign(series.to_numpy(float))  # (n,)
    return float(np.mean(signs[1:] * signs[:-1] < 0)) if len(signs) > 1 else 0.0


def _loss_divergence(view: RunView, p: dict[str, float]) -> Iterator[Finding]:
    if a_game(view):
        return
    series = finite_losses(view, max(int(p["min_steps"]), 2))
    if series is None:
        return
    read = divergence(series, p)
    if read is None:
        return
    severity, message = "error", read.message
    held: tuple[float, ...] | None
    if read.jump is None:
        held = held_on_the_probe_batch(view, series, read.levels, p["give_back"])
        went = " -> ".join(f"{v:.4g}" for v in held) if held else ""
    else:
        held = held_after_the_jump(view, read.jump, p["min_rise"])
        went = f"{held[0]:.4g} before the jump -> {held[1]:.4g}" if held else ""
    relative = against_the_bar(view, series) if held is None else None
    if held is not None:
        severity = "warning"
        message += (
            f"; but on one fixed batch the model's loss went {went} (probe_loss): it kept "
            "what it learned there, so its batches got harder (a curriculum, a drifting "
            "stream), not the model worse"
        )
    elif (sampled := view.meta.doc.get("samples_model")) and sampled.get(
        "function"
    ) == INPUT_GRADIENT:
        severity = "warning"
        message += (
            f"; but the script moves inputs along its model's own input gradient "
            f"(torch.autograd.grad from step {sampled.get('step')} on: Langevin sampling, "
            "adversarial examples) and trains on them: a loss against its own sampler, such "
            "as contrastive divergence's E(data) - E(samples), which returns toward 0 as the "
            "sampler catches up while the model goes on improving; judge the run by a "
            "held-out measure"
        )
    elif sampled:
        severity = "warning"
        message += (
            f"; but the script draws from its model's own outputs ("
            f"{sampled.get('function')}.sample() from step {sampled.get('step')} on): an on-policy "
            "surrogate (a policy gradient's -log pi(a)*A, an entropy bonus that rises as the "
            "policy sharpens) whose level says nothing of progress; judge the run by its return"
        )
    elif (flips := sign_changes(series)) >= p["sign_changes"]:
        severity = "warning"
        message += (
            f"; but the loss changes sign at {flips:.0%} of its steps: it hovers about zero, "
            "a surrogate whose level says nothing of progress (a policy gradient's "
            "-log pi(a)*A over centred advantages, with an entropy bonus that rises as the "
            "policy sharpens)"
        )
    elif relative is not None and divergence(relative, p) is None:
        severity = "warning"
        message += (
            "; but over the loss of a constant prediction of each step's own targets "
            "(loss_constant) it did not: the targets' spread grew with it (a value "
            "network's bootstrapped targets, a reward that grows as the policy learns)"
        )
    yield finding(
        LOSS_DIVERGENCE,
        severity,
        message,
        module=RUN_MODULE,
        step=read.last,
        value=read.value,
        threshold=read.threshold,
        metric="loss",
        remedy="lower the peak learning rate or lengthen the warm-up; clip the gradient; "
        "look at the lr schedule around the step the loss turned, and at the earlier findings",
    )


LOSS_DIVERGENCE = Rule(
    "loss-divergence",
    "Loss rose back after learning (divergence or collapse without a NaN)",
    "",
    ("loss",),
    {
        "give_back": 0.5,
        "min_rise": 0.2,
        "min_gain": 0.1,
        "above_start": 0.5,
        "min_steps": 2 * MIN_WINDOW,
        "min_window": MIN_WINDOW,
        "min_z": 3.0,
        "sign_changes": 0.1,
        "recover_steps": 50,
    },
    _loss_divergence,
    "error",
    (Request(("loss", "probe_loss", "loss_constant")),),
)

RULES = [LOSS_DIVERGENCE]
