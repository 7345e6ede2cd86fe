"""Rich rendering of a detected structure: blocks, branches, norms, attention, and what the
recorder measures where."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from ..store.structure import Block, Structure

_PLACEMENT = {
    "pre": "Pre-LN  x + f(LN(x))",
    "post": "Post-LN  LN(x + f(x))",
    "deepnorm": "DeepNorm-style  LN(α·x + f(x))",
    "mixed": "mixed placements",
}


def _block_label(block: Block) -> str:
    # Module names are the user's (an nn.ModuleDict key may hold "[/]"): text, never markup.
    stack = f" [dim]{escape(block.stack)}[/]" if block.stack else ""
    alpha = f", α = {block.alpha:.4g}" if block.placement == "deepnorm" else ""
    placement = escape(_PLACEMENT.get(block.placement, block.placement))
    return f"[bold]{escape(block.name)}[/]{stack}: {placement}{alpha}"


def _add_block(tree: Tree, block: Block) -> None:
    node = tree.add(_block_label(block))
    for br in block.branches:
        norm = f", norm {escape(br.norm)}" if br.norm else ", no norm found"
        # Admin's ω weights Post-LN and DeepNorm residuals only; a branch without a norm has
        # no stream to read (the residual probe skips it).
        omega = ", res_omega" if br.placement != "pre" else ""
        metrics = (
            f"-> res_ratio, res_dependency, res_corr{omega}, res_beta"
            if br.norm
            else "(not measured: no norm to read the stream from)"
        )
        node.add(
            f"{escape(br.kind)} branch [cyan]{escape(br.name)}[/] "
            f"(f = output of {escape(br.output)}{norm}) {metrics}"
        )
    for a in block.attention:
        heads = "?" if a.heads is None else str(a.heads)
        kv = f", {a.kv_heads} kv heads" if a.kv_heads and a.kv_heads != a.heads else ""
        node.add(
            f"attention [magenta]{escape(a.name)}[/]: {heads} heads{kv} "
            "-> attn_entropy, attn_logit_max per head"
        )
    node.add("[dim]block output -> token_corr; every module -> act_*/grad_* moments[/]")


def print_structure(
    structure: Structure, title: str, console: Console, max_blocks: int = 4
) -> None:
    """The structure as a tree; long stacks of alike blocks are elided in the middle."""
    tree = Tree(f"[bold]{escape(title)}[/]")
    if not structure.recognised:
        tree.add(
            "[yellow]structure not recognised[/]: generic per-module moments, parameter "
            "norms, update ratios, norm inputs and output logits only"
        )
    blocks = structure.blocks
    head = blocks if len(blocks) <= max_blocks else blocks[: max_blocks - 1]
    for block in head:
        _add_block(tree, block)
    if len(blocks) > max_blocks:
        tree.add(f"[dim]... {len(blocks) - len(head) - 1} more blocks ...[/]")
        _add_block(tree, blocks[-1])
    if structure.norms:
        tree.add(f"{len(structure.norms)} norms -> norm_input_rms")
    tree.add(
        "[dim]model output -> logit_lse_mean, logit_max, logit_min; parameters -> "
        "param_*, update_*, adam_sqrtv_over_eps[/]"
    )
    for note in structure.notes:
        tree.add(f"[yellow]note:[/] {escape(note)}")
    console.print(tree)
