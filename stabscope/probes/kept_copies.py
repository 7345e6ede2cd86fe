"""Pre-step weight copies carried over from one recorded step to the next (CPU kernels only).

The update norm ‖θ_after − θ_before‖ needs the weights from before ``optimizer.step()``. Made
in the pre-step pass, the copy costs a write of every weight plus the read of each cache line it
overwrites (the line is fetched before it is written), on top of reading the weights for their
norms: on the sample GPT (4.9M weights) 2.5 ms, against 1.1 ms for its gradients' norms alone
(measured inside training steps on the 2-core CI machine).

When the next step is recorded too, the post-step pass, which reads the copy anyway for the
difference, writes the new weights over it in the same pass (``host_params.advance``) and also
returns their squares. The next step's pre-step pass then takes that copy as its "before"
weights and those squares as its weight norms, and reads only the gradients.

The copy is used only if nothing changed the weights in between: every parameter keeps its
storage address and version counter (bumped by every in-place op on it, the optimizer's
included), and ``SAMPLES`` evenly spaced elements of it, first and last included, still equal
the copy's. A weight changed through ``.data`` (which has a version counter of its own) is
caught only where it changes a sampled element: a scaling, normalisation or reload of the
weights changes them all, but a clamp of a few elements (WGAN-style weight clipping through
``.data``) may pass unseen and would then count into the next step's update. Changing weights
in place under ``torch.no_grad()`` instead of through ``.data`` is always seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import host_params

#: Elements of each weight compared with the kept copy. Each is a cache and TLB miss: every
#: 64th element (77K samples) measured 1.9 ms a step on the sample GPT, 4 per tensor ~0.1 ms.
SAMPLES = 4


@dataclass
class KeptCopies:
    """Copies of the weights (``which`` indexes the probe's parameters) after an optimizer step,
    with their sums of squares and what identifies the weights they were taken from."""

    which: list[int]
    buffers: list[torch.Tensor]
    squares: np.ndarray  # (len(which),) float64: Σθ² of each copy
    versions: list[int]
    addresses: list[int]

    @classmethod
    def taken(
        cls,
        which: list[int],
        weights: list[torch.Tensor],
        buffers: list[torch.Tensor],
        squares: np.ndarray,
    ) -> KeptCopies:
        return cls(
            which,
            buffers,
            squares,
            [w._version for w in weights],
            [w.data_ptr() for w in weights],
        )

    def hold(self, which: list[int], weights: list[torch.Tensor]) -> bool:
        """Whether the copies still equal ``weights`` (the same parameters, unchanged)."""
        if which != self.which or len(weights) != len(self.buffers):
            return False
        for w, version, address in zip(weights, self.versions, self.addresses):
            if w._version != version or w.data_ptr() != address:
                return False
        return host_params.same_samples(weights, self.buffers, SAMPLES)
