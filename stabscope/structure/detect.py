"""Finding residual blocks, their branches and norm placement from a traced forward pass.

Names are only hints. A residual add is claimed only when a tensor observed later in the
block equals α·x + f to float precision, where x is the stream going in and f the output of
a module that ran after x was produced. A norm whose *input* is that sum makes the branch
Post-LN (α = 1) or DeepNorm-style (α ≠ 1); a norm whose *output* feeds the branch makes it
Pre-LN. Blocks where no add can be verified are left out: a wrong guess is worse than none.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..store.structure import AttentionInfo, Block, Branch, Structure, unrecognised
from .kinds import (
    block_candidates,
    count_heads,
    inner_stack,
    is_attention,
    is_cross_attention,
    is_mlp,
    is_norm,
    outermost,
    stack_of,
)
from .trace import Call, Trace
from .transformed import rearranged_branch, reshaped_alike, transformed_branch

_TOL = 1e-4
#: A parallel block's two added terms are looked for among this many latest-finishing
#: module outputs before the sum (pairs of them: at most 15 checks a candidate sum).
PAIRED = 6


def tolerance(t: torch.Tensor) -> float:
    """The relative error allowed in t = α·x + f: ``_TOL``, or the precision of t's dtype
    where that is coarser. A sum stored in bfloat16 (under ``torch.autocast``) is rounded to
    8 bits of mantissa: each element within eps/2 of the exact sum (bf16: eps 7.8e-3), so
    the norm of the difference is too."""
    eps = torch.finfo(t.dtype).eps if t.dtype.is_floating_point else 0.0
    return max(_TOL, eps)


#: The layouts tried for a branch output of the sum's sizes in another order: at most this
#: many permutations (all five of a (B, C, H, W) stream whose C = H = W).
LAYOUTS = 6


def onto(w: torch.Tensor, t: torch.Tensor) -> list[tuple[int, ...]]:
    """The permutations p, other than none, with ``w.permute(p)`` of t's shape: w's shape is
    t's in another order (ConvNeXt's MLP runs channels-last, (B, H, W, C), and its output is
    permuted back onto the (B, C, H, W) stream before the add), or t's own where sizes
    repeat (H = W, or C = H = W). Tried only after w as it is."""
    if w.dim() != t.dim() or sorted(w.shape) != sorted(t.shape):
        return []
    out: list[tuple[int, ...]] = []
    for p in itertools.permutations(range(w.dim())):
        if p != tuple(range(w.dim())) and all(w.shape[i] == n for i, n in zip(p, t.shape)):
            out.append(p)
            if len(out) == LAYOUTS:
                break
    return out


def _inverse(p: tuple[int, ...]) -> tuple[int, ...]:
    """q with ``v.permute(p).permute(q)`` equal to v."""
    q = [0] * len(p)
    for i, j in enumerate(p):
        q[j] = i
    return tuple(q)


def _misfit(t: torch.Tensor, x: torch.Tensor, f: torch.Tensor, alpha: float) -> float:
    """|t - α·x - f| / |t|: how far t is from the sum α·x + f (all flat, float64)."""
    return float((t - f - alpha * x).norm() / (t.norm() + 1e-12))


def residual_alpha(t: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> float | None:
    """α with t = α·x + f to the precision t is stored in, or None. The three may differ in
    shape up to a reshape that keeps the feature dimension: HF's OPT runs its FFN on the
    stream flattened to (batch·tokens, d) and adds it there, then views the sum back to
    (batch, tokens, d). Elements are compared in order, so only a true reshape matches."""
    if t is f or t is x or t.dim() == 0 or not reshaped_alike(t, x, f):
        return None
    tol = tolerance(t)
    # Cheap filter on a strided sample before the exact check on everything.
    n = t.numel()
    stride = max(1, n // 256)
    for sl in (slice(0, n, stride), slice(None)):
        tt, xx, ff = (v.detach().reshape(-1)[sl].double() for v in (t, x, f))
        xx_sq = torch.dot(xx, xx)
        if xx_sq <= 0:
            return None
        alpha = float(torch.dot(tt - ff, xx) / xx_sq)
        if not (_misfit(tt, xx, ff, alpha) < tol and 0.05 < alpha < 50):
            return None
    return alpha


def analyse_block(trace: Trace, block: Call) -> tuple[list[Branch], list[AttentionInfo]]:
    """Walk a block's calls, finding residual adds one after another."""
    inner = trace.descendants(block)
    attention = [
        c
        for c in inner
        if is_attention(c)
        and not any(is_attention(trace.calls[p]) for p in _ancestors(trace, c, block))
    ]
    inline = _inline_attention(trace, block, inner) if not attention else InlineAttention()
    attention += [trace.calls[i] for i in inline.holders]
    infos = [AttentionInfo(c.name, *count_heads(c.module)) for c in attention]
    if block.input is None or block.output is None:
        return [], infos
    # Tensors observed in the block, with the time they were seen: candidate sums.
    seen = [(c.start, c.input, c) for c in inner if c.input is not None]
    seen += [(c.end, c.output, c) for c in inner if c.output is not None]
    seen.append((block.end, block.output, block))
    seen.sort(key=lambda e: e[0])

    def next_add(stream: torch.Tensor, since: int):
        """The first tensor seen after ``since`` that equals α·stream + f."""
        for time, t, consumer in seen:
            if time <= since or t is stream:
                continue
            producers = [
                c
                for c in inner
                if c.start > since
                and c.end < time
                and c.output is not None
                and not (is_norm(c.module) and c.input is stream)
            ]
            outputs = {id(c.output): c.output for c in producers}.values()
            # Latest-finishing producers first: the module whose output *is* the added term.
            latest = sorted(outputs, key=lambda o: -max(c.end for c in producers if c.output is o))

            def maker(w: torch.Tensor, producers: list[Call] = producers) -> Call:
                return max((c for c in producers if c.output is w), key=lambda c: c.end)

            for w in latest:
                for wt in (w, *(w.permute(p) for p in onto(w, t))):
                    alpha = residual_alpha(t, stream, wt)
                    if alpha is not None:
                        return time, t, consumer, (maker(w),), alpha, False
            # A parallel block (GPT-J, GPT-NeoX, Phi): x + attn(LN1 x) + mlp(LN2 x) in one
            # sum, no tensor between: two branch outputs added to the stream at once.
            for i, w1 in enumerate(latest[:PAIRED]):
                for w2 in latest[i + 1 : PAIRED]:
                    if w1.numel() != w2.numel() or w1.shape[-1] != w2.shape[-1]:
                        continue
                    alpha = residual_alpha(t, stream, w1 + w2.reshape(w1.shape))
                    if alpha is not None:
                        pair = sorted((maker(w1), maker(w2)), key=lambda c: c.start)
                        return time, t, consumer, tuple(pair), alpha, False
            # x + h(w): an activation, a gate or dropout applied to the module's output inline.
            for w in latest[:PAIRED]:
                # Read in w's layout, where a gate per channel is one per last dim: a branch
                # computed channels-last and permuted back onto a channels-first stream.
                layouts = onto(w, t) if stream.shape == t.shape else []
                for back in ((), *(_inverse(p) for p in layouts)):
                    tw, xw = (v.permute(back) if back else v for v in (t, stream))
                    if transformed_branch(tw, xw, w, tolerance(t)):
                        return time, t, consumer, (maker(w),), 1.0, True
            for w in latest[:PAIRED]:
                if rearranged_branch(t, stream, w, tolerance(t)):
                    return time, t, consumer, (maker(w),), 1.0, True
        return None

    branches: list[Branch] = []
    stream, since = block.input, block.start
    found = next_add(stream, since)
    while found is not None:
        time, t, consumer, makers, alpha, transformed = found
        out_call = makers[-1]
        norm_after = (
            consumer
            if (consumer is not block and consumer.input is t and is_norm(consumer.module))
            else None
        )
        # Pre-LN keeps adding to the sum itself; Post-LN continues from the norm's output.
        keep_sum = next_add(t, time)
        after_norm = (
            None
            if norm_after is None or norm_after.output is None
            else next_add(norm_after.output, norm_after.end)
        )
        if keep_sum is not None and after_norm is not None and keep_sum[1] is after_norm[1]:
            # One later sum read both ways. A branch that adds next to nothing (a small init:
            # |f| ~ 1e-3 |x|) leaves the norm's output within the tolerance of the sum
            # itself, so both fit; the stream it really adds to fits exactly.
            assert norm_after is not None and norm_after.output is not None
            if _found_misfit(after_norm, norm_after.output) <= _found_misfit(keep_sum, t):
                keep_sum = None
            else:
                after_norm = None
        is_post = (
            norm_after is not None
            and keep_sum is None
            and (after_norm is not None or norm_after.output is block.output)
        )
        if len(makers) == 1:
            # The sum is first seen as its pre-norm's input, so that norm starts at `since`.
            pre_norm = next(iter(_stream_norms(inner, stream, since, out_call)), None)
            covered = [
                c
                for c in inner
                if c.start > since and c.end <= out_call.end and not is_norm(c.module)
            ]
            spans = [(out_call, pre_norm, covered)]
        else:  # parallel: each branch from its own norm of the stream
            # makers are in start order; the later branch's own calls run after the earlier
            # one's output is made (GPT-J and Phi feed both from one norm: attn, then mlp).
            spans = [
                _parallel_span(inner, stream, since, m, makers[0] if i else None)
                for i, m in enumerate(makers)
            ]
        for made, pre_norm, covered in spans:
            around = [trace.calls[p] for p in _ancestors(trace, made, block)]
            branches.append(
                _branch(
                    block,
                    covered,
                    made,
                    norm_after if is_post else None,
                    pre_norm,
                    alpha,
                    around,
                    transformed,
                    inline,
                )
            )
        if is_post:
            stream, since, found = norm_after.output, norm_after.end, after_norm  # type: ignore[union-attr]
        else:
            stream, since, found = t, time, keep_sum
    return branches, infos


