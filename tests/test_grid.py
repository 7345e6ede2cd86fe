"""The development grid's own machinery (bench/grid): truth, baselines, schedule, LOFO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.grid import families, score, tasks, truth
from bench.grid.script import CONFIG, lr_factor, planned_lrs
from stabscope.drivers.script import ScriptConfig


def cfg(**changes) -> ScriptConfig:
    return ScriptConfig({**CONFIG, **changes})


def test_trailing_mean_matches_a_loop():
    values = np.random.default_rng(0).normal(size=50)
    got = truth.trailing_mean(values, 7)
    want = [values[max(0, t - 6) : t + 1].mean() for t in range(50)]
    np.testing.assert_allclose(got, want)


def test_judge_kinds_and_failure_steps():
    base, n = 3.0, 200
    learned = np.linspace(3.0, 1.0, n)
    assert truth.judge(learned, base, n, None).kind == "healthy"
    still = np.full(n, 3.05)
    t = truth.judge(still, base, n, None)
    assert (t.failed, t.kind, t.failure_step) == (True, "stood-still", n)
    # learns to 1.0 by step 100, then back at the baseline from step 120 on
    collapse = np.concatenate([np.linspace(3.0, 1.0, 100), np.full(20, 1.0), np.full(80, 3.0)])
    t = truth.judge(collapse, base, n, None)
    # trailing mean over 10 steps with j ones in the window: 3 - 0.2 j, at most thr = 2.7 for
    # j >= 2: the last such window ends at step 127 (ones at 118, 119), so it fails at 128
    assert (t.kind, t.failure_step) == ("collapsed", 128)
    spike = learned.copy()
    spike[150] = np.nan
    t = truth.judge(spike, base, n, None)
    assert (t.failed, t.kind, t.failure_step) == (True, "nonfinite", 150)
    assert truth.judge(learned, base, n, 90).failure_step == 90  # a NaN activation first
    # a final gap of 11% of the baseline is failed-or-not within the band: ambiguous
    assert truth.judge(np.full(n, base * 0.89), base, n, None).ambiguous


def test_reverse_baseline_is_the_entropy_of_uniform_symbols():
    task = tasks.make_task(cfg(task="reverse", vocab=16, rev_len=8))
    # scored targets: the reversed symbols, uniform over 16 (the separator is never a target)
    for form in ("lm", "s2s"):
        assert tasks.unigram_baseline(task, form) == pytest.approx(math.log(16), abs=2e-3)


def test_text_baseline_is_the_corpus_byte_entropy():
    corpus = tasks.text_corpus().numpy()
    p = np.bincount(corpus, minlength=128) / len(corpus)
    want = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    task = tasks.make_task(cfg(task="text", seq_len=32))
    assert tasks.unigram_baseline(task, "lm") == pytest.approx(want, abs=0.02)


def test_forms_line_up_targets_with_inputs():
    task = tasks.make_task(cfg(task="reverse", vocab=16, rev_len=4))
    seq = next(task.stream(3, seed=0))  # (3, 9): 4 symbols, separator, 4 reversed
    lm = tasks.to_batch(task, seq, "lm")
    assert (lm["y"][:, :4] == tasks.IGNORE).all()
    assert torch.equal(lm["y"][:, 4:], seq[:, :4].flip(1))
    s2s = tasks.to_batch(task, seq, "s2s")
    assert torch.equal(s2s["y"], seq[:, :4].flip(1))
    assert torch.equal(s2s["x"][:, 0], torch.full((3,), task.sep))  # decoding starts at SEP


def test_planned_lrs_are_what_the_scheduler_does():
    c = cfg(lr=1e-2, warmup=20, ramp=100.0, ramp_at=0.5, steps=60)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=c.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, c))
    seen = []
    for _ in range(c.steps):
        seen.append(opt.param_groups[0]["lr"])  # the lr this step trains with
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, planned_lrs(c), rtol=1e-12)
    assert seen[-1] == pytest.approx(1e-2 * 100 ** (29 / 30))


@pytest.mark.parametrize("family,task", [("gpt", "succ"), ("encdec", "reverse"),
                                         ("resconv", "text"), ("opt", "text"),
                                         ("neox", "succ"), ("lstm", "text")])  # fmt: skip
def test_family_logits_and_out_scale(family, task):
    c = cfg(family=family, task=task, norm="post" if family == "encdec" else "pre")
    t = tasks.make_task(c)
    torch.manual_seed(0)
    model = families.build(c, t.vocab, t.length)
    batch = tasks.to_batch(t, next(t.stream(2, seed=0)), families.FORMS[family])
    out = families.logits(model, batch)
    assert out.shape == (*batch["y"].shape, t.vocab)
    torch.manual_seed(0)
    scaled = families.build(cfg(**{**c, "out_scale": 100.0}), t.vocab, t.length)
    head = families.output_head(model)
    ratio = families.output_head(scaled).weight / head.weight
    torch.testing.assert_close(ratio, torch.full_like(ratio, 100.0))


def run(family: str, failed: bool, loss: list[float], kind: str = "k") -> score.Run:
    n = len(loss)
    return score.Run("c", 0, family, kind, failed, n, n, None, np.array(loss, float),
                     (np.arange(0), np.zeros(0)))  # fmt: skip


def test_lofo_never_calibrates_on_the_held_out_family():
    # family a: the failure is a 4x jump, its healthy run jumps 2.5x; family b: a 2.5x failure
    a = [run("a", True, [1, 1, 4, 4]), run("a", False, [1, 1, 2.5, 1])]
    b = [run("b", True, [1, 1, 2.5, 2.5]), run("b", False, [1, 1, 1, 1])]
    det = score.Detector("megatron", score.megatron_at, 10.0, (2.0, 3.0, 10.0))
    scores = score.lofo(det, a + b, 100)
    # scoring a, b calibrates 2x (catches its 2.5x failure): a's healthy run is a false alarm
    assert scores["a"].thresholds == [2.0] and (scores["a"].tp, scores["a"].fp) == (1, 1)
    # scoring b, a calibrates 3x (above its healthy 2.5x): b's 2.5x failure is missed
    assert scores["b"].thresholds == [3.0] and (scores["b"].tp, scores["b"].fn) == (0, 1)
    assert (scores["pooled"].tp, scores["pooled"].fp, scores["pooled"].fn) == (1, 1, 1)


def test_leave_one_kind_out_holds_out_kinds_across_families():
    # The same four runs as above, grouped by failure kind instead: kind x is family a's
    # failure and family b's healthy run, kind y the others.
    x = [run("a", True, [1, 1, 4, 4], "x"), run("b", False, [1, 1, 1, 1], "x")]
    y = [run("a", False, [1, 1, 2.5, 1], "y"), run("b", True, [1, 1, 2.5, 2.5], "y")]
    det = score.Detector("megatron", score.megatron_at, 10.0, (2.0, 3.0, 10.0))
    scores = score.lofo(det, x + y, 100, group="kind")
    assert set(scores) == {"x", "y", "pooled"}
    # scoring x, y (a 2.5x failure next to a 2.5x healthy jump) calibrates 2x: F1 2/3,
    # against 0 at 3x and 10x; x's 4x failure fires, its flat healthy run does not
    assert scores["x"].thresholds == [2.0] and (scores["x"].tp, scores["x"].fp) == (1, 0)
    # scoring y, x (a 4x failure, a flat healthy run) calibrates 2x (F1 1, tied with 3x; the
    # first wins): y's 2.5x jumps both fire
    assert scores["y"].thresholds == [2.0] and (scores["y"].tp, scores["y"].fp) == (1, 1)


def test_unstable_configs_are_left_out():
    def r(name: str, seed: int, failed: bool) -> score.Run:
        return score.Run(name, seed, "f", "k", failed, 10, 10, f"{name}-{seed}", np.zeros(10),
                         (np.arange(0), np.zeros(0)))  # fmt: skip

    runs = [r("agree", 0, True), r("agree", 1, True), r("flip", 0, True), r("flip", 1, False),
            r("close", 0, False), r("close", 1, False)]  # fmt: skip
    truths = {x.path: {"ambiguous": x.name == "close" and x.seed == 1} for x in runs}
    kept, dropped = score.stable(runs, truths)
    assert dropped == ["close", "flip"]
    assert [x.path for x in kept] == ["agree-0", "agree-1"]
