"""An unmodified training script, recorded from outside: which module is the model, where
steps end, what the loss is, eval passes, --max-steps. Every recorded number is compared with
the same training replayed here by hand, or with the script's own log of its losses."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.optim.optimizer as optimizer_module
from torch import nn

import stabscope
from stabscope.drivers.zerocode import follows_model_script_convention, profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.record.schedule import Schedule
from tests.conftest import SAMPLES
from tests.scripts import train_mlp
from tests.scripts.harness import SCRIPTS, plain, read_log, record, rms, values
from tests.test_cli import assert_one_line_error, invoke


def replay_mlp(steps: int, accum: int = 1, two: bool = False, eval_every: int = 0) -> list[dict]:
    """train_mlp's loop by hand: fc2's output rms per micro-batch, update ratios, eval rms."""
    model, teacher = train_mlp.make_model()
    opts = train_mlp.make_optimizers(model, 1e-2, two)
    out = []
    for step in range(steps):
        seen: dict = {"fc2": [], "loss": 0.0}
        for opt in opts:
            opt.zero_grad()
        for micro in range(accum):
            x = train_mlp.batch(step, micro)
            h = model.fc2(torch.relu(model.fc1(x)))  # fc2's output before the in-place ReLU
            seen["fc2"].append(rms(h))
            loss = nn.functional.mse_loss(model.head(torch.relu(h)), teacher(x)) / accum
            loss.backward()
            seen["loss"] += loss.item()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["grad_norm"] = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        for opt in opts:
            opt.step()
        seen["update_ratio"] = {
            n: ((p.detach() - before[n]).norm() / before[n].norm()).item()
            for n, p in model.named_parameters()
        }
        if eval_every and step % eval_every == 0:
            with torch.no_grad():
                x = train_mlp.batch(step, 99)
                seen["eval_fc2"] = rms(model.fc2(torch.relu(model.fc1(x))))
        out.append(seen)
    return out


def losses(run) -> list[float]:
    return values(run, "__run__", "loss").value.tolist()


def test_model_is_found_past_the_teacher_and_the_loss_module(tmp_path):
    run, log = record(tmp_path, "train_mlp.py", "--steps", "4")
    meta = stabscope.read_meta(run)
    assert meta["run"]["model"] == "Net" and meta["run"]["optimizer"] == "Adam"
    # The frozen teacher runs first every step and MSELoss is a module: neither is the model.
    assert {m["name"] for m in meta["modules"]} == {"<root>", "fc1", "act1", "fc2", "act2", "head"}
    ref = replay_mlp(4)
    assert losses(run) == pytest.approx([s["loss"] for s in ref], rel=1e-6)
    assert losses(run) == pytest.approx([r["loss"] for r in log], rel=1e-6)
    fc2 = values(run, "fc2", "act_rms")
    assert fc2.value.tolist() == pytest.approx([s["fc2"][0] for s in ref], rel=1e-5)
    ratio = values(run, "fc1.weight", "update_ratio")
    assert ratio.value.tolist() == pytest.approx(
        [s["update_ratio"]["fc1.weight"] for s in ref], rel=1e-4
    )


def test_recording_leaves_training_bit_identical_and_removes_every_hook(tmp_path):
    _, recorded = record(tmp_path, "train_mlp.py", "--steps", "5", "--accum", "2")
    assert recorded == plain(tmp_path, "train_mlp.py", "--steps", "5", "--accum", "2")
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert not torch.nn.modules.module._global_forward_hooks
    assert not optimizer_module._global_optimizer_post_hooks
    assert torch.autograd.backward.__module__ == "torch.autograd"
    assert torch.optim.Optimizer.__init__.__qualname__ == "Optimizer.__init__"
    for wrapped in ("scale", "step"):  # the loss under AMP, and the steps its scaler skips
        assert getattr(torch.amp.GradScaler, wrapped).__qualname__ == f"GradScaler.{wrapped}"


def test_gradient_accumulation_is_one_step_with_one_call_per_micro_batch(tmp_path):
    run, log = record(tmp_path, "train_mlp.py", "--steps", "3", "--accum", "3")
    ref = replay_mlp(3, accum=3)
    assert sorted(values(run, "__run__", "loss").step) == [0, 1, 2]
    # The step's loss is the sum of the scalars backward ran on: here loss / accum each.
    assert losses(run) == pytest.approx([r["loss"] for r in log], rel=1e-6)
    fc2 = values(run, "fc2", "act_rms")
    assert fc2.call.tolist() == [0, 1, 2] * 3
    assert fc2.value.tolist() == pytest.approx([v for s in ref for v in s["fc2"]], rel=1e-5)
    grad = values(run, "head.weight", "param_grad_norm")
    assert grad.value.tolist() == pytest.approx(
        [s["grad_norm"]["head.weight"] for s in ref], rel=1e-5
    )


def test_grad_scaler_loss_is_recorded_unscaled(tmp_path):
    run, log = record(tmp_path, "train_mlp.py", "--steps", "3", "--amp")
    # GradScaler multiplies by 2**10 before backward; the recorded loss is the script's own.
    assert losses(run) == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert losses(run) == pytest.approx([s["loss"] for s in replay_mlp(3)], rel=1e-6)
    # Read from the graph of the loss the scaler was given (record/loss_function.py).
    assert stabscope.read_meta(run)["loss_function"] == "mse_loss"


@pytest.mark.slow
def test_a_step_the_grad_scaler_skipped_is_a_step_of_the_run(tmp_path):
    """An Inf gradient in the first 3 iterations: the scaler skips their optimizer.step(), as
    it does after an fp16 overflow. They are steps 0-2 of the run all the same, with the
    losses the script logged, and --max-steps 4 --stop-script stops the script in its 4th
    iteration (the skipped ones counted), not after 4 optimizer steps."""
    run, log = record(
        tmp_path,
        "train_mlp.py",
        "--steps",
        "8",
        "--amp",
        "--overflow-steps",
        "3",
        max_steps=4,
        stop_script=True,
    )
    assert [r["skipped"] for r in log] == [True, True, True]  # stopped inside iteration 3
    meta = stabscope.read_meta(run)
    assert meta["status"] == "complete" and meta["steps"] == 4
    recorded = losses(run)
    assert recorded[:3] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert len(recorded) == 4
    # The Inf the scaler saw is in the gradients recorded at those steps, not in the loss.
    grad = values(run, "fc1.weight", "param_grad_norm")
    assert grad.step.tolist()[:3] == [0, 1, 2] and all(v == float("inf") for v in grad.value[:3])


def test_two_optimizers_make_one_step_per_iteration(tmp_path):
    run, _ = record(tmp_path, "train_mlp.py", "--steps", "4", "--two-optimizers")
    assert stabscope.read_meta(run)["run"]["optimizer"] == "Adam, SGD"
    ref = replay_mlp(4, two=True)
    for name in ("fc1.weight", "head.weight"):  # Adam's and SGD's parameters, every step
        ratio = values(run, name, "update_ratio")
        assert ratio.step.tolist() == [0, 1, 2, 3]
        assert ratio.value.tolist() == pytest.approx(
            [s["update_ratio"][name] for s in ref], rel=1e-4
        )


@pytest.mark.parametrize("inference_mode", [False, True])
def test_eval_passes_are_kept_apart(tmp_path, inference_mode):
    # torch.inference_mode() outputs have no version counter: they are measured all the same.
    flags = ["--inference-mode"] if inference_mode else []
    run, _ = record(tmp_path, "train_mlp.py", "--steps", "4", "--eval-every", "2", *flags)
    ref = replay_mlp(4, eval_every=2)
    train = values(run, "fc2", "act_rms")
    assert train.call.tolist() == [0] * 4  # eval calls do not shift the training call index
    assert train.value.tolist() == pytest.approx([s["fc2"][0] for s in ref], rel=1e-5)
    # An eval pass after step k's optimizer step sees step k+1's parameters: it is in step k+1.
    evals = values(run, "fc2", "act_rms", phase="eval")
    assert evals.step.tolist() == [1, 3]
    assert evals.value.tolist() == pytest.approx([ref[0]["eval_fc2"], ref[2]["eval_fc2"]])
    assert values(run, "fc2", "grad_rms", phase="eval").empty


def test_max_steps_stops_recording_and_the_script_runs_on_untouched(tmp_path):
    run, log = record(tmp_path, "train_mlp.py", "--steps", "6", max_steps=3)
    assert sorted(values(run, "__run__", "loss").step) == [0, 1, 2]
    meta = stabscope.read_meta(run)
    assert meta["status"] == "complete" and meta["steps"] == 3
    assert log == plain(tmp_path, "train_mlp.py", "--steps", "6")  # all 6 steps, unchanged


def test_max_steps_with_stop_script_ends_the_script_cleanly(tmp_path):
    run, log = record(tmp_path, "train_mlp.py", "--steps", "6", max_steps=2, stop_script=True)
    # Stopped inside step 1's optimizer.step(), before the script logged that step.
    assert [r["step"] for r in log] == [0]
    assert stabscope.read_meta(run)["status"] == "complete"
    assert sorted(values(run, "__run__", "loss").step) == [0, 1]


def test_schedule_applies_to_training_scripts(tmp_path):
    config = RecorderConfig(schedule=Schedule(dense=2, every=3))
    run, _ = record(tmp_path, "train_mlp.py", "--steps", "7", config=config)
    assert sorted(values(run, "fc2", "act_rms").step) == [0, 1, 3, 6]
    assert sorted(values(run, "__run__", "loss").step) == list(range(7))


def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_which_files_are_model_scripts(tmp_path):
    assert follows_model_script_convention(SAMPLES / "gpt.py")
    assert not follows_model_script_convention(SCRIPTS / "train_mlp.py")
    # Names bound by assignment or import count; names inside the __main__ guard do not.
    bound = write(tmp_path, "bound.py", "from m import model\nbatches = loss = None\n")
    assert follows_model_script_convention(bound)
    guarded = write(
        tmp_path,
        "guarded.py",
        """
        if __name__ == "__main__":
            def model(cfg): ...
            def batches(cfg): ...
            def loss(m, b): ...
        """,
    )
    assert not follows_model_script_convention(guarded)


def test_run_script_runs_a_model_script_as_main(tmp_path):
    # gpt.py as __main__ defines its functions and trains nothing: that is said, exit 2.
    res = invoke("profile", SAMPLES / "gpt.py", "--run-script", "--out", tmp_path / "r", "-q")
    assert_one_line_error(res, "gpt.py ended without calling optimizer.step()")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--steps", "5", "--", "--steps", "2"], "--steps applies to model scripts"),
        (["--set", "lr=1", "--", "--steps", "2"], "--set applies to a model script"),
        (["--device", "cpu", "--", "--steps", "2"], "--device applies to model scripts"),
        (["--max-steps", "0", "--", "--steps", "2"], "--max-steps must be positive"),
        (["--stop-script", "--", "--steps", "2"], "--stop-script needs --max-steps"),
    ],
)
def test_options_that_do_not_apply_to_training_scripts(tmp_path, args, needle):
    res = invoke("profile", SCRIPTS / "train_mlp.py", "--out", tmp_path / "r", "-q", *args)
    assert_one_line_error(res, needle)


def test_training_script_options_on_a_model_script(tmp_path):
    res = invoke("profile", SAMPLES / "mlp.py", "--max-steps", "3", "--out", tmp_path / "r")
    assert_one_line_error(res, "--max-steps applies to training scripts", "--run-script")


def test_optimizer_steps_before_the_model_is_called_keep_their_numbers(tmp_path):
    script = write(
        tmp_path,
        "late.py",
        """
        import torch
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()  # a step before the model's first call (a manual update)
        opt.step()
        for step in range(3):
            loss = model(torch.ones(2, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        """,
    )
    run = tmp_path / "run"
    result = profile_training_script(script, [], run, RecorderConfig())
    assert result.steps == 5
    assert sorted(values(run, "__run__", "loss").step) == [2, 3, 4]


@pytest.mark.slow
def test_sample_training_script_from_the_readme(tmp_path):
    out = tmp_path / "plain"
    args = ["--depth", "2", "--width", "16", "--seq-len", "8", "--steps", "4", "--accum", "2"]
    res = invoke(
        "profile", SAMPLES / "train_plain.py", "--out", out, "-q", "--", *args, "--eval-every", "2"
    )
    assert res.exit_code == 0, res.output
    # The script prints "step k: loss X, held-out Y" (X rounded to 3 decimals).
    printed = {
        int(line.split()[1].rstrip(":")): float(line.split()[3].rstrip(","))
        for line in res.stdout.splitlines()
        if line.startswith("step ")
    }
    loss = values(out, "__run__", "loss").set_index("step").value
    assert sorted(printed) == [0, 2, 3]
    for step, value in printed.items():
        assert loss[step] == pytest.approx(value, abs=6e-4)
    meta = stabscope.read_meta(out)
    assert [b["name"] for b in meta["structure"]["blocks"]] == [
        "encoder.layers.0",
        "encoder.layers.1",
    ]
    assert sorted(values(out, "encoder.layers.0.linear1", "act_rms").call.unique()) == [0, 1]
    assert not values(out, "encoder.layers.0.linear1", "act_rms", phase="eval").empty


def test_models_trained_side_by_side_are_recorded_together(tmp_path):
    """An encoder and a critic, each with its own optimizer, called separately: both are the
    model, under their class names, and a step is one step of both optimizers. A weak proxy
    to one of them is not a third model."""
    script = write(
        tmp_path,
        "two_models.py",
        """
        import weakref
        import torch
        from torch import nn
        torch.manual_seed(0)
        encoder, critic = nn.Linear(3, 4), nn.Bilinear(4, 4, 1)
        # A live proxy passes isinstance(p, nn.Module) but is no module (type(p).forward fails).
        critic_ref = weakref.proxy(critic)
        teacher = nn.Linear(3, 4).requires_grad_(False)  # frozen: never part of the model
        opt_encoder = torch.optim.SGD(encoder.parameters(), lr=0.1)
        opt_critic = torch.optim.SGD(critic.parameters(), lr=0.1)
        for step in range(3):
            x = torch.ones(2, 3) * (step + 1)
            h = encoder(x)
            loss = critic(h, h).pow(2).mean() + (h - teacher(x)).pow(2).mean()
            for opt in (opt_encoder, opt_critic):
                opt.zero_grad()
            loss.backward()
            for opt in (opt_encoder, opt_critic):
                opt.step()
        """,
    )
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig())
    meta = stabscope.read_meta(run)
    assert meta["run"]["model"] == "Linear + Bilinear" and meta["run"]["optimizer"] == "SGD, SGD"
    assert {p["name"] for p in meta["parameters"]} == {
        "linear.weight",
        "linear.bias",
        "bilinear.weight",
        "bilinear.bias",
    }
    assert sorted(values(run, "__run__", "loss").step) == [0, 1, 2]
    # Step 0 by hand, from the same seed.
    torch.manual_seed(0)
    encoder, critic = nn.Linear(3, 4), nn.Bilinear(4, 4, 1)
    h = encoder(torch.ones(2, 3))
    out = critic(h, h)
    assert values(run, "linear", "act_rms").value[0] == pytest.approx(rms(h), rel=1e-6)
    assert values(run, "bilinear", "act_rms").value[0] == pytest.approx(rms(out), rel=1e-6)


LBFGS_SETUP = """\
import torch
from plain_loop import log_step
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
x, y = torch.randn(16, 4), torch.randn(16, 1)
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
"""


def lbfgs_script(tmp_path, loop: str):
    """lbfgs.py: a linear regression under LBFGS (``LBFGS_SETUP``), then ``loop``."""
    return write(tmp_path, "lbfgs.py", LBFGS_SETUP + textwrap.dedent(loop))


def test_closure_optimizer_loss_is_the_first_evaluation(tmp_path):
    log = tmp_path / "lbfgs.jsonl"
    script = lbfgs_script(
        tmp_path,
        f"""
        def closure():
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss
        for step in range(3):
            log_step({str(log)!r}, step=step, loss=opt.step(closure).item())
        """,
    )
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig())
    # LBFGS evaluates the closure up to 5 times per step; step() returns the first value.
    logged = [r["loss"] for r in read_log(log)]
    assert values(run, "__run__", "loss").value.tolist() == pytest.approx(logged, rel=1e-6)


def test_closure_optimizer_first_seen_inside_its_step_records_no_weights_from_after_it(tmp_path):
    """The model is first called inside LBFGS's closure, so step 0's optimizer step began
    before the run did: its weights at the step boundary are already step 1's, and its
    gradients the last line-search evaluation's. Step 0 has no parameter norms; every one
    recorded is that of the weights and the first evaluation's gradients its step received."""
    log = tmp_path / "lbfgs.jsonl"
    script = lbfgs_script(
        tmp_path,
        f"""
        for step in range(3):
            grads = []
            def closure():
                opt.zero_grad()
                loss = (model(x) - y).pow(2).mean()
                loss.backward()
                grads.append(model.weight.grad.norm().item())
                return loss
            weight = model.weight.detach().norm().item()
            opt.step(closure)
            log_step({str(log)!r}, step=step, weight=weight, grad=grads[0])
        """,
    )
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig())
    logged = read_log(log)
    norms = values(run, "weight", "param_norm")
    assert norms.step.tolist() == [1, 2]
    assert norms.value.tolist() == pytest.approx([r["weight"] for r in logged[1:]], rel=1e-6)
    grads = values(run, "weight", "param_grad_norm")
    assert grads.step.tolist() == [1, 2]
    assert grads.value.tolist() == pytest.approx([r["grad"] for r in logged[1:]], rel=1e-6)
    # The lr every step used, step 0's read when it ended; the optimizer is in meta.json.
    assert values(run, "__run__", "lr").value.tolist() == [0.5, 0.5, 0.5]
    assert [o["class"] for o in stabscope.read_meta(run)["optimizers"]] == ["LBFGS"]


def test_closure_optimizer_beside_one_that_never_steps_is_recorded_from_inside_its_step(
    tmp_path,
):
    """An Adam built over the same parameters and never stepped (a script that moves from
    Adam to LBFGS after 0 steps): the owners end a step only at LBFGS's second step, and
    LBFGS's first step began before the run did. That second step once raised inside
    stabscope (the update of weights never read), ending the recording at step 0."""
    log = tmp_path / "lbfgs.jsonl"
    script = lbfgs_script(
        tmp_path,
        f"""
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        def closure():
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss
        for step in range(6):
            weight = model.weight.detach().norm().item()
            loss = opt.step(closure)
            log_step({str(log)!r}, step=step, loss=loss.item(), weight=weight)
        """,
    )
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig())
    logged = read_log(log)
    meta = stabscope.read_meta(run)
    assert "tool_error" not in meta and meta["status"] == "complete"
    assert values(run, "__run__", "loss").value.tolist() == pytest.approx(
        [r["loss"] for r in logged], rel=1e-6
    )
    norms = values(run, "weight", "param_norm")
    assert len(norms) >= 4  # every step after the first two
    for step, value in zip(norms.step, norms.value):
        assert value == pytest.approx(logged[step]["weight"], rel=1e-6)


