"""The report's residual section on recorded runs of real models: the β matrix in forward
order, and Admin's ω said to be undefined (not missing) for Pre-LN branches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import stabscope
from stabscope import Schedule
from stabscope.report.build import build_report
from stabscope.report.data import Budget, census_of, collect
from stabscope.report.runs import open_run
from tests.conftest import sample_gpt


def record(model, run_dir, forward):
    with stabscope.Recorder(model, run_dir, schedule=Schedule(1, 0), forward=forward) as rec:
        forward(model).backward()
        rec.step()
    return stabscope.read_meta(run_dir)


def encoder(norm_first: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    return model, lambda m: m(x).pow(2).mean()


def gpt_post():
    return sample_gpt("post", depth=3)


def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
    )
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    return transformers.BertForMaskedLM(config), lambda m: m(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize(
    "build", [gpt_post, lambda: encoder(True), bert], ids=["gpt-post", "torch-pre", "hf-bert"]
)
def test_beta_rows_in_forward_order(run_dir, build):
    """Row i of β is the stream after the i-th branch the forward pass meets (attention, MLP,
    next layer's attention, ...), with i + 2 components: a lower-triangular matrix."""
    model, forward = build()
    meta = record(model, run_dir, forward)
    branches = [br["name"] for b in meta["structure"]["blocks"] for br in b["branches"]]
    run = open_run(run_dir, "run")
    data = collect(run, census_of(run), Budget())
    assert data.beta.modules == branches
    assert branches[1].endswith((".mlp", ".linear2", ".output.dense"))  # not all attention first
    finite = np.isfinite(data.beta.values[:, :, 0])
    assert finite.sum(axis=1).tolist() == [i + 2 for i in range(len(branches))]
    assert all(finite[i, : i + 2].all() for i in range(len(branches)))


def section_notes(html: str) -> str:
    return html.split('<section id="residual">', 1)[1].split("</section>", 1)[0]


@pytest.mark.slow
def test_omega_is_undefined_for_pre_ln_not_missing(tmp_path):
    runs = {}
    for norm_first, name in ((True, "pre"), (False, "post")):
        model, forward = encoder(norm_first)
        record(model, tmp_path / name, forward)
        runs[name] = tmp_path / name
    html = build_report([runs["pre"]], tmp_path / "pre.html").path.read_text()
    residual = section_notes(html)
    assert "res_omega: not defined for Pre-LN branches: Admin" in residual
    assert "needs detected residual branches" not in residual
    assert 'id="fig-res_omega"' not in residual and 'id="fig-res_beta"' in residual

    html = build_report([runs["post"]], tmp_path / "post.html").path.read_text()
    residual = section_notes(html)
    assert 'id="fig-res_omega"' in residual and "not defined" not in residual

    # Side by side: ω drawn for the Post-LN run, the note names the Pre-LN one.
    html = build_report([runs["pre"], runs["post"]], tmp_path / "both.html").path.read_text()
    residual = section_notes(html)
    assert 'id="fig-res_omega"' in residual
    assert "res_omega: not defined for Pre-LN branches (pre)" in residual
    assert "res_omega: not recorded in" not in residual
