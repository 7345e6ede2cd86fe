"""Gradient and update norms of every step, recorded or not, kept on the device.

Per step, at module ``__run__``:

- ``grad_norm``: the global L2 gradient norm *before* clipping: the norm the script's clip
  computed (``clip_sites.py``) where it clips, else the norm of the gradients the optimizer
  step received (nothing was clipped: the same number);
- ``grad_norm_clipped``: where a clip was seen, the norm of the gradients the optimizer step
  received, after the clip: the clip's total times its factor where one clip by the L2 norm
  covered exactly the optimizer's gradients (no pass), else one ``_foreach_norm``. A clip
  inside ``optimizer.step()`` (a ``ClippedSGD(SGD)`` whose ``step`` clips first) runs after
  the step's pre-hook: the norm is then taken again after the step, of the clipped gradients
  the update used.

Per residual block (the structure's blocks, once known), when ``step_updates`` is on, at
every recorded step and every ``step_updates_every``-th step (10 by default) between:

- ``block_param_norm``: ||θ|| of the block's parameters just before ``optimizer.step()``;
- ``block_update_norm``: ||Δθ|| across it; ``block_update_ratio``: their ratio (no row where
  ||θ|| = 0, as ``update_ratio``).

The update needs a copy of the block parameters before the step: model-sized memory, kept
across steps, and one copy plus one difference pass per measured step (on CPU with the
``fast`` extra, numba's one-read kernels of ``probes/kernels/host_params.py``).
``step_updates = None`` (the default) turns it on while the blocks hold at most
``MAX_COPIED`` values, and off with a note above that. Everything is computed on the device
and waits, like the loss, for the next host sync (``losses.PendingLosses``); ``take`` hands
over one step's tensors.

- ``grad_not_zeroed``: 1.0 at a step whose optimizer step received gradients that were never
  zeroed since the step before (``stale_grads``: a loop without ``zero_grad``).

With gradient accumulation the norms are of the accumulated gradient the optimizer steps on.
Under DDP the gradients the optimizer receives are the averaged ones, and a clip sees them
averaged too. Under FSDP (a sharded run) both norms are of this rank's shards, the clip's
included (``clip_sites``): the ranks' rows merge root-sum-square to the full norms.

An fp16 ``GradScaler`` unscales before the clip (``scaler.unscale_``) or inside
``scaler.step``: both are before the optimizer step, so no norm is of scaled gradients; a
step the scaler skips has no ``optimizer.step()`` and keeps only a clip's (non-finite) norm.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..probes.kernels import host_params
from .clip_sites import l2_norm
from .collector import Rows
from .distributed import local_tensor
from .stale_grads import GradMark, StaleWatches

#: The block parameters are copied before each step (for ||Δθ||) up to this many values.
MAX_COPIED = 100_000_000

_TRAIN = "train"
Decoder = Callable[[np.ndarray, Rows, int], None]


class StepNorms:
    """This step's gradient norms (before and after clipping) and block update norms."""

    def __init__(
        self, params: list[tuple[str, nn.Parameter]], run_code: int, step_updates: bool | None
    ) -> None:
        self.named = params
        self.param_ids = {id(p) for _, p in params}
        self.run_code = run_code
        self.step_updates = step_updates
        self.note: str | None = None  # why the block updates are off, when they are
        self._clips: dict[int, torch.Tensor] = {}  # first parameter's id -> pre-clip norm
        # first parameter's id -> the gradients that clip saw (``GradMark``)
        self._clip_marks: dict[int, GradMark | None] = {}
        # The one clip of the step whose norm after it is known without a pass: (ids of the
        # parameters it clipped, that norm).
        self._after: tuple[frozenset[int], torch.Tensor] | None = None
        self._seen: dict[int, torch.Tensor] = {}  # optimizer id -> norm of its gradients
        # The optimizer between its step's pre- and post-hook (id, ids of its parameters), and
        # those whose own step clipped: their norm in _seen is from before that clip.
        self._stepping: tuple[int, frozenset[int]] | None = None
        self._clipped_inside: set[int] = set()
        self._blocks: _BlockUpdates | None = None
        self._stale: StaleWatches | None = None  # from watch() to release()

    def watch(self) -> None:
        """Start the stale-gradient watch on the first trained parameter (a hook on the
        user's model: taken when the run opens, given back by ``release``)."""
        trained = next((p for _, p in self.named if p.requires_grad), None)
        if self._stale is None and trained is not None:
            self._stale = StaleWatches(self.param_ids)
            self._stale.watch(trained)

    # -- gradient norms -----------------------------------------------------------------
    def on_clip(
        self, params: list[torch.Tensor], norm: torch.Tensor, after: torch.Tensor | None = None
    ) -> None:
        """A clip of ``params`` whose gradient norm before clipping was ``norm`` (and after
        it ``after``, when the clip knows it). The first clip of a parameter set in a step
        counts (a second one sees clipped gradients)."""
        owned = [p for p in params if id(p) in self.param_ids]
        if not owned:
            return  # another model's clip
        if self._stepping is not None and id(owned[0]) in self._stepping[1]:
            self._clipped_inside.add(self._stepping[0])  # norm again after the step
        mark = GradMark.of(owned)
        known = self._clip_marks.get(id(owned[0]))
        # Other gradients than the earlier clip's: a new tensor, or more in-place changes
        # since than that clip's own scaling (zeroed, then accumulated into again).
        fresh = mark is not None and known is not None and known.changed_by_more_than(mark, 1)
        if id(owned[0]) in self._clips and not fresh:
            self._after = None  # clipped again: its factor is not the first clip's alone
            return
        # The first clip of these gradients; or new gradients since the step's earlier clip:
        # the script dropped those (a spike guard's ``zero_grad(); continue``) and no step
        # used them, so this clip's norm is the one of the gradients the step will receive.
        self._clips[id(owned[0])] = norm
        self._clip_marks[id(owned[0])] = mark
        first = len(self._clips) == 1 and after is not None
        # All the clip's tensors, the model's and any beside it (a temperature the same
        # optimizer steps): its norm covers them all.
        self._after = (frozenset(map(id, params)), after) if first else None

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, updates: bool = True) -> None:
        """Just before ``optimizer.step()`` (after its closure): the gradients it receives;
        ``updates``: whether this step measures the block update norms (``step_updates_every``)."""
        params = self._stepped_params(optimizer)
        known = self._after
        if known is not None and known[0] == {id(p) for p in params}:
            # The step's one clip covered exactly these gradients and scaled them by one
            # factor: their norm is its norm after the clip, without a pass (nanoGPT, the HF
            # Trainer and Lightning clip this way).
            norm: torch.Tensor | None = known[1]
        else:
            norm = l2_norm(p.grad for p in params)
        if norm is not None:
            self._seen[id(optimizer)] = norm
        self._stepping = (id(optimizer), frozenset(map(id, params)))
        if self._blocks is not None and updates:
            self._blocks.before(optimizer)

    @staticmethod
    def _stepped_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """Every tensor ``optimizer`` steps, in its group order: the model's parameters and
        any beside them (a learnable temperature kept outside the model), each once."""
        params = {id(p): p for g in optimizer.param_groups for p in g["params"]}
        return list(params.values())

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._stepping = None
        if self._stale is not None:
            self._stale.after_optimizer_step(optimizer)
        if id(optimizer) in self._clipped_inside:
            # The step clipped its own gradients after the pre-hook read them: the update used
            # the clipped ones, still in .grad (an optimizer step does not write its grads).
            self._clipped_inside.discard(id(optimizer))
            norm = l2_norm(p.grad for p in self._stepped_params(optimizer))
            if norm is not None:
                self._seen[id(optimizer)] = norm
        if self._blocks is not None:
            self._blocks.after(optimizer)

    # -- blocks -----------------------------------------------------------------------------
    def set_blocks(self, blocks: list[tuple[str, int]]) -> None:
        """The residual blocks as (name, module code): their parameters are those named
        ``name.*``. Decides whether the update norms are on (``step_updates``)."""
        if self.step_updates is False or not blocks:
            return
        members = [
            (i, p)
            for i, (name, _) in enumerate(blocks)
            for pname, p in self.named
            if pname.startswith(name + ".")
        ]
        size = sum(p.numel() for _, p in members)
        if self.step_updates is None and size > MAX_COPIED:
            self.note = (
                f"block update norms every step are off: the blocks hold {size:,} values, "
                f"over {MAX_COPIED:,} (a copy of them per step); step_updates = true turns "
                "them on"
            )
            return
        if members:
            self._blocks = _BlockUpdates(members, np.array([c for _, c in blocks]))

    # -- the step's values ------------------------------------------------------------------
    def take(self) -> list[tuple[torch.Tensor, Decoder]]:
        """This step's device tensors with their decoders; clears the step."""
        out: list[tuple[torch.Tensor, Decoder]] = []
        clips, seen = list(self._clips.values()), list(self._seen.values())
        self._clips, self._seen, self._after = {}, {}, None
        self._clip_marks = {}
        self._clipped_inside.clear()
        self._stepping = None
        pre = _rss(clips) if clips else _rss(seen)
        if pre is not None:
            post = _rss(seen) if clips else None
            values = pre.reshape(1) if post is None else torch.stack((pre, post.to(pre.device)))
            out.append((values, self._decode_grads))
        if self._blocks is not None:
            taken = self._blocks.take()
            if taken is not None:
                out.append(taken)
        if self._stale is not None and self._stale.take():
            out.append((torch.ones(1), self._decode_stale))
        return out

    def _decode_stale(self, values: np.ndarray, rows: Rows, step: int) -> None:
        rows.emit(_TRAIN, self.run_code, 0, "grad_not_zeroed", values[0], step=step)

    def _decode_grads(self, values: np.ndarray, rows: Rows, step: int) -> None:
        rows.emit(_TRAIN, self.run_code, 0, "grad_norm", values[0], step=step)
        if len(values) > 1:
            rows.emit(_TRAIN, self.run_code, 0, "grad_norm_clipped", values[1], step=step)

    def release(self) -> None:
        self._blocks = None
        self._clips, self._seen, self._after = {}, {}, None
        if self._stale is not None:
            self._stale.release()
            self._stale = None


