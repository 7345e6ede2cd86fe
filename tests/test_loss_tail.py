"""The loss a script computes outside its model, traced through the first training step and
replayed for the stability index: the replay against the loss written out by hand, its
refusals, and zero-code mode measuring the index of such a script equal to the index computed
here with the loss by hand, with the training bit-identical to a run without stabscope."""

from __future__ import annotations

import dataclasses
import math
import weakref
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import stabscope
from stabscope.drivers.zerocode.probe_loss import TAIL_NOTE
from stabscope.probes.sharpness import stability_index
from stabscope.record.loss_tail import NOT_ONE_CALL, LossTail, TailTrace
from tests.scripts import train_mlp
from tests.scripts.harness import plain, record, values

V = 7  # classes


def hand_loss(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> float:
    """Label-smoothed cross-entropy of logits (B, T, V) at positions :-1, ignoring target 0
    (whose logits the script zeroes first), in float64 from the formula."""
    z = logits.detach().double()[:, :-1].clone()
    t = y[:, :-1]
    z[t == 0] = 0.0
    logp = z.log_softmax(-1)
    keep = t != 0
    nll = -logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    uniform = -logp.mean(-1)
    per = (1 - smoothing) * nll + smoothing * uniform
    return (per[keep].sum() / keep.sum()).item()


def script_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss as a script writes it: slicing, an in-place masked write, reshapes."""
    z = logits[:, :-1].clone()
    z[y[:, :-1] == 0] = 0.0  # (B, T-1, V), in place
    return F.cross_entropy(
        z.reshape(-1, V), y[:, :-1].reshape(-1), ignore_index=0, label_smoothing=0.1
    )


def traced(output: Any, compute) -> tuple[LossTail | str, torch.Tensor]:
    trace = TailTrace(output)
    trace.open()
    try:
        loss = compute(output)
    finally:
        trace.recording = False
        assert trace.close()
    return trace.finish(loss), loss


def test_a_replayed_tail_gives_the_loss_of_another_output():
    torch.manual_seed(0)
    w = torch.randn(4, V, requires_grad=True)
    x = torch.randn(3, 5, 4)
    y = torch.randint(0, V, (3, 5))
    tail, loss = traced(x @ w, lambda out: script_loss(out, y))
    assert isinstance(tail, LossTail)
    assert loss.item() == pytest.approx(hand_loss(x @ w, y, 0.1), rel=1e-6)
    kept = y.clone()
    y.random_(0, V)  # the script reuses its target buffer: the tail kept a copy
    other = torch.randn(3, 5, 4) @ w  # another output, with its graph
    replayed = tail(other)
    assert replayed.item() == pytest.approx(hand_loss(other, kept, 0.1), rel=1e-6)
    assert replayed.requires_grad  # differentiable: the index takes its Hessian


def test_a_write_into_the_output_is_replayed_from_the_output_before_it():
    torch.manual_seed(4)
    w = torch.randn(4, 3, requires_grad=True)
    x, target = torch.randn(5, 4), torch.randn(5, 3)

    def compute(out: torch.Tensor) -> torch.Tensor:
        out.mul_(2.0)  # on the model's output itself: replayed, checked from the copy before
        out[:, 0] = 0.0
        return F.mse_loss(out, target)

    tail, _ = traced(x @ w, compute)
    assert isinstance(tail, LossTail)
    other = torch.randn(5, 4) @ w
    want = (torch.cat([torch.zeros(5, 1), 2 * other[:, 1:]], 1) - target).pow(2).mean()
    assert tail(other).item() == pytest.approx(want.item(), rel=1e-6)

    def through_a_view(out: torch.Tensor) -> torch.Tensor:
        out[:, 1:].mul_(3.0)  # a write into a view of the output: the output changes too
        return F.mse_loss(out, target)

    tail, _ = traced(x @ w, through_a_view)
    assert isinstance(tail, LossTail)
    want = (torch.cat([other[:, :1], 3 * other[:, 1:]], 1) - target).pow(2).mean()
    assert tail(other).item() == pytest.approx(want.item(), rel=1e-6)


def test_the_replay_is_the_formula_on_a_new_output():
    torch.manual_seed(1)
    w = torch.randn(4, V, requires_grad=True)
    y = torch.randint(0, V, (3, 5))
    tail, _ = traced(torch.randn(3, 5, 4) @ w, lambda out: script_loss(out, y))
    assert isinstance(tail, LossTail)
    other = torch.randn(3, 5, 4) @ w
    assert tail(other).item() == pytest.approx(hand_loss(other, y, 0.1), rel=1e-6)
    tail.factor = 2  # two micro-batch losses per optimizer step
    assert tail(other).item() == pytest.approx(2 * hand_loss(other, y, 0.1), rel=1e-6)
    assert tail((other,)) is None  # another output structure: no loss


def test_a_trained_temperature_is_read_live_and_a_second_call_is_refused():
    torch.manual_seed(2)
    w = torch.randn(4, 4, requires_grad=True)
    log_t = torch.nn.Parameter(torch.tensor(0.5))
    x, target = torch.randn(6, 4), torch.randn(6, 4)
    tail, _ = traced(x @ w, lambda out: F.mse_loss(out * log_t.exp(), target))
    assert isinstance(tail, LossTail)
    with torch.no_grad():
        log_t.fill_(-1.0)  # the optimizer moved the temperature
    want = ((x @ w) * math.exp(-1.0) - target).pow(2).mean()
    assert tail(x @ w).item() == pytest.approx(want.item(), rel=1e-6)

    second = torch.randn(6, 4) @ w  # a second model call's output: a graph of its own
    refused, _ = traced(x @ w, lambda out: (out * second).sum())
    assert refused == NOT_ONE_CALL


def test_what_the_trace_cannot_see_is_refused():
    """Calls made with torch functions disabled are invisible to the mode: a write into the
    output moves its version counter unrecorded; a result made from it has a gradient
    history the trace does not know."""
    w = torch.ones(3, requires_grad=True)

    def hidden_write(o: torch.Tensor) -> torch.Tensor:
        v = o * 1.0
        with torch._C.DisableTorchFunction():
            o.mul_(2.0)
        return (o + v).sum()

    refused, _ = traced(torch.arange(3.0) * w, hidden_write)
    assert refused == "the model's output was changed in place by code the trace does not see"

    def hidden_call(o: torch.Tensor) -> torch.Tensor:
        with torch._C.DisableTorchFunction():
            doubled = o * 2.0
        return (o + doubled).sum()

    refused, _ = traced(torch.arange(3.0) * w, hidden_call)
    assert refused == NOT_ONE_CALL


def hand_mlp_index(steps: int, accum: int) -> dict[int, float]:
    """train_mlp's loop by hand (Adam, GradScaler at 2^10, ``accum`` micro-batches of
    loss / accum), the index after steps 2 and 4 on micro-batch 0 of step 0 with the loss
    written out: the MSE to the teacher, unscaled and not divided."""
    model, teacher = train_mlp.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x0 = train_mlp.batch(0, 0)
    t0 = teacher(x0)
    found = {}
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accum):
            x = train_mlp.batch(step, micro)
            loss = F.mse_loss(model(x), teacher(x)) / accum
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step in (2, 4):
            found[step], _ = stability_index(model, lambda m: ((m(x0) - t0) ** 2).mean(), [opt])
    return found


def test_zero_code_measures_the_index_of_a_loss_computed_in_the_loop(tmp_path):
    """train_mlp: a teacher called first, the loss an ``nn.MSELoss`` module, divided for
    gradient accumulation and scaled by a GradScaler: the index is of the unscaled mean."""
    args = ("--steps", "5", "--accum", "2", "--amp")
    run, recorded = record(tmp_path, "train_mlp.py", *args)
    index = values(run, "__run__", "stability_index")
    assert index.step.tolist() == [2, 4]
    want = hand_mlp_index(5, accum=2)
    assert index.value.tolist() == pytest.approx([want[2], want[4]], rel=1e-5)
    assert recorded == plain(tmp_path, "train_mlp.py", *args)  # training bit-identical
    assert not any("not replayed" in n for n in stabscope.read_meta(run)["notes"])


def test_the_trace_leaves_no_mode_behind(tmp_path):
    torch.manual_seed(3)
    w = torch.randn(2, 2, requires_grad=True)
    trace = TailTrace(w * 1)
    trace.open()
    assert _get_current_function_mode_stack()[-1] is trace
    trace.stop()
    assert trace.close() and not _get_current_function_mode_stack()


def info_nce(m: nn.Module, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    sim = F.normalize(m(x), dim=-1) @ F.normalize(m(x2), dim=-1).T  # (16, 16)
    return F.cross_entropy(sim / 0.1, torch.arange(16))


def hand_two_view_index(steps: int) -> dict[int, float]:
    """two_views.py by hand, the index after step 2 with step 0's InfoNCE written out."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    views = []
    found = {}
    for step in range(steps):
        x = torch.randn(16, 8)
        views.append((x, x + 0.1 * torch.randn_like(x)))
        opt.zero_grad()
        info_nce(encoder, *views[-1]).backward()
        opt.step()
        if step == 2:
            first = partial(info_nce, x=views[0][0], x2=views[0][1])
            found[step], _ = stability_index(encoder, first, [opt])
    return found