@pytest.mark.slow
def test_transformers_trainer_script(tmp_path):
    run, log = record(
        tmp_path, "train_hf.py", "--steps", "4", "--accum", "2", "--out-dir", str(tmp_path / "o")
    )
    meta = stabscope.read_meta(run)
    assert meta["run"]["model"] == "GPT2LMHeadModel" and meta["run"]["optimizer"] == "AdamW"
    assert [b["name"] for b in meta["structure"]["blocks"]] == [
        "transformer.h.0",
        "transformer.h.1",
    ]
    # The Trainer logs the mean over its micro-batches: the sum of what it backpropagated.
    assert values(run, "__run__", "loss").value.tolist() == pytest.approx(
        [r["loss"] for r in log], rel=1e-5
    )
    assert values(run, "transformer.h.0.mlp", "act_rms").call.tolist() == [0, 1] * 4
    # The model is given labels: its first call, replayed, gives the stability index.
    index = values(run, "__run__", "stability_index")
    assert index.step.tolist() == [2] and 0 < index.value[0] < float("inf")


def test_lr_is_the_one_each_optimizer_step_used(tmp_path):
    """As in the Recorder and the framework callbacks: the scheduler steps after the
    optimizer, and step s records the lr that step used, 0.1 · 0.5^s."""
    script = write(
        tmp_path,
        "sched.py",
        """
        import torch
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for step in range(4):
            loss = model(torch.ones(2, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        """,
    )
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig())
    lr = values(run, "__run__", "lr").sort_values("step")
    assert lr.step.tolist() == [0, 1, 2, 3]
    assert lr.value.tolist() == pytest.approx([0.1 * 0.5**s for s in range(4)], rel=1e-6)