@dataclass(frozen=True)
class InlineAttention:
    """Attention computed by no attention module (attention_calls.py): the calls in the
    block that ran it (the block itself, or a child not named as attention), and the times
    of those the block's own forward ran."""

    holders: tuple[int, ...] = ()
    own: tuple[int, ...] = ()


def _inline_attention(trace: Trace, block: Call, inner: list[Call]) -> InlineAttention:
    """Where ``block`` attends without an attention module: a hand-written block calling
    ``F.scaled_dot_product_attention`` on its own ``qkv`` projection."""
    inside = {block.index} | {c.index for c in inner}
    calls = [(t, i) for t, i in trace.attending if i in inside and block.start < t < block.end]
    holders = tuple(dict.fromkeys(i for _, i in calls))  # in the order they first attended
    return InlineAttention(holders, tuple(t for t, i in calls if i == block.index))


def _found_misfit(found: tuple, stream: torch.Tensor) -> float:
    """``_misfit`` of a sum ``next_add`` found, (time, t, consumer, makers, α,
    transformed), with the makers' outputs added up as its f; 1 for a transformed one,
    whose f is no module's output: any exact fit ranks first."""
    _, t, _, makers, alpha, transformed = found
    if transformed:
        return 1.0
    flat = [v.detach().reshape(-1).double() for v in (t, stream)]
    f = sum(m.output.detach().reshape(-1).double() for m in makers)
    return _misfit(flat[0], flat[1], f, alpha)