def test_zero_code_replays_a_loss_over_two_calls_of_the_model(tmp_path):
    """The second view's encoder call runs inside the traced window: its calls on the
    trained weights are part of the tail, replayed on the weights of the measured step."""
    run, recorded = record(tmp_path, "two_views.py", "--steps", "3")
    index = values(run, "__run__", "stability_index")
    assert index.step.tolist() == [2]
    assert index.value.tolist() == pytest.approx([hand_two_view_index(3)[2]], rel=1e-5)
    assert recorded == plain(tmp_path, "two_views.py", "--steps", "3")


def test_zero_code_notes_why_a_random_loss_is_not_replayed(tmp_path):
    """Dropout in the loop draws a new mask at each replay: the check on the first step's
    output gives another loss, and meta.json says so."""
    args = ("--steps", "3", "--dropout", "0.5")
    run, recorded = record(tmp_path, "two_views.py", *args)
    assert values(run, "__run__", "stability_index").empty
    notes = stabscope.read_meta(run)["notes"]
    why = [n for n in notes if n.startswith(TAIL_NOTE)]
    assert len(why) == 1 and why[0][len(TAIL_NOTE) :].startswith("its replay gives ")
    assert "stability_index not measured: the probe forward returns no scalar loss" in notes
    assert recorded == plain(tmp_path, "two_views.py", *args)