@pytest.mark.parametrize("zeroing", ["opt.zero_grad()", "model.zero_grad(set_to_none=False)"])
def test_a_batch_the_script_skips_leaves_the_steps_loss_and_norm(tmp_path, zeroing):
    """A spike guard: backward, clip, and on every third batch drop the gradients and go on
    without a step. Each step's loss and grad_norm are those of the batch it stepped on, as
    the script logs them; the dropped batch's loss is not added to the next step's."""
    log = tmp_path / "guard.jsonl"
    script = write(
        tmp_path,
        "guard.py",
        f"""
        import torch
        from plain_loop import log_step, regression_batch
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(9):
            x, y = regression_batch(i, 4, 2, 16)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if i % 3 == 1:
                {zeroing}
                continue
            opt.step()
            {zeroing}
            log_step({str(log)!r}, loss=loss.item(), norm=norm.item())
        """,
    )
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig())
    logged = read_log(log)
    assert len(logged) == 6
    assert values(run, "__run__", "loss").value.tolist() == pytest.approx(
        [r["loss"] for r in logged], rel=1e-6
    )
    assert values(run, "__run__", "grad_norm").value.tolist() == pytest.approx(
        [r["norm"] for r in logged], rel=1e-6
    )


def test_a_second_model_is_named_by_the_module_the_script_calls(tmp_path):
    """A GAN whose discriminator keeps its layers in a child ``nn.Sequential``: the two hold
    the same parameters, and the discriminator, which the script calls, names them."""
    script = write(
        tmp_path,
        "gan.py",
        """
        import torch
        from torch import nn
        class Generator(nn.Module):
            def __init__(self):
                super().__init__()
                self.l1 = nn.Linear(8, 2)
            def forward(self, z):
                return self.l1(z)
        class Discriminator(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
            def forward(self, x):
                return self.net(x)
        torch.manual_seed(0)
        G, D = Generator(), Discriminator()
        og = torch.optim.Adam(G.parameters(), 1e-3)
        od = torch.optim.Adam(D.parameters(), 1e-3)
        for step in range(3):
            fake = G(torch.randn(16, 8))
            od.zero_grad()
            (D(torch.randn(16, 2)).mean() - D(fake.detach()).mean()).backward()
            od.step()
            og.zero_grad()
            (-D(fake).mean()).backward()
            og.step()
        """,
    )
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig())
    meta = stabscope.read_meta(run)
    assert meta["run"]["model"] == "Generator + Discriminator"
    assert {p["name"] for p in meta["parameters"]} == {
        "generator.l1.weight",
        "generator.l1.bias",
        *(f"discriminator.net.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")),
    }


