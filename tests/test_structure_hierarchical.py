"""Blocks of hierarchical models: stages that hold stacks of blocks (Swin, ConvNeXt), branches
computed in another layout and permuted back (ConvNeXt's channels-last MLP), window attention
reversed onto the stream. The reference is each model's own definition: the classes that are
its blocks, and the module whose output each block adds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stabscope.analysis.summary import layer_modules
from stabscope.structure import discover
from stabscope.structure.detect import onto
from stabscope.structure.transformed import rearranged_branch


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _named(model: nn.Module, cls: type) -> list[str]:
    """The names of ``model``'s modules of class ``cls``, in definition order."""
    return [n for n, m in model.named_modules() if type(m) is cls]


def test_hf_convnext_blocks_are_its_layers_inside_the_stages(transformers):
    from transformers.models.convnext.modeling_convnext import ConvNextLayer

    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16, 24], depths=[2, 3, 2], num_stages=3, num_labels=4
    )
    model = transformers.ConvNextForImageClassification(config)
    s = discover(model, lambda m: m(torch.randn(2, 3, 32, 32)))
    layers = _named(model, ConvNextLayer)  # 7 layers in 3 stages
    assert [b.name for b in s.blocks] == layers
    # Numbered in the order they ran (each stage restarts its own names at 0).
    assert [b.index for b in s.blocks] == list(range(7))
    assert [[br.name for br in b.branches] for b in s.blocks] == [[f"{n}.pwconv2"] for n in layers]


def test_hf_swin_blocks_are_its_swin_layers_with_attention_and_mlp(transformers):
    from transformers.models.swin.modeling_swin import SwinLayer

    torch.manual_seed(0)
    config = transformers.SwinConfig(
        image_size=32,
        patch_size=2,
        num_channels=3,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        num_labels=4,
    )
    model = transformers.SwinForImageClassification(config)
    s = discover(model, lambda m: m(torch.randn(2, 3, 32, 32)))
    layers = _named(model, SwinLayer)
    assert [b.name for b in s.blocks] == layers
    for b in s.blocks:
        assert [br.kind for br in b.branches] == ["attention", "mlp"]
        assert [a.name for a in b.attention] == [f"{b.name}.attention"]


