"""Section 8: loss and learning rate (and output logits, where recorded)."""

from __future__ import annotations

from . import Context, Section, series_block

PLOTS = (
    ("loss", "training loss", False),
    ("lr", "learning rate (per param group)", True),
    ("logit_max", "largest output logit", False),
    ("logit_min", "smallest output logit", False),
    ("logit_lse_mean", "mean log-sum-exp of the output logits", False),
    ("pred_marginal_entropy", "entropy of the mean prediction H(p̄), nats", False),
    (
        "pred_entropy",
        "mean entropy of each prediction H(p_i), nats (the gap to H(p̄): what "
        "the prediction says about the input)",
        False,
    ),
)
INTRO = (
    "Every step is recorded for loss and learning rate. Long runs are shown as the mean of "
    "each bin of steps with a min-max band, so a spike in one step stays visible."
)


def training_section(ctx: Context) -> Section:
    section = Section("training", "Loss and learning rate", intro=INTRO)
    for metric, title, log in PLOTS:
        block = series_block(ctx, metric, title, log, section.notes)
        if block is not None:
            section.body.append(block)
        elif metric in ("loss", "lr"):
            section.notes.append(f"{metric}: not recorded in any run")
    return section
