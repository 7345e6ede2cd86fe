"""A run's ``meta.json`` as readers see it: ``RunMeta``, a read-only view with one typed
property per key the read side uses (rules, report, summary, CLI), each with the default
a reader assumes when the key is missing.

The document itself stays the plain dict that ``read_meta`` returns (checked by
``meta_check``, so each present key has its type); ``RunMeta`` is also a ``Mapping`` over it,
so a key this version has no property for is still ``meta.get(key)``. No torch import here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .meta import read_meta


@dataclass(frozen=True)
class RunMeta(Mapping[str, Any]):
    """Read-only, typed view of one run's meta document."""

    doc: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> RunMeta:
        """``meta`` as a view (itself when it is one already)."""
        return meta if isinstance(meta, RunMeta) else cls(meta)

    # -- Mapping over the document: keys without a property ---------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.doc[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.doc)

    def __len__(self) -> int:
        return len(self.doc)

    def _dict(self, key: str) -> dict[str, Any]:
        value = self.doc.get(key)
        return value if isinstance(value, dict) else {}

    def _int(self, key: str, default: int) -> int:
        return int(self.doc.get(key) or default)

    # -- how it ended ----------------------------------------------------------------------
    @property
    def status(self) -> str:
        """``complete``, ``failed``, ``interrupted``, ``stopped``, ``running``; ``unknown``
        when absent."""
        return str(self.doc.get("status") or "unknown")

    @property
    def error(self) -> dict[str, Any] | None:
        """``{type, message, traceback}`` of the exception that ended the run, if one did."""
        return self.doc.get("error") or None

    @property
    def tool_error(self) -> dict[str, Any] | None:
        """``{where, step, type, message, traceback}`` of stabscope's own error that stopped
        the recording while the script trained on (drivers/zerocode/tool_fault.py)."""
        entry = self.doc.get("tool_error")
        return entry if isinstance(entry, dict) else None

    @property
    def rank_errors(self) -> list[dict[str, Any]]:
        """Every rank's error of a multi-rank run one of whose ranks failed, the earliest
        first (``error`` is the first of them); empty otherwise."""
        return [e for e in self.doc.get("rank_errors") or [] if isinstance(e, dict)]

    @property
    def stopped_by(self) -> dict[str, Any] | None:
        """The finding that stopped the run (``--on-error stop``): the finding's fields and
        ``seen_at``, the step at whose end it arrived; None when nothing stopped it."""
        return self.doc.get("stopped_by") or None

    @property
    def online_findings(self) -> list[dict[str, Any]]:
        """The verdicts that arrived while the run trained, in the order they arrived."""
        return list(self._dict("online").get("findings") or [])

    @property
    def interrupted_by(self) -> str | None:
        return self.doc.get("interrupted_by")

    @property
    def started(self) -> str | None:
        return self.doc.get("started")

    @property
    def finished(self) -> str | None:
        return self.doc.get("finished")

    @property
    def pid(self) -> int | None:
        return self.doc.get("pid")

    @property
    def host(self) -> str | None:
        return self.doc.get("host")

    @property
    def schema_version(self) -> Any:
        return self.doc.get("schema_version")

    # -- how much was recorded -------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Training steps taken."""
        return self._int("steps", 0)

    @property
    def steps_taken(self) -> int:
        """Every step taken, not only those the schedule probed in full; a meta.json without
        the count of steps gives its recorded ones."""
        return self.steps or self.recorded_steps

    @property
    def recorded_steps(self) -> int:
        """Steps with recorded rows (the schedule may skip some)."""
        return self._int("recorded_steps", 0)

    @property
    def rows(self) -> int:
        return self._int("rows", 0)

    @property
    def parts(self) -> int:
        return self._int("parts", 0)

    @property
    def world_size(self) -> int:
        return self._int("world_size", 1)

    @property
    def sharded(self) -> bool:
        """Whether the parameters were sharded across ranks (FSDP)."""
        return bool(self._dict("distributed").get("sharded"))

    @property
    def first_nonfinite(self) -> dict[str, dict[str, Any]]:
        """Per direction (``forward``, ``backward``), where a NaN/Inf was first seen:
        ``{module, call, step}``."""
        return self._dict("first_nonfinite")

    @property
    def hooks_never_fired(self) -> dict[str, list[str]]:
        return self._dict("hooks_never_fired")

    @property
    def notes(self) -> list[str]:
        return list(self.doc.get("notes") or [])

    # -- the model -------------------------------------------------------------------------
    @property
    def model_type(self) -> str | None:
        return self.doc.get("model_type")

    @property
    def modules(self) -> list[dict[str, Any]]:
        """One record per module: name, type, layer, role, depth, forward_order, ..."""
        return list(self.doc.get("modules") or [])

    @property
    def module_names(self) -> list[str]:
        return [m["name"] for m in self.modules]

    @property
    def parameters(self) -> list[dict[str, Any]]:
        """One record per parameter: name, shape, numel, layer, trainable (its
        ``requires_grad``), and once an optimizer stepped, stepped (an owned optimizer holds
        it)."""
        return list(self.doc.get("parameters") or [])

    @property
    def matrices(self) -> set[str]:
        """Parameters with two or more dimensions (weights, not biases or norm gains)."""
        return {p["name"] for p in self.parameters if len(p["shape"]) >= 2}

    @property
    def trainable(self) -> set[str]:
        """Parameters the run trained: ``requires_grad`` (``trainable``) and held by an
        optimizer (``stepped``); a record without either field counts as trained."""
        return {
            p["name"]
            for p in self.parameters
            if p.get("trainable", True) and p.get("stepped", True)
        }

    @property
    def unstepped(self) -> set[str]:
        """Parameters with ``requires_grad`` that no optimizer of the run holds: they get
        gradients and never move (empty before an optimizer stepped). One that left the
        model mid-run (``left_at``: a replaced block) is not among them: its gradient is
        the last it got, and no optimizer needs to hold it."""
        return {
            p["name"]
            for p in self.parameters
            if p.get("trainable", True) and p.get("stepped") is False and "left_at" not in p
        }

    @property
    def structure(self) -> dict[str, Any] | None:
        """What structure discovery found (blocks, branches, norms), if it ran."""
        structure = self.doc.get("structure")
        return structure if isinstance(structure, dict) else None

    @property
    def blocks(self) -> list[str]:
        """Names of the detected blocks, shallow to deep."""
        return [str(b["name"]) for b in (self.structure or {}).get("blocks") or []]

    # -- how it was recorded ---------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self._dict("config")

    @property
    def preset(self) -> str | None:
        return self.config.get("preset")

    @property
    def run_info(self) -> dict[str, Any]:
        """The ``run`` block: script, script_config, how the model was driven."""
        return self._dict("run")

    @property
    def versions(self) -> dict[str, Any]:
        return self._dict("versions")

    @property
    def lr_plan(self) -> dict[str, Any] | None:
        """The learning rate planned ahead (store/lr_plan.py), if it was known."""
        return self.doc.get("lr_plan") or None

    @property
    def phase_start(self) -> int | None:
        """The first step of the run's last training phase (``phases``: a new optimizer over
        other parameters took over from the one before, a fine-tune after a pretraining in
        one script), or None for a run of one phase."""
        phases = self.doc.get("phases")
        if not isinstance(phases, list) or len(phases) < 2:
            return None
        step = phases[-1].get("step") if isinstance(phases[-1], dict) else None
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    @property
    def budget(self) -> int | None:
        """The planned number of steps (``lr_plan``'s budget), or None where it is unknown."""
        budget = (self.lr_plan or {}).get("budget")
        return budget if isinstance(budget, int) and not isinstance(budget, bool) else None

    @property
    def planned_end(self) -> int | None:
        """The step count at which the training ends: the ``budget`` where it is known, else
        the steps seen of a training script that ran to its own end (``run.script_ended``:
        it returned, so its last step was its last); None where neither is known."""
        if self.budget is not None:
            return self.budget
        run = self.doc.get("run")
        if isinstance(run, dict) and run.get("script_ended") is True and self.steps > 0:
            return self.steps
        return None

    @property
    def optimizers(self) -> list[dict[str, Any]]:
        """Each owned optimizer's class and param groups' settings when it first stepped
        (record/optimizer_settings.py); empty for runs that predate it."""
        return list(self.doc.get("optimizers") or [])


def load_meta(run_dir: str | os.PathLike[str]) -> RunMeta:
    """``read_meta`` (every check included) as a typed view."""
    return RunMeta(read_meta(run_dir))


__all__ = ["RunMeta", "load_meta"]
