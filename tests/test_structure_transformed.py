"""Residual blocks whose added term is an elementwise function of a module's output: an
inline activation (``h + gelu(W·m)``), a gate per sample and channel (adaLN-Zero, at its
zero init), a per-channel scale (LayerScale). Each is found as a block, its branch marked
``transformed`` (the residual stats, which need f itself, skip it), and the relation is
checked here on the model's own tensors. Layers that add nothing are not claimed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stabscope import RecorderConfig, Schedule, load_run, read_meta
from stabscope.structure import discover
from stabscope.structure.transformed import transformed_branch
from tests.conftest import record_steps

D, T, B = 16, 12, 4


class Inline(nn.Module):
    """x + gelu(lin(norm(x))): the activation is applied to ``lin``'s output inline."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.lin(self.norm(x)))


class Gated(nn.Module):
    """adaLN-Zero: x + g·attn(norm(x)), g per sample and channel from a zero-init Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.gate = nn.Linear(D, D)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        g = self.gate(c).unsqueeze(1)  # (B, 1, D)
        return x + g * self.attn(h, h, h, need_weights=False)[0]


class Scaled(nn.Module):
    """LayerScale: x + γ ⊙ mlp(norm(x)), γ per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.gamma = nn.Parameter(0.1 * torch.rand(D) + 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.mlp(self.norm(x))


class Dropped(nn.Module):
    """x + dropout(attn(norm1 x)), then + dropout(mlp(norm2 x)): dropout by function, as
    HF's BART, OPT and Whisper layers apply it before their residual adds."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + F.dropout(self.attn(h, h, h, need_weights=False)[0], 0.3, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), 0.3, self.training)


class PostDropped(nn.Module):
    """Post-LN with dropout by function (HF BART's and Marian's layers):
    norm1(x + dropout(attn(x))), then norm2(x + dropout(mlp(x))). ``p`` 0: no dropout."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(
            x + F.dropout(self.attn(x, x, x, need_weights=False)[0], self.p, self.training)
        )
        return self.norm2(x + F.dropout(self.mlp(x), self.p, self.training))


class Plain(nn.Module):
    """No residual: gelu(lin(norm(x))), same shape in and out."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.lin(self.norm(x)))


class Stack(nn.Module):
    def __init__(self, kind: type[nn.Module], n: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([kind() for _ in range(n)])
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c) if isinstance(block, Gated) else block(x)
        return self.head(x)


def forward(m: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return m(torch.randn(B, T, D, generator=g), torch.randn(B, D, generator=g))


def train_two_steps(model: nn.Module, run, probe_forward: bool = True):
    """Two recorded SGD steps of ``forward``'s loss; the structure the run stored. With no
    probe forward the Recorder learns the structure from the first training step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    config = RecorderConfig(schedule=Schedule(2, 0), online_rules=False)
    record_steps(
        model, run, lambda m: forward(m).pow(2).mean(), opt, 2, config, probe_forward=probe_forward
    )
    return read_meta(run)["structure"]


def test_inline_activation_gate_and_scale_make_blocks_with_transformed_branches():
    for kind, output in ((Inline, "lin"), (Gated, "attn"), (Scaled, "mlp")):
        s = discover(Stack(kind), forward)
        assert s.recognised and [b.name for b in s.blocks] == [f"blocks.{i}" for i in range(3)]
        for i, block in enumerate(s.blocks):
            (branch,) = block.branches
            assert (branch.output, branch.placement) == (f"blocks.{i}.{output}", "pre")
            assert branch.transformed and branch.norm == f"blocks.{i}.norm"
        if kind is Gated:
            assert [a.name for a in s.attention] == [f"blocks.{i}.attn" for i in range(3)]


def test_a_layer_that_adds_nothing_is_not_a_block():
    s = discover(Stack(Plain), forward)
    assert not s.recognised and s.blocks == []


def test_the_relation_on_tensors():
    torch.manual_seed(0)
    x, w = torch.randn(B, T, D), torch.randn(B, T, D)
    tol = 1e-4
    assert transformed_branch(x + F.gelu(w), x, w, tol)
    assert transformed_branch(x + torch.rand(B, 1, D) * w, x, w, tol)  # per sample, channel
    assert transformed_branch(x + 0.0 * w, x, w, tol)  # a gate at its zero init
    assert not transformed_branch(x.view(B, T, D), x, w, tol)  # a view adds nothing
    assert not transformed_branch(x + w @ torch.randn(D, D), x, w, tol)  # a mix of channels
    assert not transformed_branch(x + torch.rand(B, T, 1) * w, x, w, tol)  # per token
    for p in (0.1, 0.5):  # inverted dropout: zeros at a share p, the rest w / (1 - p)
        assert transformed_branch(x + F.dropout(w, p), x, w, tol)
    keep = (torch.rand(B, T, D) > 0.1).float()
    assert not transformed_branch(x + keep * w, x, w, tol)  # a mask without dropout's scale
    assert not transformed_branch(x + 2 * keep * w, x, w, tol)  # 1/(1 - p) = 2, 10% dropped
    # Added on the stream flattened to (tokens, d) and viewed back (HF's OPT).
    flat, wflat = x.reshape(-1, D), w.reshape(-1, D)
    assert transformed_branch((flat + F.dropout(wflat, 0.1)).view(B, T, D), flat, wflat, tol)
    # A tensor without a plain storage is no branch, and never an error of detection.
    assert not transformed_branch((x + F.gelu(w)).to_sparse(), x, w, tol)


