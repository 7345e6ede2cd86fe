"""The metric catalogue (stabscope/metrics.py) against what real runs write, the docs, and the
read side that it drives (the rank merge, the report's heatmaps, the summary's headlines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import stabscope
from stabscope.metrics import BY_NAME, METRICS, TIERS, heatmap_keys, reduction
from stabscope.report.data import HEATMAPS
from stabscope.store import RUN_MODULE
from tests.conftest import ROOT, batch_maker, mlp
from tests.rule_runs import write

PRESETS = ("cheap", "standard", "full")


def _record_gpt(run_dir: Path, preset: str) -> Path:
    """The sample GPT (Post-LN, so Admin's ω is recorded) for 5 steps with a probe forward:
    the stability index at steps 2 and 4, the model update with ``full``."""
    import gpt

    from stabscope.drivers.script import ScriptConfig

    torch.manual_seed(0)
    cfg = ScriptConfig({**gpt.CONFIG, "depth": 2, "norm": "post", "seq_len": 8, "batch_size": 4})
    model, data = gpt.model(cfg), gpt.batches(cfg)
    probe = next(data)
    opt = gpt.optimizer(model, cfg)
    forward = lambda m: gpt.loss(m, probe)  # noqa: E731
    with stabscope.Recorder(model, run_dir, preset=preset, forward=forward) as rec:
        for _ in range(5):
            loss = gpt.loss(model, next(data))
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return run_dir


def _record_mlp(run_dir: Path, preset: str) -> Path:
    torch.manual_seed(0)
    model, batch = mlp(), batch_maker(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    forward = lambda m: (m(batch(0)[0]) - batch(0)[1]).pow(2).mean()  # noqa: E731
    with stabscope.Recorder(model, run_dir, preset=preset, forward=forward) as rec:
        for step in range(5):
            x, y = batch(step)
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return run_dir


@pytest.mark.parametrize("preset", PRESETS)
def test_every_metric_a_run_writes_is_catalogued_with_its_tier_and_kind(tmp_path, preset):
    """Each name the sample GPT and a small MLP write is in the catalogue, recorded from a
    tier no dearer than the preset, on the kind of row the catalogue says."""
    for record in (_record_gpt, _record_mlp):
        run = record(tmp_path / f"{record.__name__}-{preset}", preset)
        frame = stabscope.load_run(run)
        meta = stabscope.read_meta(run)
        params = {p["name"] for p in meta["parameters"]}
        written = set(frame.metric.astype(str))
        assert written - set(BY_NAME) == set(), "metrics missing from stabscope/metrics.py"
        for name in written:
            metric = BY_NAME[name]
            assert TIERS.index(metric.tier) <= PRESETS.index(preset), (name, metric.tier)
            modules = set(frame[frame.metric == name].module.astype(str))
            if metric.kind == "run":
                assert modules == {RUN_MODULE}, name
            elif metric.kind == "param":
                assert modules <= params, name
            else:
                assert RUN_MODULE not in modules and not modules & params, name
        if preset == "full" and record is _record_gpt:
            # Everything a training run can record: every catalogued training metric but the
            # non-finite markers (nothing diverged), the clipped gradient norm (nothing clips),
            # the stale-gradient flag (the loop zeroes) and the constant prediction's loss and
            # its targets' moments (a zero-code regression's: tests/test_rules_loss_above_
            # constant.py) is there.
            training = {m.name for m in METRICS if m.tier != "amplification"}
            markers = {"first_nonfinite_forward", "first_nonfinite_backward", "grad_norm_clipped"}
            markers |= {"grad_not_zeroed", "loss_constant", "target_count", "target_mean"}
            markers |= {"target_var"}
            assert training - markers - written == set()


def _doc_names(text: str) -> set[str]:
    """Every name in backticks of a markdown page, ``a_{b,c}`` expanded to a_b and a_c."""
    names = set()
    for token in re.findall(r"`([a-z_{},]+)`", text):
        brace = re.fullmatch(r"([a-z_]*)\{([a-z_,]+)\}([a-z_]*)", token)
        if brace:
            head, options, tail = brace.groups()
            names |= {head + o + tail for o in options.split(",")}
        else:
            names.add(token)
    return names


def test_docs_probes_lists_every_catalogue_entry():
    listed = _doc_names((ROOT / "docs" / "probes.md").read_text())
    assert {m.name for m in METRICS} - listed == set()


def test_an_uncatalogued_parameter_metric_merges_every_rank(tmp_path):
    """A ``param_*`` name the catalogue does not know is merged over the ranks (their mean),
    not read from rank 0 alone; a catalogued replicated one is rank 0's."""
    rows = [
        (rank, 0, "w", metric, -1, value)
        for metric, values in (("param_new_stat", (1.0, 3.0)), ("param_norm", (2.0, 5.0)))
        for rank, value in enumerate(values)
    ]
    run = write(tmp_path / "run", rows, world_size=2)
    merged = stabscope.load_run(run, merge_ranks=True).set_index("metric").value
    assert merged["param_new_stat"] == pytest.approx(2.0)
    assert merged["param_norm"] == pytest.approx(2.0)
    assert reduction("param_new_stat") == "mean" and reduction("loss_max") == "max"


def test_every_heatmap_the_catalogue_places_is_drawn_and_only_those():
    placed = [
        k for section in {m.heatmap for m in METRICS if m.heatmap} for k in heatmap_keys(section)
    ]
    assert sorted(placed) == sorted(HEATMAPS)
    worst = {k: h.worst for k, h in HEATMAPS.items()}
    assert worst["attn_entropy"] == "lo" and worst["res_corr"] == "lo"
    assert worst["adam_sqrtv_over_eps"] == "lo" and worst["act_rms"] == "hi"


def test_headlines_take_the_worse_end(tmp_path):
    """The summary's headline of attention entropy is its minimum, of the logit its maximum."""
    run = tmp_path / "run"
    rows = [
        (step, "attn", metric, head, value)
        for step, metric, head, value in (
            (0, "attn_entropy", 0, 0.9),
            (1, "attn_entropy", 1, 0.2),
            (2, "attn_entropy", 0, 0.5),
            (0, "attn_logit_max", 0, 3.0),
            (1, "attn_logit_max", 1, 40.0),
        )
    ]
    write(run, rows)
    from stabscope.analysis.summary import probe_headlines

    lines = probe_headlines(run)
    assert lines[0].startswith("lowest attention entropy (normalised): 0.2 at attn head 1")
    assert lines[1].startswith("largest attention logit: 40 at attn head 1")


def test_catalogue_entries_are_well_formed():
    assert len(BY_NAME) == len(METRICS)  # no name twice
    for m in METRICS:
        assert m.tier in TIERS and m.kind in ("module", "param", "run"), m.name
        assert m.worse in ("higher", "lower", "none"), m.name


def test_every_metric_names_a_registered_probe_of_no_dearer_tier():
    """The catalogue's ``probe`` is a registry name (or the recorder's own rows, or the
    amplification command's), and no metric is recorded by a cheaper preset than its probe."""
    from stabscope.probes import BY_NAME as PROBES

    for m in METRICS:
        if m.probe in ("recorder", "amplification"):
            continue
        assert m.probe in PROBES, m.name
        assert TIERS.index(m.tier) >= TIERS.index(PROBES[m.probe].tier), m.name
    assert set(PROBES) <= {m.probe for m in METRICS}  # every probe writes a catalogued metric