def test_two_models_of_one_class_are_named_by_the_scripts_variables(tmp_path):
    """A two-tower recommender: two ``Tower`` models and an ``nn.Sequential`` scorer, each
    called on its own and trained by one optimizer. Their classes cannot tell them apart, so
    the recorded names are the script's variables (``user_tower``, ``item_tower``, ``scorer``),
    read from the frame of its ``main()``."""
    script = write(
        tmp_path,
        "towers.py",
        """
        import torch
        from torch import nn
        class Tower(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Linear(6, 4)
            def forward(self, x):
                return self.emb(x)
        def main():
            torch.manual_seed(0)
            user_tower, item_tower = Tower(), Tower()
            scorer = nn.Sequential(nn.Linear(1, 1))
            params = [*user_tower.parameters(), *item_tower.parameters(), *scorer.parameters()]
            opt = torch.optim.SGD(params, lr=0.1)
            for step in range(3):
                u, i = user_tower(torch.randn(8, 6)), item_tower(torch.randn(8, 6))
                score = scorer((u * i).sum(-1, keepdim=True))
                loss = nn.functional.binary_cross_entropy_with_logits(score, torch.ones(8, 1))
                opt.zero_grad()
                loss.backward()
                opt.step()
        main()
        """,
    )
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig())
    names = {p["name"] for p in stabscope.read_meta(run)["parameters"]}
    assert names == {
        *(f"{tower}.emb.{w}" for tower in ("user_tower", "item_tower") for w in ("weight", "bias")),
        "scorer.0.weight",
        "scorer.0.bias",
    }


