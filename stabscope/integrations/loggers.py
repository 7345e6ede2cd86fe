"""``log_to="trainer"`` in the framework callbacks: the live series go where the user's
trainer already logs. Lightning: every logger of ``trainer.loggers`` (``log_metrics``, under
``stabscope/``; findings through the logger's ``add_text`` or W&B ``alert`` where it has one).
transformers: the Trainer's ``report_to`` (``tensorboard`` into its ``logging_dir``, ``wandb``
into the run its WandbCallback started)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..export.destinations import split_targets
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
    items = [log_to] if isinstance(log_to, str) or not isinstance(log_to, Sequence) else log_to
    out: list[Any] = []
    for item in items:
        for target in split_targets(item) if isinstance(item, str) else [item]:
            out += list(trainer_targets) if target == TRAINER else [target]
    return out


def hf_targets(args: Any) -> list[str]:
    """The Trainer's ``report_to`` as live targets (the ones stabscope can write)."""
    report_to = getattr(args, "report_to", None) or []
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    out = []
    if "tensorboard" in report_to or "all" in report_to:
        out.append(f"tensorboard:{args.logging_dir}")
    if "wandb" in report_to or "all" in report_to:
        out.append("wandb")
    return out
