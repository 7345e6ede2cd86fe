"""``log_to="trainer"`` in the framework callbacks: the live series go where the user's
trainer already logs. Lightning: every logger of ``trainer.loggers`` (``log_metrics``, under
``stabscope/``; findings through the logger's ``add_text`` or W&B ``alert`` where it has one).
transformers: the Trainer's ``report_to`` (``tensorboard`` into its logging directory, ``wandb``
into the run its WandbCallback started)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..export.destinations import Target, target_items
from ..store.findings import Finding

TRAINER = "trainer"
PREFIX = "stabscope/"


class LightningLoggers:
    """The Trainer's loggers as a live destination (``export.live.Destination``)."""

    name = "the Lightning Trainer's loggers"

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        metrics = {PREFIX + tag: v for tag, v in values.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def finding(self, step: int, finding: Finding, markdown: str) -> None:
        for logger in self.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard's SummaryWriter
                experiment.add_text(f"{PREFIX}findings", markdown, step)
            elif hasattr(experiment, "alert"):  # a W&B run
                experiment.alert(title=f"stabscope: {finding.rule}", text=markdown)

    def close(self) -> None:
        for logger in self.trainer.loggers:  # Lightning finalizes them; the last rows go now
            logger.save()


def with_trainer(log_to: Any, trainer_targets: Sequence[Any]) -> Any:
    """``log_to`` with ``"trainer"`` replaced by ``trainer_targets``."""
    if log_to is None:
        return None
    return [
        t
        for target in target_items(log_to)
        for t in (list(trainer_targets) if target == TRAINER else [target])
    ]


def hf_targets(args: Any) -> list[Target | str]:
    """The Trainer's ``report_to`` as live targets (the ones stabscope can write); TensorBoard's
    tags under ``stabscope/``, next to the Trainer's ``train/...`` in its directory."""
    report_to = getattr(args, "report_to", None) or []
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    out = []
    if "tensorboard" in report_to or "all" in report_to:
        out.append(Target(f"tensorboard:{hf_logging_dir(args)}", PREFIX))
    if "wandb" in report_to or "all" in report_to:
        out.append("wandb")
    return out


def hf_logging_dir(args: Any) -> str:
    """The directory the Trainer's TensorBoardCallback writes to. transformers < 5:
    ``args.logging_dir``. transformers 5 dropped it: ``TENSORBOARD_LOGGING_DIR``, else
    ``output_dir/runs/DATE_HOST``, named by the clock when its ``on_train_begin`` ran (before
    the user's callbacks): the directory of the newest event file there, the one it just made."""
    if getattr(args, "logging_dir", None):
        return str(args.logging_dir)
    if os.getenv("TENSORBOARD_LOGGING_DIR"):
        return os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"])
    made = list((Path(args.output_dir) / "runs").glob("*/events.out.tfevents.*"))
    if made:
        return str(max(made, key=lambda f: f.stat().st_mtime_ns).parent)
    from transformers.integrations.integration_utils import default_logdir

    return os.path.join(args.output_dir, default_logdir())  # no event file yet: its default