class ConvNeXtBlock(nn.Module):
    """x + permute(γ · pw2(gelu(pw1(norm(permute(dw(x))))))): the MLP runs channels-last on a
    channels-first stream, LayerScale γ inline, no module between the permute and the add."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 4 * d)
        self.pw2 = nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.linspace(0.1, 1.0, d))  # a gate per channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> same
        h = self.dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        h = self.pw2(F.gelu(self.pw1(self.norm(h)))) * self.gamma
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (8, 16), depth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 2, 2)
        self.down = nn.ModuleList(
            [nn.Conv2d(dims[i - 1], dims[i], 2, 2) for i in range(1, len(dims))]
        )
        self.stages = nn.ModuleList(
            [nn.Sequential(*[ConvNeXtBlock(d) for _ in range(depth)]) for d in dims]
        )
        self.head = nn.Linear(dims[-1], 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages[0](self.stem(x))
        for down, stage in zip(self.down, self.stages[1:]):
            x = stage(down(x))
        return self.head(x.mean((2, 3)))


def test_a_channels_last_branch_permuted_back_makes_each_block_of_each_stage():
    torch.manual_seed(0)
    model = ConvNeXt()
    s = discover(model, lambda m: m(torch.randn(2, 3, 16, 16)))
    blocks = _named(model, ConvNeXtBlock)  # stages.0.0, stages.0.1, stages.1.0, stages.1.1
    assert [b.name for b in s.blocks] == blocks
    # f is γ·pw2(...) permuted: pw2's output under a gate, not pw2's output itself.
    assert [[(br.output, br.transformed) for br in b.branches] for b in s.blocks] == [
        [(f"{n}.pw2", True)] for n in blocks
    ]


def test_a_stage_whose_blocks_do_not_all_verify_stays_one_block_when_fewer_than_two_do():
    """An MoE layer's experts are a stack nested in the block, with no residual add of their
    own: the layer stays the block."""

    class Experts(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.experts = nn.ModuleList(
                [
                    nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                    for _ in range(4)
                ]
            )
            self.router = nn.Linear(d, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d): soft mixture
            w = self.router(x).softmax(-1)  # (B, T, E)
            return sum(w[..., i : i + 1] * e(x) for i, e in enumerate(self.experts))

    class Layer(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.moe = Experts(d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.moe(self.norm(x))

    torch.manual_seed(0)
    model = nn.Sequential(*[Layer(8) for _ in range(3)])
    s = discover(model, lambda m: m(torch.randn(2, 5, 8)))
    assert [b.name for b in s.blocks] == ["0", "1", "2"]
    assert [b.index for b in s.blocks] == [0, 1, 2]


class WindowBlock(nn.Module):
    """Pre-LN attention over 4x4 windows of a (B, H, W, C) stream, written inline: the
    attention's output is reversed from (B·windows, 16, C) onto the stream by a view and a
    permute, then added."""

    def __init__(self, d: int, win: int = 4) -> None:
        super().__init__()
        self.win = win
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, hh, ww, d = x.shape
        w = self.win
        t = self.norm1(x).view(b, hh // w, w, ww // w, w, d).permute(0, 1, 3, 2, 4, 5)
        t = t.reshape(-1, w * w, d)  # (B·windows, tokens, C)
        q, k, v = self.qkv(t).chunk(3, -1)
        o = self.proj(F.scaled_dot_product_attention(q, k, v))  # (B·windows, tokens, C)
        o = o.view(b, hh // w, ww // w, w, w, d).permute(0, 1, 3, 2, 4, 5).reshape(x.shape)
        x = x + o
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([WindowBlock(d) for _ in range(2)])
        self.merge = nn.Linear(4 * d, 2 * d)  # patch merging: the stage's output is no sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        b, hh, ww, d = x.shape
        x = x.view(b, hh // 2, 2, ww // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
        return self.merge(x.reshape(b, hh // 2, ww // 2, 4 * d))


def test_window_attention_reversed_onto_the_stream_is_a_branch_in_every_stage():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), Stage(8), Stage(16))  # two stages of two blocks
    s = discover(model, lambda m: m(torch.randn(2, 16, 16, 3)))
    assert [b.name for b in s.blocks] == ["1.blocks.0", "1.blocks.1", "2.blocks.0", "2.blocks.1"]
    for b in s.blocks:
        # The attention's f is proj's output rearranged, no module's output: read as
        # transformed (no residual statistics), the MLP's is mlp's own.
        assert [(br.output.rsplit(".", 1)[-1], br.transformed) for br in b.branches] == [
            ("proj", True),
            ("mlp", False),
        ]


def test_rearranged_branch_checks_the_values_not_only_their_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8)
    w = torch.randn(2, 12, 8)  # (B·windows, tokens, C)
    r = w.view(4, 6, 8)[:, torch.randperm(6)]  # a rearrangement of w's elements
    assert rearranged_branch(x + r, x, w, 1e-4)
    # The same norm, other values: one element moved by 0.5 and its norm kept by a sign flip
    # elsewhere is not the same multiset.
    other = r.clone()
    other[0, 0, 0] += 0.5
    other = other * (r.norm() / other.norm())
    assert not rearranged_branch(x + other, x, w, 1e-4)
    # A view of the stream is no sum, whatever it equals.
    assert not rearranged_branch(x.view(4, 48), x, w, 1e-4)


def test_onto_lists_the_layouts_that_give_the_sums_shape():
    t = torch.zeros(2, 8, 5, 5)  # (B, C, H, W): H = W gives two layouts
    w = torch.zeros(2, 5, 5, 8)  # (B, H, W, C)
    perms = onto(w, t)
    assert perms == [(0, 3, 1, 2), (0, 3, 2, 1)]
    assert all(w.permute(p).shape == t.shape for p in perms)
    assert onto(t, t) == [(0, 1, 3, 2)]  # the two spatial dims swapped
    assert len(onto(torch.zeros(2, 8, 8, 8), torch.zeros(2, 8, 8, 8))) == 5  # C = H = W
    assert onto(torch.zeros(2, 8, 25), t) == []


def test_the_depth_trend_of_a_stage_reads_its_blocks_by_their_index_in_it():
    """``layer_modules`` numbers the layers of one stage 0, 1, 2 (the last number of their
    names), not all by the stage's own number."""
    meta = {
        "modules": [
            {"name": f"stages.{i}.{j}", "type": "Block", "role": "block", "layer": i}
            for i, depth in enumerate((2, 3))
            for j in range(depth)
        ]
    }
    assert layer_modules(meta) == {"stages.1.0": 0, "stages.1.1": 1, "stages.1.2": 2}
    flat = {
        "modules": [
            {"name": f"h.{i}", "type": "Block", "role": "block", "layer": i} for i in range(3)
        ]
    }
    assert layer_modules(flat) == {"h.0": 0, "h.1": 1, "h.2": 2}