def test_a_gradient_penalty_imported_by_name_is_not_the_losss_gradient(tmp_path):
    """WGAN-GP with ``from torch.autograd import grad`` at the script's top (before any run
    opens): the critic's head gets the loss's gradient for its real and fake calls only."""
    log = tmp_path / "wgan.jsonl"
    script = write(
        tmp_path,
        "wgan.py",
        f"""
        import torch
        from torch import nn
        from torch.autograd import grad
        from plain_loop import log_step
        torch.manual_seed(0)
        critic = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            real, fake = torch.randn(32, 2, generator=g) + 2, torch.randn(32, 2, generator=g)
            real_out, fake_out = critic(real), critic(fake)
            mix = torch.rand(32, 1, generator=g)
            interp = (mix * real + (1 - mix) * fake).requires_grad_(True)
            score = critic(interp)
            (slope,) = grad(score, interp, torch.ones_like(score), create_graph=True)
            loss = fake_out.mean() - real_out.mean() + 10 * (slope.norm(dim=1) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            log_step({str(log)!r}, loss=loss.item())
        """,
    )
    run = tmp_path / "run"
    profile_training_script(script, [], run, RecorderConfig())
    grads = values(run, "2", "grad_rms")
    assert sorted(grads[grads.step == 0].call) == [0, 1]  # the interpolated call: no row
    # d loss / d output: -1/32 for the real call's 32 outputs, +1/32 for the fake's.
    assert grads[grads.step == 0].value.tolist() == pytest.approx([1 / 32, 1 / 32], rel=1e-6)
    assert torch.autograd.grad.__module__ == "torch.autograd"  # given back at the end


