"""The shape of ``meta.json``, checked once on read, so that no reader meets a KeyError.

Readers index what the recorder always writes (``modules[i]["name"]``, ``parameters[i]
["shape"]``, ``first_nonfinite[d]["module"]``); a file edited by hand or by another tool gets
one error that names the field, rather than a traceback from deep inside a report or a rule.
Keys this version does not know are allowed (a newer stabscope may add some); a known key must
have its type. Optional keys may be missing; the required ones are listed per record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import MetaError


@dataclass(frozen=True)
class Kind:
    """A leaf type: ``what`` names it in the error ("an integer")."""

    what: str
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class ListOf:
    item: Spec

    @property
    def what(self) -> str:
        return "a list"


@dataclass(frozen=True)
class MapOf:
    """A JSON object with any keys whose values all have one spec."""

    value: Spec

    @property
    def what(self) -> str:
        return "an object"


@dataclass(frozen=True)
class Record:
    """A JSON object with known keys; ``required`` ones must be present."""

    fields: dict[str, Spec]
    required: tuple[str, ...] = ()
    nullable: bool = False  # null stands for "absent" (``error``, ``structure``)

    @property
    def what(self) -> str:
        return "an object" + (" or null" if self.nullable else "")


Spec = Kind | ListOf | MapOf | Record


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # save_meta writes non-finite floats as their repr: strict JSON has no NaN.
    return _is_int(v) or isinstance(v, float) or v in ("nan", "inf", "-inf")


STR = Kind("a string", lambda v: isinstance(v, str))
INT = Kind("an integer", _is_int)
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
NUMBER = Kind("a number", _is_number)
ANY = Kind("anything", lambda v: True)
OBJECT = MapOf(ANY)
MAYBE_STR = Kind("a string or null", lambda v: v is None or isinstance(v, str))
MAYBE_INT = Kind("an integer or null", lambda v: v is None or _is_int(v))
MAYBE_NUMBER = Kind("a number or null", lambda v: v is None or _is_number(v))

MODULE = Record(
    {
        "name": STR,
        "type": STR,
        "layer": MAYBE_INT,
        "role": MAYBE_STR,
        "depth": INT,
        "params": INT,
        "forward_order": MAYBE_INT,
        "forward_calls": INT,
        "grad_hooks": INT,
    },
    required=("name",),
)
PARAMETER = Record(
    {
        "name": STR,
        "shape": ListOf(INT),
        "numel": INT,
        "layer": MAYBE_INT,
        "trainable": BOOL,
        "stepped": BOOL,
        "left_at": INT,
    },
    required=("name", "shape"),
)
BRANCH = Record(
    {
        "name": STR,
        "output": STR,
        "kind": STR,
        "placement": STR,
        "norm": MAYBE_STR,
        "alpha": MAYBE_NUMBER,
        "stack": STR,
        "position": INT,
        "transformed": BOOL,
    }
)
ATTENTION = Record({"name": STR, "heads": MAYBE_INT, "kv_heads": MAYBE_INT})
BLOCK = Record(
    {
        "name": STR,
        "index": INT,
        "stack": STR,
        "placement": STR,
        "alpha": MAYBE_NUMBER,
        "branches": ListOf(BRANCH),
        "attention": ListOf(ATTENTION),
    },
    required=("name",),
)
MAYBE_BOOL = Kind("true, false or null", lambda v: v is None or isinstance(v, bool))
STRUCTURE = Record(
    {
        "recognised": BOOL,
        "blocks": ListOf(BLOCK),
        "norms": ListOf(STR),
        "notes": ListOf(STR),
        "output_positions": MAYBE_BOOL,
    },
    nullable=True,
)
#: ``samples_model``'s ``function`` where the samples are inputs moved along the model's own
#: input gradient (Langevin chains, adversarial examples: record/model_samples.py).
INPUT_GRADIENT = "autograd.grad"
NONFINITE = Record({"module": STR, "call": INT, "step": INT}, required=("module", "call", "step"))
#: ``rank`` and ``status`` only in a multi-rank run's errors (store/rank_errors.py).
ERROR_FIELDS: dict[str, Spec] = {
    "type": STR,
    "message": STR,
    "traceback": ListOf(STR),
    "hint": STR,
    "time": NUMBER,
    "rank": INT,
    "status": STR,
}
ERROR = Record(ERROR_FIELDS, nullable=True)
LR_PLAN = Record(  # store/lr_plan.py
    {
        "budget": MAYBE_INT,
        "source": STR,
        "from_step": INT,
        "steps": ListOf(INT),
        "lr": ListOf(NUMBER),
        "lr_min": ListOf(NUMBER),
        "peak": Record({"step": INT, "lr": NUMBER}, required=("step", "lr"), nullable=True),
        "note": STR,
    },
    required=("source",),
)
#: Each owned optimizer's settings when it first stepped (record/optimizer_settings.py).
OPTIMIZER_GROUP = Record(
    {
        "params": INT,
        "lr": NUMBER,
        "momentum": NUMBER,
        "dampening": NUMBER,
        "eps": NUMBER,
        "weight_decay": NUMBER,
        "betas": ListOf(NUMBER),
        "decoupled_weight_decay": BOOL,
    }
)
OPTIMIZER = Record({"class": STR, "groups": ListOf(OPTIMIZER_GROUP)}, required=("class",))
#: A verdict that arrived while the run trained (``rules.online``): the finding's fields and
#: ``seen_at``, the training step at whose boundary it arrived.
ONLINE_FINDING = Record(
    {
        "rule": STR,
        "severity": STR,
        "message": STR,
        "module": MAYBE_STR,
        "step": MAYBE_INT,
        "value": MAYBE_NUMBER,
        "threshold": MAYBE_NUMBER,
        "metric": MAYBE_STR,
        "remedy": STR,
        "seen_at": INT,
    },
    required=("rule", "severity", "message", "seen_at"),
)
ONLINE = Record(
    {
        "on_error": STR,
        "checks": INT,
        "loss_checks": INT,
        "seconds": NUMBER,
        "findings": ListOf(ONLINE_FINDING),
        "rule_errors": MapOf(STR),
    }
)

META = Record(
    {
        "schema_version": INT,
        "status": STR,
        "run_id": STR,
        "started": MAYBE_STR,
        "finished": MAYBE_STR,
        "host": STR,
        "pid": INT,
        "versions": OBJECT,
        "command": ListOf(STR),
        "config": OBJECT,
        "run": OBJECT,
        "rank": INT,
        "world_size": INT,
        "distributed": Record({"sharded": BOOL}, nullable=True),
        "model_type": MAYBE_STR,
        "loss_function": STR,
        "loss_classes": INT,
        "players": BOOL,
        "unrecorded_training": ListOf(
            Record(
                {"optimizer": STR, "steps": INT, "from_step": INT},
                required=("optimizer", "steps", "from_step"),
            )
        ),
        "loss_broadcast": Record(
            {
                "function": STR,
                "shape": ListOf(INT),
                "output_dims": ListOf(INT),
                "target_dims": ListOf(INT),
            },
            required=("function", "shape", "output_dims", "target_dims"),
        ),
        "squashed_logits": Record(
            {
                "function": STR,
                "activation": STR,
                "low": NUMBER,
                "high": NUMBER,
                "floor": MAYBE_NUMBER,
                "classes": MAYBE_INT,
            },
            required=("function", "activation"),
        ),
        "modules": ListOf(MODULE),
        "parameters": ListOf(PARAMETER),
        "parts": INT,
        "rows": INT,
        "steps": INT,
        "recorded_steps": INT,
        "first_nonfinite": MapOf(NONFINITE),
        "hooks_never_fired": MapOf(ListOf(STR)),
        "structure": STRUCTURE,
        "notes": ListOf(STR),
        "error": ERROR,
        "rank_errors": ListOf(Record(ERROR_FIELDS)),
        "tool_error": Record(
            {
                "where": STR,
                "step": INT,
                "type": STR,
                "message": STR,
                "traceback": STR,
                "rank": INT,
            },
            required=("where", "step", "type", "message"),
        ),
        "lr_plan": LR_PLAN,
        "samples_model": Record({"function": STR, "step": INT}, required=("function",)),
        "optimizers": ListOf(OPTIMIZER),
        "online": ONLINE,
        "stopped_by": Record(ONLINE_FINDING.fields, ONLINE_FINDING.required, nullable=True),
    },
    required=("schema_version", "status"),
)


def _json_kind(value: Any) -> str:
    """What a value is, in JSON's words, for the error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return "a list" if isinstance(value, list) else "an object"


