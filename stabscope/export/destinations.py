"""The dashboards a run's live series go to (``log_to``): ``tensorboard:DIR`` (an event file
in DIR) and ``wandb`` (the active W&B run, else a new one; ``wandb:PROJECT`` names its
project). Each extra is imported only here, when named; ``check_targets`` says what is wrong
with a target, or missing, before anything is built."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..store.findings import Finding

TARGETS = "tensorboard:DIR, wandb or wandb:PROJECT"
WANDB_HINT = "pip install 'stabscope[wandb]' (or pip install wandb)"
#: Live W&B series and findings are under this prefix: they share the run with the user's own.
WANDB_PREFIX = "stabscope/"
WANDB_STEP = "stabscope/step"


@dataclass(frozen=True)
class Target:
    """A target whose TensorBoard tags go under ``prefix``: a trainer's logging directory,
    shared with the trainer's own series (``log_to="trainer"``)."""

    spec: str
    prefix: str = ""


def split_targets(specs: str | Sequence[str]) -> list[str]:
    """``log_to`` as a list of targets: one string, a comma list, or a sequence of them."""
    items = [specs] if isinstance(specs, str) else list(specs)
    return [t.strip() for item in items for t in str(item).split(",") if t.strip()]


def target_items(specs: Any) -> list[Any]:
    """``log_to`` as a flat list: each string split at its commas; a ``Target`` or a
    destination object (anything else) kept as it is."""
    items = [specs] if isinstance(specs, str) or not isinstance(specs, Sequence) else specs
    return [t for item in items for t in (split_targets(item) if isinstance(item, str) else [item])]


def check_targets(specs: str | Sequence[str]) -> list[str]:
    """The targets, or a ``UsageError`` for an unknown one or a missing extra."""
    targets = split_targets(specs)
    for target in targets:
        kind, _, arg = target.partition(":")
        if kind == "tensorboard" and arg:
            from .tensorboard import require_tensorboard

            require_tensorboard()
        elif kind == "wandb":
            _wandb()
        else:
            raise UsageError(
                f"unknown --log-to target {target!r}",
                hint=f"one of {TARGETS} (repeat the option, or separate them with commas)",
            )
    return targets


def _wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise UsageError("wandb is not installed", hint=WANDB_HINT) from None
    return wandb


def open_targets(specs: str | Sequence[str | Target], run_name: str) -> tuple[list[Any], list[str]]:
    """A destination for each target (``live.Destination``) and a line for each that could
    not be opened (an unwritable directory, a W&B login missing): training goes on without
    it. ``run_name`` names a new W&B run."""
    pairs = [(t.spec, t.prefix) if isinstance(t, Target) else (t, "") for t in target_items(specs)]
    check_targets([t for t, _ in pairs])
    out: list[Any] = []
    failed: list[str] = []
    for target, prefix in pairs:
        kind, _, arg = target.partition(":")
        try:
            if kind == "tensorboard":
                out.append(TensorBoardLive(Path(arg), prefix))
            else:
                out.append(WandbLive(arg or None, run_name))  # always under stabscope/
        except Exception as err:
            failed.append(f"live logging to {target} could not start: {type(err).__name__}: {err}")
    return out, failed


class TensorBoardLive:
    """An event file of its own in ``logdir`` (TensorBoard merges the files of one directory):
    scalars under the export's tags, findings as text ``stabscope/findings``. The writer's own
    thread writes the file; a failed write surfaces at the next call."""

    def __init__(self, logdir: Path, prefix: str = "") -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.name = f"tensorboard:{logdir}"
        self.prefix = prefix
        logdir.mkdir(parents=True, exist_ok=True)
        self._event, self._summary = event_pb2, summary_pb2
        self._writer = EventFileWriter(str(logdir), flush_secs=2, filename_suffix=".stabscope")

    def _write(self, step: int, values: list[Any]) -> None:
        summary = self._summary.Summary(value=values)
        self._writer.add_event(self._event.Event(wall_time=time.time(), step=step, summary=summary))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        value = self._summary.Summary.Value
        self._write(step, [value(tag=self.prefix + t, simple_value=v) for t, v in values.items()])

    def finding(self, step: int, finding: Finding, markdown: str) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._write(step, list(text_pb(f"{self.prefix}stabscope/findings", markdown).value))

    def close(self) -> None:
        self._writer.close()


class WandbLive:
    """The active W&B run (``wandb.run``), else one started here and finished at close:
    series under ``stabscope/`` against their own step axis ``stabscope/step`` (so that the
    user's own ``wandb.log`` calls keep theirs), each finding a W&B alert with its remedy."""

    def __init__(self, project: str | None, run_name: str) -> None:
        wandb = _wandb()
        self._wandb = wandb
        self._own = wandb.run is None
        self.run = wandb.init(project=project, name=run_name) if self._own else wandb.run
        self.name = f"wandb run {self.run.id}"
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric(f"{WANDB_PREFIX}*", step_metric=WANDB_STEP)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        logged = {WANDB_PREFIX + t: v for t, v in values.items()}
        self.run.log({**logged, WANDB_STEP: step})

    def finding(self, step: int, finding: Finding, markdown: str) -> None:
        level = self._wandb.AlertLevel
        self.run.alert(
            title=f"stabscope: {finding.rule} at step {step}",
            text=markdown,
            level=level.ERROR if finding.severity == "error" else level.WARN,
            wait_duration=0,
        )

    def close(self) -> None:
        if self._own:
            self.run.finish()
