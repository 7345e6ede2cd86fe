"""What heavy residual dependency means under each norm placement, and what to do about it.

Admin (Liu et al. 2020) writes the stream after branch i as Σ_j β_{i,j}·â_j over unit-variance
components and shows that a layer leaning on its own branch (large β_{i,i}) amplifies
parameter updates: the output change grows like Σ_i β_{i,i}², O(N) for Post-LN, O(log N) for
Pre-LN. What a large β_{i,i} says, and the remedy, depend on where the norms sit, which
structure discovery recorded per branch (meta.json ``structure``).
"""

from __future__ import annotations

import numpy as np

from ..store.structure import Structure
from ..theory.deepnorm import deepnorm_constants

LABEL = {
    "pre": "Pre-LN",
    "post": "Post-LN",
    "deepnorm": "DeepNorm",
    "none": "no norm",
    "unknown": "norm placement not detected",
    "mixed": "mixed norm placements",
}


def branch_placements(structure: Structure | None) -> dict[str, str]:
    """Branch name -> ``pre`` | ``post`` | ``deepnorm`` | ``none`` (no norm found)."""
    return {
        br.name: (br.placement if br.norm else "none")
        for br in (structure.branches if structure else [])
    }


def all_pre_ln(structure: Structure | None) -> bool:
    """Whether blocks were found and every one of them is Pre-LN."""
    blocks = structure.blocks if structure is not None else []
    return bool(blocks) and all(b.placement == "pre" for b in blocks)


def judged(placement: np.ndarray, position: np.ndarray, beta_ii: float) -> np.ndarray:
    """Which branches the β_{i,i} threshold can judge (a boolean per branch).

    A Pre-LN stream carries every earlier branch unnormalised, so with branches of one scale
    β_{i,i}² = Var f_i / (Var x_0 + Σ_{j≤i} Var f_j), up to 1/(i+1) (i = the branch's position
    in its stack, from 0): the first branches of any Pre-LN stack pass 0.4 by that alone,
    which is the light dependency Admin finds for Pre-LN (output change O(log N)). So a
    Pre-LN branch is judged only where accumulation alone would keep it below the threshold,
    1/sqrt(i+1) ≤ threshold (branch 7 of a stack on, counting from 1, at 0.4); above it
    there, it carries more variance than the average of the stream's earlier parts. Post-LN,
    DeepNorm and unknown placements renormalise (or may) after every branch: all are judged.
    """
    ceiling = 1.0 / np.sqrt(np.asarray(position, dtype=float) + 1.0)
    return (np.asarray(placement) != "pre") | (ceiling <= beta_ii)


def first_judged_pre_ln(beta_ii: float) -> int | None:
    """The 1-based place in its stack of the first Pre-LN branch that ``judged`` keeps (None
    for a threshold ≤ 0, which judges none)."""
    if not beta_ii > 0:
        return None
    return int(np.ceil(1.0 / beta_ii**2 - 1.0 - 1e-9)) + 1


def when(step: int) -> str:
    """Which step the β matrix was read at, said honestly: init only at step 0."""
    if step == 0:
        return "at init (step 0)"
    updates = "update" if step == 1 else "updates"
    return (
        f"at step {step}, the first recorded with β (after {step} optimizer {updates}, not at init)"
    )


def _stack_depths(structure: Structure | None) -> tuple[int, int]:
    """(encoder, decoder) layer counts; a decoder- or encoder-only stack counts as decoder."""
    blocks = structure.blocks if structure else []
    encoder = sum(b.stack == "encoder" for b in blocks)
    return encoder, len(blocks) - encoder


def _deepnorm_constants(structure: Structure | None) -> str:
    """DeepNet's α and init gain β for this model's depth, as text (the formulas when the
    depth is unknown)."""
    encoder, decoder = _stack_depths(structure)
    if encoder + decoder == 0:
        return "α=(2N)^(1/4), init gain β=(8N)^(-1/4) for N layers"
    constants = deepnorm_constants(encoder, decoder)
    if encoder and decoder:
        enc, dec = constants["encoder"], constants["decoder"]
        return (
            f"encoder α={enc.alpha:.3g}, init gain β={enc.beta:.3g}; decoder "
            f"α={dec.alpha:.3g}, β={dec.beta:.3g} for {encoder} encoder and {decoder} decoder "
            "layers"
        )
    one, n = constants[""], encoder + decoder
    return f"α=(2N)^(1/4)={one.alpha:.3g}, init gain β=(8N)^(-1/4)={one.beta:.3g} for N={n} layers"


def explain(placement: str, structure: Structure | None) -> tuple[str, str]:
    """(what the heavy dependency means, remedy) for the heavy branches' placement."""
    constants = _deepnorm_constants(structure)
    deepnorm = f"DeepNorm ({constants})"
    if placement == "post":
        return (
            "in this Post-LN stack each layer leans on its own branch, which amplifies "
            "parameter updates",
            f"Admin init (scale each residual by its profiled ω, see res_omega), Pre-LN, or "
            f"{deepnorm}",
        )
    if placement == "deepnorm":
        return (
            "this DeepNorm stack still leans on its branches: its α up-weights the stream "
            "too little for the depth, or the branch weights are not scaled down",
            f"DeepNet's constants, {constants} (α on the residual, β the xavier_normal gain of "
            "the value, output and feed-forward weights; see deepnorm-constants)",
        )
    if placement == "pre":
        return (
            "in this Pre-LN stack the branches outgrow the stream they join (each carries "
            "more variance than the average of the stream's earlier parts), so the output "
            "leans on each branch as in Post-LN instead of diluting it",
            "scale each branch's output projection down with depth (e.g. GPT-2's 1/sqrt(2N) "
            "init of the projections that write into the stream), and check for a branch "
            "whose output grows with depth at init",
        )
    return (
        "each layer leans on its own branch, which amplifies parameter updates "
        f"({LABEL.get(placement, placement)})",
        f"if the norms sit after the residual add (Post-LN): Admin init, Pre-LN, or {deepnorm}",
    )