def printed_and_recorded(tmp_path, capfd, text: str, args: list[str]) -> tuple[list, list]:
    """The ``LOSS step value`` lines a script printed, and the losses stabscope recorded."""
    script = tmp_path / "script.py"
    script.write_text(text)
    capfd.readouterr()
    profile_training_script(script, args, tmp_path / "run", RecorderConfig(online_rules=False))
    printed = [float(line.split()[2]) for line in capfd.readouterr().out.splitlines()
               if line.startswith("LOSS")]  # fmt: skip
    return printed, values(tmp_path / "run", stabscope.RUN_MODULE, "loss").value.tolist()


CHDIR = """
import os
import torch
import torch.nn.functional as F
from torch import nn

os.makedirs("elsewhere", exist_ok=True)
os.chdir("elsewhere")  # as Hydra's hydra.job.chdir does, before the model is built
torch.manual_seed(0)
model = nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), 0.1)
for step in range(5):
    x = torch.randn(8, 4)
    loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
    opt.zero_grad(); loss.backward(); opt.step()
"""


@pytest.mark.slow
def test_a_script_that_changes_directory_records_where_out_said(tmp_path, monkeypatch):
    """A relative --out means the caller's directory: the run is there, complete, and the
    script's new directory holds no run (it got the run and its lock before)."""
    (tmp_path / "chdir.py").write_text(CHDIR)
    monkeypatch.chdir(tmp_path)
    result = invoke("profile", "chdir.py", "--out", "runs/here", "-q", "--budget", "5")
    assert result.exit_code == 0, result.output
    meta = stabscope.read_meta(tmp_path / "runs" / "here")
    assert meta["status"] == "complete" and meta["steps"] == 5
    assert not (tmp_path / "elsewhere" / "runs").exists()