def _stream_norms(inner: list[Call], stream: torch.Tensor, since: int, made: Call) -> list[Call]:
    """The norms that read ``stream`` from ``since`` and ended before ``made`` started, in
    call order: the candidates for the pre-norm of the branch ``made`` writes."""
    return [
        c
        for c in inner
        if is_norm(c.module) and c.input is stream and c.start >= since and c.end < made.start
    ]


def _parallel_span(
    inner: list[Call], stream: torch.Tensor, since: int, made: Call, earlier: Call | None
) -> tuple[Call, Call | None, list[Call]]:
    """One branch of a parallel block: (the call whose output it adds, the last norm of the
    stream before it, the calls from that norm, or from the ``earlier`` branch's output when
    that came later, to it)."""
    norms = _stream_norms(inner, stream, since, made)
    pre_norm = max(norms, key=lambda c: c.end) if norms else None
    start = pre_norm.end if pre_norm is not None else since
    if earlier is not None:
        start = max(start, earlier.end)
    covered = [c for c in inner if c.start > start and c.end <= made.end and not is_norm(c.module)]
    return made, pre_norm, covered


def _ancestors(trace: Trace, call: Call, stop: Call) -> list[int]:
    out, p = [], call.parent
    while p is not None and p != stop.index:
        out.append(p)
        p = trace.calls[p].parent
    return out