def _rss(norms: list[torch.Tensor]) -> torch.Tensor | None:
    """The norm over several disjoint parameter sets (root-sum-square), 0-d on device."""
    if not norms:
        return None
    if len(norms) == 1:
        return norms[0].float()
    return torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))


class _BlockUpdates:
    """||θ|| and ||Δθ|| per block around each optimizer step, from a kept copy of the block
    parameters (allocated once)."""

    def __init__(self, members: list[tuple[int, nn.Parameter]], codes: np.ndarray) -> None:
        self.params = [p for _, p in members]
        self.block = torch.tensor([b for b, _ in members])  # (P,) block of each parameter
        self.codes = codes  # (B,) module codes of the blocks
        self.ids = {id(p): i for i, p in enumerate(self.params)}
        self._copies: list[torch.Tensor] | None = None
        self._which: dict[int, list[int]] = {}  # optimizer id -> indices it steps
        self._weights = torch.zeros(0)  # (P,) squared norms before the step
        self._updates = torch.zeros(0)  # (P,) squared update norms
        self._touched = torch.zeros(0)  # (P,) 1 where an optimizer stepped it this step
        self._stepped = False

    def before(self, optimizer: torch.optim.Optimizer) -> None:
        stepped = [p for g in optimizer.param_groups for p in g["params"]]
        which = [self.ids[id(p)] for p in stepped if id(p) in self.ids]
        if not which:
            return
        if self._copies is None:
            self._copies = [torch.empty_like(local_tensor(p.detach())) for p in self.params]
            device = self._copies[0].device
            self._weights = torch.zeros(len(self.params), device=device)
            self._updates = torch.zeros(len(self.params), device=device)
            self._touched = torch.zeros(len(self.params), device=device)
            self.block = self.block.to(device)
        if not self._stepped:
            self._weights.zero_()
            self._updates.zero_()
            self._touched.zero_()
        self._touched[which] = 1.0
        weights = [local_tensor(self.params[i].detach()) for i in which]
        copies: list[torch.Tensor | None] = [self._copies[i] for i in which]
        if host_params.usable(weights, copies):  # CPU: norms and copy in one read (numba)
            squares = host_params.squares_and_copy(weights, [None] * len(which), copies)[:, 0]
            self._weights[which] = torch.from_numpy(squares).float()
        else:
            torch._foreach_copy_(copies, weights)
            self._weights[which] = _squares(weights, self._weights.device)
        self._which[id(optimizer)] = which
        self._stepped = True

    def after(self, optimizer: torch.optim.Optimizer) -> None:
        which = self._which.pop(id(optimizer), None)
        if not which or self._copies is None:
            return
        copies = [self._copies[i] for i in which]
        weights = [local_tensor(self.params[i].detach()) for i in which]
        if host_params.usable(weights, copies):  # CPU: one read of each, nothing written
            squares = host_params.difference_squares(weights, copies)
            self._updates[which] = torch.from_numpy(squares).float()
        else:
            torch._foreach_sub_(copies, weights)
            self._updates[which] = _squares(copies, self._updates.device)

    def take(self) -> tuple[torch.Tensor, Decoder] | None:
        if not self._stepped:
            return None
        self._stepped = False
        blocks = len(self.codes)
        sums = torch.zeros(3, blocks, device=self._weights.device)
        sums[0].index_add_(0, self.block, self._weights)
        sums[1].index_add_(0, self.block, self._updates)
        sums[2].index_add_(0, self.block, self._touched)  # its parameters stepped (a count)
        return sums.sqrt_(), self._decode

    def _decode(self, values: np.ndarray, rows: Rows, step: int) -> None:
        # A block none of whose parameters an optimizer stepped (frozen, or replaced by a
        # new block mid-run) has no rows: its norms here would read 0, not its weights'.
        weight, update, touched = values.reshape(3, -1)
        stepped = touched > 0
        codes, weight, update = self.codes[stepped], weight[stepped], update[stepped]
        rows.emit(_TRAIN, codes, 0, "block_param_norm", weight, step=step)
        rows.emit(_TRAIN, codes, 0, "block_update_norm", update, step=step)
        defined = weight != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = update / weight
        rows.emit(_TRAIN, codes[defined], 0, "block_update_ratio", ratio[defined], step=step)


def _squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(len,) float32 sums of squares, on ``device``."""
    norms = torch._foreach_norm(tensors)
    return torch.stack([n.to(device, torch.float32) for n in norms]).square_()
