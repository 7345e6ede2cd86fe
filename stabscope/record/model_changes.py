"""Noticing a model that changed while it trained: a block replaced, blocks appended
(progressive stacking), an optimizer rebuilt for the new parameters.

A Recorder records the modules and parameters the model had when it was created. After a
change, the parameters that left would keep being read (their last gradient, their weights
that no longer move) and the rules would judge a model that no longer trains. The change shows
where the owned optimizers' parameters change (a new optimizer, ``add_param_group``), so that
is where the model's parameters are compared with the recorded ones: nothing is read in other
steps. The parameters that left are marked in meta.json (``left_at``) and no longer measured;
the ones that joined are named in a note and not recorded (a Recorder is created for a model).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..wording import counted
from .module_table import clean_name, mark_stepped, unwrap_model

#: How many names a note lists before it says "and N more".
_NAMES = 3


class ParameterMembership:
    """The model's parameters when recording began, and those that have left it since."""

    def __init__(self, model: nn.Module) -> None:
        self.first = {id(p) for p in unwrap_model(model).parameters()}
        self.departed: set[int] = set()  # ids of recorded parameters no longer in the model
        self.joined: set[int] = set()  # ids of parameters that joined it, once said

    def update(
        self,
        model: nn.Module,
        table: list[dict[str, Any]],
        params: list[tuple[str, nn.Parameter]],
        held: set[int],
        step: int,
    ) -> str | None:
        """Mark ``table``'s records (meta.json's ``parameters``) as held or not by the owned
        optimizers (``held``) and as left at ``step``; a note for meta.json when parameters
        left the model now or joined it (each joined parameter named once), else None."""
        inner = unwrap_model(model)
        live = {id(p) for p in inner.parameters()}
        left = mark_stepped(table, params, held, live, step)
        new = [(n, p) for n, p in inner.named_parameters() if id(p) not in self.first]
        joined = [clean_name(n) for n, p in new]
        if not left and all(id(p) in self.joined for _, p in new):
            return None  # nothing left, and what joined was said before (or nothing did)
        self.joined.update(id(p) for _, p in new)
        said = []
        if left:
            gone = set(left)
            self.departed.update(id(p) for name, p in params if name in gone)
            said.append(f"{_listed(left)} left it and are not recorded from step {step} on")
        if joined:  # adapters put into the model (LoRA), a head added: trained, not recorded
            said.append(f"{_listed(joined)} joined it and are not recorded")
        return (
            f"the model changed before step {step}: {'; '.join(said)} (a Recorder records the "
            "model it was created for: create one for the changed model to record it whole)"
        )


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES])
    more = f" and {len(names) - _NAMES} more" if len(names) > _NAMES else ""
    return f"{counted(len(names), 'parameter')} ({shown}{more})"