ROOT = "meta.json"


def _child(where: str, key: str) -> str:
    return key if where == ROOT else f"{where}.{key}"


def _fits(value: Any, spec: Spec) -> bool:
    """Whether ``value`` has the outer type of ``spec`` (its contents are checked apart)."""
    if isinstance(spec, Kind):
        return spec.test(value)
    if isinstance(spec, ListOf):
        return isinstance(value, list)
    if isinstance(spec, Record) and spec.nullable and value is None:
        return True
    return isinstance(value, dict)


def _children(value: Any, spec: Spec, where: str) -> list[tuple[str, Any, Spec]]:
    """(where, value, spec) of each part of ``value`` that has a spec of its own."""
    if isinstance(spec, ListOf):
        return [(f"{where}[{i}]", v, spec.item) for i, v in enumerate(value)]
    if isinstance(spec, MapOf):
        return [(_child(where, str(k)), v, spec.value) for k, v in value.items()]
    if isinstance(spec, Record) and value is not None:
        return [(_child(where, k), value[k], sub) for k, sub in spec.fields.items() if k in value]
    return []


def problem(value: Any, spec: Spec, where: str = ROOT) -> str | None:
    """The first way ``value`` does not fit ``spec`` ("modules[3].name is null, expected a
    string"), or None when it fits."""
    if not _fits(value, spec):
        return f"{where} is {_json_kind(value)}, expected {spec.what}"
    if isinstance(spec, Record) and value is not None:
        missing = [key for key in spec.required if key not in value]
        if missing:
            return f"{where} has no {missing[0]!r}"
    for at, child, sub in _children(value, spec, where):
        why = problem(child, sub, at)
        if why is not None:
            return why
    return None


def check_meta(meta: Any, source: str) -> dict[str, Any]:
    """``meta`` itself when it has the shape of a run's meta.json; else ``MetaError``."""
    why = problem(meta, META)
    if why is not None:
        raise MetaError(f"{source}: {why}")
    return meta


__all__ = ["MetaError", "check_meta", "problem"]