def test_the_cli_says_why_the_loss_is_not_replayed(tmp_path):
    """The reason is on the terminal too, not only in meta.json."""
    from typer.testing import CliRunner

    from stabscope.cli import app
    from tests.scripts.harness import SCRIPTS

    script = str(SCRIPTS / "two_views.py")
    args = ["profile", script, "--out", str(tmp_path / "run"), "--", "--steps", "3"]
    result = CliRunner().invoke(app, [*args, "--dropout", "0.5"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "note: " + TAIL_NOTE + "its replay gives " in said


def test_a_loss_computed_under_autocast_is_replayed_under_it():
    """The AMP loop: logits and loss inside ``torch.autocast`` (bf16), backward outside.
    Autocast runs the cross-entropy of bf16 logits in float32; the replay must too."""
    torch.manual_seed(5)
    w = torch.randn(16, V, requires_grad=True)
    x, y = torch.randn(32, 16), torch.randint(0, V, (32,))

    def compute(out: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(out, y)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = x @ w  # (32, V) bf16
    tail, loss = traced(logits, compute)
    assert isinstance(tail, LossTail) and logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32  # autocast's float32 cross-entropy
    want = F.cross_entropy(logits.float(), y)  # the same in float32 by hand
    assert tail(logits).item() == pytest.approx(want.item(), rel=1e-6)
    assert F.cross_entropy(logits, y).item() != pytest.approx(want.item(), rel=1e-4)


class RoutedMLP(nn.Module):
    """A layer that keeps a side loss on itself, as MoE layers keep their load-balancing
    loss: ``self.aux`` = mean squared gate activation of the last call."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.body = nn.Linear(4, 4), nn.Linear(4, 3)
        self.aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 3)
        g = torch.sigmoid(self.gate(x))
        self.aux = g.pow(2).mean()
        return self.body(g * x)


def test_a_side_loss_kept_on_a_module_is_read_again_after_the_replayed_call():
    torch.manual_seed(6)
    model = RoutedMLP()
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    out = model(x)
    trace = TailTrace(out, model)
    trace.open()
    loss = F.mse_loss(out, y) + 0.1 * model.aux
    trace.recording = False
    assert trace.close()
    tail = trace.finish(loss)
    assert isinstance(tail, LossTail)
    x2 = torch.randn(8, 4)
    replayed = tail(model(x2))  # the call sets model.aux anew
    g = torch.sigmoid(x2 @ model.gate.weight.T + model.gate.bias)
    want = F.mse_loss((g * x2) @ model.body.weight.T + model.body.bias, y) + 0.1 * g.pow(2).mean()
    assert replayed.item() == pytest.approx(want.item(), rel=1e-6)
    # Without the model to look in, the side loss is a tensor from outside the window.
    trace = TailTrace(model(x))
    trace.open()
    loss = F.mse_loss(trace._sources[0], y) + 0.1 * model.aux
    trace.recording = False
    assert trace.close()
    assert trace.finish(loss) == NOT_ONE_CALL


def test_a_write_the_trace_cannot_see_through_data_is_refused():
    """``out.data[...] = v`` and a numpy view write into the output without moving its
    version counter: the output's fingerprint (sum and norm) at the start of the window
    tells. Replayed, the write would be missing (the loss of another output, silently)."""
    torch.manual_seed(7)
    w = torch.randn(4, 3, requires_grad=True)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def through_data(out: torch.Tensor) -> torch.Tensor:
        out.data[:, 0] = 3.0
        return F.cross_entropy(out, y)

    def through_numpy(out: torch.Tensor) -> torch.Tensor:
        out.detach().numpy()[:, 0] = 3.0
        return F.cross_entropy(out, y)

    for write in (through_data, through_numpy):
        out = x @ w
        version = out._version
        refused, _ = traced(out, write)
        assert out._version == version and out[0, 0].item() == 3.0  # written, unversioned
        assert refused == "the model's output was changed in place by code the trace does not see"


@dataclasses.dataclass
class Heads:
    """A model output torch's pytree does not open (not registered)."""

    logits: torch.Tensor
    aux: torch.Tensor


def test_an_output_dataclass_is_opened():
    torch.manual_seed(8)
    w = torch.randn(4, 3, requires_grad=True)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def head_out(x: torch.Tensor) -> dict[str, Heads]:
        z = x @ w
        return {"heads": Heads(z, z.pow(2).mean())}

    tail, _ = traced(head_out(x), lambda o: F.cross_entropy(o["heads"].logits, y) + o["heads"].aux)
    assert isinstance(tail, LossTail)
    x2 = torch.randn(6, 4)
    z2 = x2 @ w
    want = F.cross_entropy(z2, y) + z2.pow(2).mean()
    assert tail(head_out(x2)).item() == pytest.approx(want.item(), rel=1e-6)
    assert tail((z2,)) is None  # another structure


def test_the_trace_keeps_no_result_of_the_window_alive():
    """An LM's float copy of its logits, made in the loop and dropped before the backward,
    must not live until the backward because the trace saw it: results are held weakly."""
    torch.manual_seed(9)
    w = torch.randn(4, 3, requires_grad=True)
    out = torch.randn(6, 4) @ w
    trace = TailTrace(out)
    trace.open()
    copy = out.double() * 2.0  # (6, 3) float64; its backward keeps neither input
    seen = weakref.ref(copy)
    loss = copy.sum()
    del copy
    trace.recording = False
    assert trace.close()
    assert seen() is None  # freed though the trace recorded the calls that made it
    tail = trace.finish(loss)
    assert isinstance(tail, LossTail)
    other = torch.randn(6, 4) @ w
    assert tail(other).item() == pytest.approx((2.0 * other.double()).sum().item(), rel=1e-12)