def _branch(
    block: Call,
    covered: list[Call],
    out_call: Call,
    post_norm: Call | None,
    pre_norm: Call | None,
    alpha: float,
    around: list[Call],
    transformed: bool = False,
    inline: InlineAttention | None = None,
) -> Branch:
    # ``around``: the calls inside the block that enclose out_call, innermost first. A module
    # that adds the stream itself (BLOOM's attention and MLP, MPT's MLP take the residual as an
    # argument) makes f inside it, so it ends after the sum and is not among ``covered``.
    inline = inline or InlineAttention()

    def attends(c: Call) -> bool:
        return is_attention(c) or c.index in inline.holders

    attn = [c for c in covered if attends(c)] or [c for c in around if attends(c)][-1:]
    mlp = [c for c in covered if is_mlp(c)] or [c for c in around if is_mlp(c)][-1:]
    start = min((c.start for c in covered), default=out_call.start)
    if attn and attn[0].index != block.index:
        kind = "cross_attention" if is_cross_attention(attn[0].name) else "attention"
        name = attn[0].name
    elif any(start < t < out_call.end for t in inline.own):
        # The block's own forward attends between the norm and this branch's projection.
        kind, name = "attention", _last_projection(covered, out_call)
    elif mlp or sum(isinstance(c.module, nn.Linear) for c in covered) >= 2:
        kind = "mlp"
        name = mlp[0].name if mlp else _last_projection(covered, out_call)
    else:
        kind, name = "other", _last_projection(covered, out_call)
    if post_norm is not None:
        placement = "post" if abs(alpha - 1) < 1e-3 else "deepnorm"
        norm = post_norm.name
    else:
        placement = "pre"
        norm = pre_norm.name if pre_norm is not None else None
    return Branch(
        name,
        out_call.name,
        kind,
        placement,
        norm,
        round(alpha, 6),
        stack_of(block.name),
        transformed=transformed,
    )


def _last_projection(covered: list[Call], out_call: Call) -> str:
    """The name of a branch no attention or MLP module covers: the last module with a weight
    matrix that ran in it (the projection that writes f, e.g. ``linear2`` of torch's
    ``TransformerEncoderLayer`` or ``output.dense`` of BERT), not the dropout or activation
    after it whose output f is; ``out_call`` when the branch has no such module, or when that
    projection ran inside ``out_call`` and f is not its output (an adapter-wrapped linear
    whose wrapper adds the adapter: the wrapper writes f)."""
    weighted = [
        c
        for c in covered
        if c.end <= out_call.end
        and not is_norm(c.module)
        and isinstance(getattr(c.module, "weight", None), torch.Tensor)
        and c.module.weight.dim() >= 2
    ]
    if not weighted:
        return out_call.name
    last = max(weighted, key=lambda c: c.end)
    inside = out_call.start < last.start and last.end < out_call.end
    return out_call.name if inside and last.output is not out_call.output else last.name


def first_nonfinite_call(trace: Trace) -> str | None:
    """The name of the first module (in return order) whose traced output holds a NaN or an
    Inf; None where every output was finite."""
    for call in sorted(trace.calls, key=lambda c: c.end):
        out = call.output
        if out is not None and out.is_floating_point() and not bool(out.isfinite().all()):
            return call.name
    return None


def _nonfinite_clause(trace: Trace) -> str:
    """Why sums went unmatched where the traced forward went non-finite (NaN != NaN, so a
    block whose tensors hold NaN cannot be verified): a clause for the notes, or ""."""
    poisoned = first_nonfinite_call(trace)
    if poisoned is None:
        return ""
    return (
        f" (the traced forward pass went non-finite, first in the output of {poisoned}, "
        "and a sum that holds NaN cannot be matched)"
    )


