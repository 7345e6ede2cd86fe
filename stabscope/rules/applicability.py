"""Why a rule whose metrics a run lacks does not apply to its model, rather than went
unrecorded: the attention and residual probes are built from the blocks structure discovery
found (``probes/structured.py``), so a model without residual blocks, or whose blocks hold no
attention, never has their metrics, whatever the preset. ``check`` says so apart from the rules
a richer preset would have run."""

from __future__ import annotations

from ..metrics import METRICS
from ..store.structure import Structure

#: How the reason of a rule that does not apply to the model begins.
INAPPLICABLE = "does not apply: "
#: The probes written only for blocks structure discovery found (``Metric.probe``).
BLOCK_PROBES = frozenset({"attention", "residual", "correlation"})
_PROBE = {m.name: m.probe for m in METRICS}


def inapplicable(needs: tuple[str, ...], structure: Structure | None) -> str | None:
    """Why metrics ``needs`` cannot exist for this model (the reason, after
    ``INAPPLICABLE``), or None where a preset or probe could record them."""
    probes = {_PROBE.get(name) for name in needs}
    if structure is None or not probes or not probes <= BLOCK_PROBES:
        return None
    if not structure.blocks:
        return f"{INAPPLICABLE}no residual blocks were found in the model"
    if probes == {"attention"} and not structure.attention:
        return f"{INAPPLICABLE}no attention was found in the model's blocks"
    return None