class SublayerConnection(nn.Module):
    """The Annotated Transformer's residual: x + dropout(sublayer(norm(x))), the sublayer a
    module of the layer around it, handed in at call time."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        return x + self.dropout(sublayer(self.norm(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.feed_forward = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.sublayer = nn.ModuleList([SublayerConnection(d) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sublayer[0](x, lambda h: self.self_attn(h, h, h, need_weights=False)[0])
        return self.sublayer[1](x, self.feed_forward)


def test_sublayers_that_add_their_layers_modules_leave_the_layer_the_block():
    """Each ``SublayerConnection`` verifies as a residual add, but what it adds is the
    layer's attention or feed-forward: the layers stay the blocks, with two branches each."""
    torch.manual_seed(0)
    model = nn.Sequential(*[EncoderLayer(8) for _ in range(3)])
    s = discover(model, lambda m: m(torch.randn(2, 5, 8)))
    assert [b.name for b in s.blocks] == ["0", "1", "2"]
    assert [[br.name for br in b.branches] for b in s.blocks] == [
        [f"{i}.self_attn", f"{i}.feed_forward"] for i in range(3)
    ]


def _pre_ln_layer(d: int) -> nn.Module:
    return nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, norm_first=True)


class KeyedStages(nn.Module):
    """Pre-LN layers held in ModuleDicts: two stages keyed by name, each layer keyed
    ``layer{i}``, run in key order. ``listed=True`` holds the same layers in ModuleLists."""

    def __init__(self, d: int = 16, depths: tuple[int, int] = (2, 3), listed: bool = False):
        super().__init__()
        self.emb = nn.Linear(4, d)
        layers = [[_pre_ln_layer(d) for _ in range(n)] for n in depths]
        if listed:
            self.stages = nn.ModuleList(nn.ModuleList(s) for s in layers)
        else:
            self.stages = nn.ModuleDict(
                {
                    key: nn.ModuleDict({f"layer{i}": m for i, m in enumerate(s)})
                    for key, s in zip(("low", "high"), layers)
                }
            )
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        stages = self.stages.values() if isinstance(self.stages, nn.ModuleDict) else self.stages
        for stage in stages:
            for layer in stage.values() if isinstance(stage, nn.ModuleDict) else stage:
                h = layer(h)
        return self.head(h)


def test_layers_held_in_module_dicts_are_the_blocks_a_module_list_of_them_gives(tmp_path):
    """The reference is the same model with ModuleLists (a stack discovery has always read):
    the same blocks in the same order, with the same branches, under the keyed names; and the
    depth trend reads the last stage's blocks by the number their keys end with."""
    from tests.conftest import record_steps

    torch.manual_seed(0)
    keyed = KeyedStages()
    listed = KeyedStages(listed=True)
    listed.load_state_dict(
        {
            k.replace("low.layer", "0.").replace("high.layer", "1."): v
            for k, v in keyed.state_dict().items()
        }
    )
    x = torch.randn(2, 5, 4)
    s_keyed = discover(keyed, lambda m: m(x))
    s_listed = discover(listed, lambda m: m(x))
    names = [f"stages.{s}.layer{i}" for s, n in (("low", 2), ("high", 3)) for i in range(n)]
    assert s_listed.recognised and len(s_listed.blocks) == 5
    assert [b.name for b in s_keyed.blocks] == names
    assert [b.index for b in s_keyed.blocks] == [b.index for b in s_listed.blocks]

    def shape(s):
        return [
            (b.placement, round(b.alpha, 6), [(br.kind, br.placement) for br in b.branches])
            for b in s.blocks
        ]

    assert shape(s_keyed) == shape(s_listed)
    opt = torch.optim.SGD(keyed.parameters(), lr=0.01)
    run = record_steps(keyed, tmp_path / "run", lambda m: m(x).pow(2).mean(), opt, 2)
    import json

    meta = json.loads((run / "meta.json").read_text())
    assert layer_modules(meta) == {f"stages.high.layer{i}": i for i in range(3)}


def test_a_found_block_that_never_ran_is_placed_after_those_that_did():
    """meta.json gives a module that never ran ``forward_order`` None (a block the forward
    skips): the stack's order puts it last, and nothing fails on it."""
    meta = {
        "structure": {"blocks": [{"name": f"stages.s.{k}"} for k in ("low", "mid", "top")]},
        "modules": [
            {"name": "stages.s.low", "type": "Block", "role": "block", "forward_order": 3},
            {"name": "stages.s.mid", "type": "Block", "role": "block", "forward_order": None},
            {"name": "stages.s.top", "type": "Block", "role": "block", "forward_order": 7},
        ],
    }
    assert layer_modules(meta) == {"stages.s.low": 0, "stages.s.top": 1, "stages.s.mid": 2}