def detect(model: nn.Module, trace: Trace, names: dict[int, str]) -> Structure:
    """Structure of ``model`` from a traced forward pass; ``names`` maps id(module) -> name."""
    candidates = block_candidates(model, names)
    norms = sorted({c.name for c in trace.calls if is_norm(c.module)})
    if not trace.calls:
        return unrecognised("the traced forward pass ran no module")
    found: list[tuple[str, list[Branch], list[AttentionInfo]]] = []
    skipped: list[str] = []
    for name in outermost(candidates):
        _resolve(trace, name, candidates, found, skipped)
    blocks: list[Block] = []
    for name, branches, attention in found:
        placements = {b.placement for b in branches}
        index = int(name.rsplit(".", 1)[-1]) if name.rsplit(".", 1)[-1].isdigit() else len(blocks)
        blocks.append(
            Block(
                name,
                index,
                stack_of(name),
                placements.pop() if len(placements) == 1 else "mixed",
                max(b.alpha for b in branches),
                branches,
                attention,
            )
        )
    blocks.sort(key=lambda b: trace.first_call(b.name).start)  # type: ignore[union-attr]
    _number_blocks(blocks)
    _number_branches(blocks)
    if not blocks:
        note = (
            "no residual blocks found: no tensor in any repeated layer equals input plus "
            f"branch output{_nonfinite_clause(trace)}; recording generic per-module moments only"
        )
        s = unrecognised(note)
        s.norms = norms
        return s
    notes = []
    if skipped:
        notes.append(
            f"{len(skipped)} repeated layers without a verified residual add "
            f"(e.g. {skipped[0]}) are not treated as blocks{_nonfinite_clause(trace)}"
        )
    for b in blocks:
        for a in b.attention:
            if a.heads is None:
                notes.append(
                    f"head count of {a.name} not found; attention stats per head "
                    "still follow the tensors"
                )
    return Structure(True, blocks, norms, notes, output_positions(trace, blocks[-1].name))


def _resolve(
    trace: Trace,
    name: str,
    candidates: dict[str, bool],
    found: list[tuple[str, list[Branch], list[AttentionInfo]]],
    skipped: list[str],
) -> None:
    """The blocks of candidate ``name``: those of the stack nested in it where two or more
    of them verify and hold their own branches (a stage of Swin or ConvNeXt holds its
    blocks, and a downsampling layer), else ``name`` itself where it verifies. An MoE
    layer's experts hold no residual add, and the Annotated Transformer's two
    ``SublayerConnection``s each add a module of the layer around them, not their own: the
    layer stays the block."""
    inner = inner_stack(name, candidates)
    if len(inner) >= 2:
        deeper: list[tuple[str, list[Branch], list[AttentionInfo]]] = []
        missed: list[str] = []
        for n in inner:
            _resolve(trace, n, candidates, deeper, missed)
        owned = all(br.name.startswith(n + ".") for n, brs, _ in deeper for br in brs)
        if len(deeper) >= 2 and owned:
            found += deeper
            skipped += missed
            return
    call = trace.first_call(name)
    if call is None:
        return
    branches, attention = analyse_block(trace, call)
    if branches:
        found.append((name, branches, attention))
    else:
        skipped.append(name)


def _number_blocks(blocks: list[Block]) -> None:
    """Blocks numbered by their names (``h.3`` is 3) unless two of one stack share a number,
    as the blocks of a hierarchical model's stages do (``stages.0.layers.1`` and
    ``stages.1.layers.1``): then each stack's blocks are numbered in the order they ran."""
    seen = [(b.stack, b.index) for b in blocks]
    if len(set(seen)) == len(seen):
        return
    counts: dict[str, int] = {}
    for block in blocks:
        block.index = counts.get(block.stack, 0)
        counts[block.stack] = block.index + 1


def output_positions(trace: Trace, last_block: str) -> bool | None:
    """Whether the model's output (its first call's primary tensor) keeps the positions of
    ``last_block``'s (B, T, D) or (T, B, D) output: its first two dims are those two in
    either order (an LM's logits, batch or sequence first), or its first dim is B·T (a
    flattened (B·T, V) head). None when either is not a tensor of the shapes that say it."""
    block = trace.first_call(last_block)
    root = trace.calls[0] if trace.calls else None
    if block is None or root is None or root.parent is not None:
        return None
    x, out = block.output, root.output
    if x is None or out is None or x.dim() != 3 or out.dim() < 1 or min(x.shape[:2]) < 2:
        return None
    lead = sorted(x.shape[:2])  # (B, T) in some order: the layout need not be known
    return sorted(out.shape[:2]) == lead or out.shape[0] == lead[0] * lead[1]


def _number_branches(blocks: list[Block]) -> None:
    counts: dict[str, int] = {}
    for block in blocks:
        for branch in block.branches:
            branch.position = counts.get(branch.stack, 0)
            counts[branch.stack] = branch.position + 1