def test_a_recorded_run_keeps_the_blocks_and_skips_only_their_residual_stats(tmp_path):
    """Block outputs are recorded as blocks; the residual stats, which would read lin's
    output as f where f is gelu of it, are left out and a note says why. The reference:
    each block's output minus its input is gelu of its lin's output, on the model itself."""
    model = Stack(Inline)
    seen: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name.startswith("blocks.") and name.count(".") in (1, 2):
            module.register_forward_hook(
                lambda m, a, o, name=name: seen.update({name: o.detach(), name + "<": a[0]})
            )
    train_two_steps(model, tmp_path / "run")
    for i in range(3):
        added = seen[f"blocks.{i}"] - seen[f"blocks.{i}<"]
        torch.testing.assert_close(added, F.gelu(seen[f"blocks.{i}.lin"]))
    rows = load_run(tmp_path / "run")
    assert not rows.metric.str.startswith("res_").any()
    blocks = set(rows[rows.metric == "act_rms"].module)
    assert {f"blocks.{i}" for i in range(3)} <= blocks
    meta_notes = " ".join(read_meta(tmp_path / "run")["notes"])
    assert "whose f is no module's output" in meta_notes


def test_dropout_by_function_in_a_training_step_keeps_the_blocks(tmp_path):
    """A training script's structure is learned from its first recorded training step, where
    ``F.dropout`` drops: every add is x + m ⊙ f / (1 - p). The blocks and branches found
    there are those found in eval mode (no dropout: the adds are x + f), and the blocks'
    outputs are recorded as blocks."""
    model = Stack(Dropped)
    want = discover(model, forward)
    assert [b.name for b in want.blocks] == [f"blocks.{i}" for i in range(3)]
    got = train_two_steps(model, tmp_path / "run", probe_forward=False)  # learned in training
    assert got["recognised"]
    assert [b["name"] for b in got["blocks"]] == [b.name for b in want.blocks]
    for trained, plain in zip(got["blocks"], want.blocks):
        branches = trained["branches"]
        assert [br["output"] for br in branches] == [br.output for br in plain.branches]
        assert [br["norm"] for br in branches] == [f"{plain.name}.norm1", f"{plain.name}.norm2"]
        assert all(br["transformed"] for br in branches)
    rows = load_run(tmp_path / "run")
    assert {f"blocks.{i}" for i in range(3)} <= set(rows[rows.metric == "act_rms"].module)


def test_a_post_ln_branch_that_drops_by_function_in_training_gets_no_residual_stats(tmp_path):
    """A probe forward finds the structure in eval mode, where F.dropout does nothing; in
    training the norm's input is x + m ⊙ f / (1 - p), so the stream read from it as (norm
    input - f) would carry the dropped-out f (checked here on the model's own tensors). The
    training-mode trace marks those branches, and the run records no res_* rows for them;
    the same model without dropout keeps its residual stats."""
    model = Stack(PostDropped)
    model.train()
    seen: dict[str, torch.Tensor] = {}
    block = model.blocks[0]
    block.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))
    block.attn.register_forward_hook(lambda m, a, o: seen.update(f=o[0].detach()))
    block.norm1.register_forward_hook(lambda m, a, o: seen.update(t=a[0].detach()))
    with torch.no_grad():
        forward(model)
    stream_read = seen["t"] - seen["f"]
    assert (stream_read - seen["x"]).norm() > 0.05 * seen["x"].norm()  # not the stream
    model.eval()  # found before a train() call (a Recorder opened on an eval-mode model)
    assert all(br.transformed for br in discover(model, forward).branches)
    assert not any(m.training for m in model.modules())  # its modes given back
    model.train()
    structure = train_two_steps(model, tmp_path / "drop")  # with a probe forward
    branches = [br for b in structure["blocks"] for br in b["branches"]]
    assert len(branches) == 6 and all(br["placement"] == "post" for br in branches)
    assert all(br["transformed"] for br in branches)
    rows = load_run(tmp_path / "drop")
    assert not rows.metric.str.startswith("res_").any()

    plain = Stack(lambda: PostDropped(0.0))
    plain.train()
    structure = train_two_steps(plain, tmp_path / "plain")
    branches = [br for b in structure["blocks"] for br in b["branches"]]
    assert len(branches) == 6 and not any(br["transformed"] for br in branches)
    rows = load_run(tmp_path / "plain")
    assert set(rows[rows.metric == "res_dependency"].module) == {br["name"] for br in branches}