BACKWARD_FORMS = """
import sys
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
opt = torch.optim.Adam(model.parameters(), 1e-2)
g = torch.Generator().manual_seed(1)
for step in range(5):
    x = torch.randn(16, 4, generator=g)
    out = model(x)
    l1 = F.cross_entropy(out, (x[:, 0] > 0).long())
    l2 = out.pow(2).mean()
    opt.zero_grad()
    if sys.argv[1] == "direct":  # the call Tensor.backward makes, made by the script
        torch.autograd.backward(l1 + l2)
        objective = l1 + l2
    elif sys.argv[1] == "list":
        torch.autograd.backward([l1, l2])
        objective = l1 + l2
    elif sys.argv[1] == "gradient":
        (l1 + l2).backward(gradient=torch.tensor(1.0))
        objective = l1 + l2
    else:  # weights per loss: the gradients are those of 1.0 * l1 + 0.5 * l2
        torch.autograd.backward([l1, l2], grad_tensors=[torch.tensor(1.0), torch.tensor(0.5)])
        objective = l1 + 0.5 * l2
    opt.step()
    print("LOSS", step, repr(objective.item()))
"""


@pytest.mark.parametrize("form", ["direct", "list", "gradient", "weights"])
def test_every_form_of_backward_on_scalars_is_the_steps_loss(tmp_path, capfd, form):
    """``torch.autograd.backward(loss)`` called by the script (handed on to the first step's
    loss trace, which calls it again by name: step 0 read it twice before); several scalars
    in one call, a scalar's ``gradient=``, weights per scalar: the step's loss is the
    objective the gradients are of, Σ w_i · l_i (no loss was recorded before)."""
    printed, recorded = printed_and_recorded(tmp_path, capfd, BACKWARD_FORMS, [form])
    assert len(printed) == 5 and recorded == pytest.approx(printed, rel=1e-6)


def test_a_model_variable_named_like_a_module_attribute_keeps_its_class_name():
    """Two models of one class, one held in a variable named ``training`` (a module's own
    attribute, which no ModuleDict key may be): that one is named by its class, the other by
    its variable, and nothing raises."""
    from stabscope.drivers.zerocode.roots import TrainedModels

    training, item_tower = nn.Linear(2, 2), nn.Linear(2, 2)
    both = TrainedModels([training, item_tower], __file__)
    assert list(both) == ["linear", "item_tower"]
