"""The planned lr curve (meta.json's ``lr_plan``): equal, step by step, to what the scheduler
then does in training; training with a plan is bit-identical to training without; the
chunked form of a long plan never underestimates; every mode writes it."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as sched

import stabscope
from stabscope import Schedule
from stabscope.drivers.zerocode import profile_training_script
from stabscope.record.config import RecorderConfig
from stabscope.record.lr_plan import plan_lrs
from stabscope.store import MetaError, read_meta, save_meta
from stabscope.store.lr_plan import MAX_POINTS, peak_lr_after, planned_lr
from tests.conftest import ROOT, batch_maker, mlp
from tests.test_cli import assert_one_line_error, invoke

STEPS = 24


def two_groups(model: torch.nn.Module, kind: str = "adamw", lr: float | torch.Tensor = 1e-2):
    """Weights and biases in two param groups with different lrs."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": weights}, {"params": biases, "lr": 3e-2}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr, foreach=False)


def make_scheduler(kind: str, opt: torch.optim.Optimizer, total: int):
    if kind == "warmup":  # linear warm-up over 8 steps, then 1/sqrt decay
        return sched.LambdaLR(opt, lambda s: min((s + 1) / 8, (8 / (s + 1)) ** 0.5))
    if kind == "onecycle":  # also cycles AdamW's beta1 / SGD's momentum
        return sched.OneCycleLR(opt, max_lr=[0.05, 0.2], total_steps=total + 10)
    if kind == "sequential":
        warm = sched.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=6)
        cosine = sched.CosineAnnealingLR(opt, T_max=total - 6, eta_min=1e-4)
        return sched.SequentialLR(opt, [warm, cosine], milestones=[6])
    if kind == "plateau":
        return sched.ReduceLROnPlateau(opt, patience=0)
    raise ValueError(kind)


def train(kind: str, rec_dir=None, opt_kind: str = "adamw", lr: float | torch.Tensor = 1e-2):
    """STEPS steps of Adam(W)/SGD on an MLP with a scheduler stepped after every optimizer
    step, under a Recorder that plans the lr when ``rec_dir`` is given. Returns the model,
    the max lr over groups each optimizer.step() used, the optimizer and the scheduler."""
    torch.manual_seed(0)
    model = mlp()
    opt = two_groups(model, opt_kind, lr)
    scheduler = None if kind == "none" else make_scheduler(kind, opt, STEPS)
    make = batch_maker(6, 3)
    used: list[float] = []
    rec = None
    if rec_dir is not None:
        schedule = Schedule(dense=3, every=7)
        rec = stabscope.Recorder(
            model, rec_dir, schedule=schedule, schedulers=scheduler, budget=STEPS
        ).start()
    for step in range(STEPS):
        x, y = make(step)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        used.append(max(float(g["lr"]) for g in opt.param_groups))
        opt.step()
        if isinstance(scheduler, sched.ReduceLROnPlateau):
            scheduler.step(loss.item())
        elif scheduler is not None:
            scheduler.step()
        if rec is not None:
            rec.step(loss=loss)
    if rec is not None:
        rec.close()
    return model, used, opt, scheduler


def recorded_lr(run_dir) -> dict[int, float]:
    """The max over param groups of the ``lr`` rows, per step."""
    df = stabscope.load_run(run_dir, metrics="lr")
    return df.groupby("step").value.max().astype(float).to_dict()


@pytest.mark.parametrize("kind", ["warmup", "onecycle", "sequential", "none"])
def test_the_plan_is_what_the_scheduler_then_does(run_dir, kind):
    _, used, _, _ = train(kind, run_dir)
    plan = read_meta(run_dir)["lr_plan"]
    assert plan["source"] == ("constant" if kind == "none" else "scheduler")
    assert plan["budget"] == STEPS and plan["from_step"] == 0
    assert plan["steps"] == list(range(STEPS))
    assert plan["lr"] == used  # exactly: the same float arithmetic, before it happens
    assert (len(set(used)) == 1) == (kind == "none")  # a scheduler that moves the lr
    top = int(np.argmax(used))
    assert plan["peak"] == {"step": top, "lr": used[top]}
    # The recorder's own lr rows (float32) say the same at every step.
    rows = recorded_lr(run_dir)
    assert sorted(rows) == list(range(STEPS))
    np.testing.assert_allclose([rows[s] for s in range(STEPS)], used, rtol=1e-6)
    steps, lrs = planned_lr(read_meta(run_dir))
    assert steps.tolist() == list(range(STEPS)) and lrs.tolist() == used


@pytest.mark.parametrize(
    ("kind", "opt_kind", "lr"),
    [
        ("onecycle", "adamw", 1e-2),  # moves beta1 too
        ("onecycle", "sgd", 1e-2),  # moves momentum
        ("sequential", "adamw", 1e-2),
        ("warmup", "adamw", "tensor"),  # a tensor lr, filled in place by the scheduler
    ],
)
def test_training_with_a_plan_is_bit_identical(tmp_path, kind, opt_kind, lr):
    def tensor_or(x):
        return torch.tensor(x) if lr == "tensor" else x

    plain, used, opt_a, sched_a = train(kind, None, opt_kind, tensor_or(1e-2))
    planned, used_b, opt_b, sched_b = train(kind, tmp_path / "run", opt_kind, tensor_or(1e-2))
    assert read_meta(tmp_path / "run")["lr_plan"]["lr"] == used
    assert used_b == used
    for (name, a), b in zip(plain.state_dict().items(), planned.state_dict().values()):
        assert torch.equal(a, b), name
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert {k: v for k, v in ga.items() if k not in ("params", "lr", "initial_lr")} == {
            k: v for k, v in gb.items() if k not in ("params", "lr", "initial_lr")
        }
        assert float(ga["lr"]) == float(gb["lr"])
    assert sched_a.last_epoch == sched_b.last_epoch == STEPS
    assert [float(v) for v in sched_a.get_last_lr()] == [float(v) for v in sched_b.get_last_lr()]


def test_a_metric_driven_scheduler_is_unknown_and_training_goes_on(run_dir, tmp_path):
    model, used, _, _ = train("plateau", run_dir)
    plan = read_meta(run_dir)["lr_plan"]
    assert plan["source"] == "unknown" and "ReduceLROnPlateau" in plan["note"]
    assert plan["lr"] == [] and planned_lr(read_meta(run_dir)) is None
    assert peak_lr_after(read_meta(run_dir), 0) is None
    plain, used_plain, _, _ = train("plateau", None)
    assert used == used_plain and len(set(used)) > 1  # the plateau did cut the lr
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def test_a_scheduler_that_raises_is_unknown_and_left_as_it_was():
    """OneCycleLR refuses to step past total_steps: a budget past it cannot be planned, and
    the scheduler and groups come back as they were (lr, beta1, step counters)."""
    torch.manual_seed(0)
    opt = two_groups(mlp())
    one = sched.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    before = [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]
    state = one.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks out, torch's order warning included
        plan = plan_lrs([opt], one, budget=30, start_step=0)
    assert plan["source"] == "unknown" and "ValueError" in plan["note"]
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups] == (
        before
    )
    assert one.state_dict() == state
    assert plan_lrs([opt], one, budget=11, start_step=0)["source"] == "scheduler"


def test_a_recorder_started_by_its_first_step_plans_from_the_next(run_dir):
    """Without start(), the first step() opens the run after that step's scheduler step:
    the plan starts at step 1, whose lr the first optimizer step after it uses."""
    torch.manual_seed(0)
    model = mlp()
    opt = two_groups(model)
    warm = make_scheduler("warmup", opt, STEPS)
    rec = stabscope.Recorder(model, run_dir, schedulers=warm, budget=10)
    make = batch_maker(6, 3)
    used = []
    for step in range(10):
        x, y = make(step)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        used.append(max(g["lr"] for g in opt.param_groups))
        opt.step()
        warm.step()
        rec.step()
    rec.close()
    plan = read_meta(run_dir)["lr_plan"]
    assert plan["from_step"] == 1 and plan["steps"] == list(range(1, 10))
    assert plan["lr"] == used[1:]


def sawtooth(budget: int) -> tuple[torch.optim.Optimizer, object, list[float]]:
    """Warm restarts every 37 steps under a 1500-step warm-up (a jagged 5000-step curve),
    and the lr the scheduler then really gives each of ``budget`` steps."""

    def build():
        p = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.SGD([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}])
        opt.param_groups[1]["lr"] = 2e-3
        opt.param_groups[0]["lr"] = 1e-3
        restarts = sched.CosineAnnealingWarmRestarts(opt, T_0=37)
        warm = sched.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 1500))
        return opt, sched.ChainedScheduler([restarts, warm])

    opt, chain = build()
    actual = []
    for _ in range(budget):
        actual.append(max(g["lr"] for g in opt.param_groups))
        opt.step()  # no gradients: a no-op that marks the step
        chain.step()
    opt, chain = build()
    return opt, chain, actual


def test_a_long_plan_is_chunked_and_never_underestimates(tmp_path):
    budget = 5000
    opt, chain, actual = sawtooth(budget)
    plan = plan_lrs([opt], chain, budget)
    assert plan["source"] == "scheduler" and len(plan["steps"]) <= MAX_POINTS
    meta = {"schema_version": 1, "status": "complete", "lr_plan": plan}
    save_meta(tmp_path, meta)  # through meta.json and its check, as a rule reads it
    steps, lrs = planned_lr(read_meta(tmp_path))
    ends = [*steps[1:].tolist(), budget]
    assert steps[0] == 0 and all(e > s for s, e in zip(steps, ends))  # contiguous cover
    for s, e, lr in zip(steps, ends, lrs):
        assert lr >= max(actual[s:e]) and lr == max(actual[s:e])  # the chunk's exact max
    top = int(np.argmax(actual))
    assert plan["peak"] == {"step": top, "lr": actual[top]}
    for start in [0, 1, 3, 1499, 1500, 2222, 4321, 4995, 4999]:
        step, lr = peak_lr_after(read_meta(tmp_path), start)
        assert lr >= max(actual[start:]) and step >= start
        if top >= start:
            assert (step, lr) == (top, actual[top])
    assert peak_lr_after(read_meta(tmp_path), budget) is None


def test_a_damaged_plan_is_a_meta_error(tmp_path):
    save_meta(tmp_path, {"schema_version": 1, "status": "complete", "lr_plan": {"steps": 3}})
    with pytest.raises(MetaError, match="lr_plan"):
        read_meta(tmp_path)


MODEL_SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn

    CONFIG = {"lr": 0.05, "warmup": 5, "total": 40}

    def model(cfg):
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def batches(cfg):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(8, 4, generator=g)

    def loss(model, batch):
        return model(batch).pow(2).mean()

    def scheduler(optimizer, cfg):
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, 0.2, 1.0, total_iters=cfg.warmup)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.total - cfg.warmup)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, decay], [cfg.warmup])
""")


@pytest.mark.slow
def test_profile_writes_the_plan_the_recorded_lr_follows(tmp_path):
    script = tmp_path / "warm.py"
    script.write_text(MODEL_SCRIPT)
    out = tmp_path / "run"
    res = invoke("profile", script, "--steps", 12, "--budget", 40, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    meta = read_meta(out)
    plan = meta["lr_plan"]
    assert plan["source"] == "scheduler" and plan["budget"] == 40
    assert plan["steps"] == list(range(40)) and plan["peak"]["step"] == 5
    rows = recorded_lr(out)
    assert sorted(rows) == list(range(12))
    np.testing.assert_allclose([rows[s] for s in range(12)], plan["lr"][:12], rtol=1e-6)
    # The plan goes on past the profiled steps: the cosine's value at its step 34 of 35.
    assert plan["lr"][39] == pytest.approx(0.05 * (1 + math.cos(math.pi * 34 / 35)) / 2)
    # Without --budget the plan is the profiled steps.
    res = invoke("profile", script, "--steps", 7, "--out", tmp_path / "r7", "-q")
    assert res.exit_code == 0 and read_meta(tmp_path / "r7")["lr_plan"]["budget"] == 7
    assert read_meta(tmp_path / "r7")["lr_plan"]["lr"] == plan["lr"][:7]


def test_profile_refuses_a_budget_shorter_than_the_steps(tmp_path):
    script = tmp_path / "warm.py"
    script.write_text(MODEL_SCRIPT)
    out = tmp_path / "run"
    res = invoke("profile", script, "--steps", 12, "--budget", 5, "--out", out)
    assert_one_line_error(res, "--budget 5 is less than --steps 12")
    assert not out.exists()
    assert_one_line_error(invoke("profile", script, "--budget", 0), "--budget must be positive")


TRAINING_SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 2e-2}],
        lr=1e-2,
    )
    warm = torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=4)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=26)
    schedule = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[4])
    for step in range(10):
        x = torch.randn(8, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
""")


@pytest.mark.slow
def test_zero_code_plans_the_scripts_scheduler_to_the_budget(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAINING_SCRIPT)
    out = tmp_path / "run"
    profile_training_script(script, [], out, RecorderConfig(), budget=30)
    plan = read_meta(out)["lr_plan"]
    assert plan["source"] == "scheduler" and plan["budget"] == 30 and len(plan["lr"]) == 30
    assert plan["peak"] == {"step": 4, "lr": 2e-2}  # the warm-up's end, in the larger group
    rows = recorded_lr(out)
    np.testing.assert_allclose([rows[s] for s in range(10)], plan["lr"][:10], rtol=1e-6)
    # Without a budget the plan says what is missing; --stop-script's --max-steps is one.
    profile_training_script(script, [], tmp_path / "none", RecorderConfig())
    plan = read_meta(tmp_path / "none")["lr_plan"]
    assert plan["source"] == "unknown" and "--budget" in plan["note"]
    res = invoke(
        "profile", script, "--max-steps", 6, "--stop-script", "-q", "--out", out, "--force"
    )
    assert res.exit_code == 0, res.output
    plan, rows = read_meta(out)["lr_plan"], recorded_lr(out)
    assert plan["budget"] == 6 and sorted(rows) == list(range(6))
    np.testing.assert_allclose([rows[s] for s in range(6)], plan["lr"], rtol=1e-6)


@pytest.mark.slow
def test_a_weak_proxy_to_the_scheduler_does_not_step_the_plan_twice(tmp_path):
    """A script holding ``weakref.proxy(schedule)`` (a callback registry, a logger) keeps a
    second object that passes isinstance for the scheduler: the plan is the scheduler's own,
    whose lr is the warm-up's end at step 4, as the recorded lr shows."""
    script = tmp_path / "train.py"
    script.write_text(
        TRAINING_SCRIPT.replace(
            "for step", "import weakref\nref = weakref.proxy(schedule)\nfor step", 1
        )
    )
    out = tmp_path / "run"
    profile_training_script(script, [], out, RecorderConfig(), budget=30)
    plan = read_meta(out)["lr_plan"]
    assert plan["peak"] == {"step": 4, "lr": 2e-2}
    rows = recorded_lr(out)
    np.testing.assert_allclose([rows[s] for s in range(10)], plan["lr"][:10], rtol=1e-6)


def test_lightning_plans_its_step_schedulers_and_not_epoch_ones(tmp_path):
    from tests.test_integrations_lightning import Regressor, fit

    module = Regressor(warmup=3)
    fit(module, tmp_path / "step")
    plan = read_meta(tmp_path / "step")["lr_plan"]
    assert plan["source"] == "scheduler" and plan["budget"] == len(module.steps) == 5
    assert plan["lr"] == [s["lr"] for s in module.steps]

    class PerEpoch(Regressor):
        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            decay = sched.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "epoch"}}

    fit(PerEpoch(), tmp_path / "epoch")
    plan = read_meta(tmp_path / "epoch")["lr_plan"]
    assert plan["source"] == "unknown" and "StepLR is stepped per epoch" in plan["note"]
    assert plan["budget"] == 5


@pytest.mark.slow
def test_hf_trainer_plans_its_warmup_and_decay_to_max_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    from stabscope.integrations.hf import StabscopeCallback
    from tests.test_integrations_hf import Witness, dataset, tiny_gpt2

    model = tiny_gpt2()
    witness = Witness(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    callback = StabscopeCallback(tmp_path / "run", schedule=Schedule(dense=2, every=0))
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[witness, callback]).train()
    plan = read_meta(tmp_path / "run")["lr_plan"]
    used = [s["lr"] for s in witness.steps]
    assert plan["source"] == "scheduler" and plan["budget"] == 6
    assert plan["lr"] == used and math.isclose(max(used), 1e-3)


@pytest.mark.slow
def test_the_read_side_does_not_import_torch(tmp_path):
    save_meta(tmp_path, {"schema_version": 1, "status": "complete", "lr_plan": PLAN})
    code = (
        "import sys; from stabscope.store import read_meta; "
        "from stabscope.store.lr_plan import peak_lr_after; "
        f"assert peak_lr_after(read_meta({str(tmp_path)!r}), 2) == (3, 0.4); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


#: A five-step plan written by hand: the warm-up peaks at step 3.
PLAN = {
    "budget": 5,
    "source": "scheduler",
    "from_step": 0,
    "steps": [0, 1, 2, 3, 4],
    "lr": [0.1, 0.2, 0.3, 0.4, 0.35],
    "peak": {"step": 3, "lr": 0.4},
}


def test_two_optimizers_are_planned_together(run_dir):
    """Adam for the first layer, SGD for the rest (two optimizers stepped one after the
    other, as Muon + AdamW or a frozen-backbone fine-tune do): the plan is the max lr over
    both, the second one's scheduler included, as the lr rows and the index read it."""
    torch.manual_seed(0)
    model = mlp()
    first = [p for n, p in model.named_parameters() if n.startswith("0.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    adam = torch.optim.Adam(first, lr=5e-2)  # above the SGD lr until the ramp
    sgd = torch.optim.SGD(rest, lr=1e-2)
    ramp = sched.LambdaLR(sgd, lambda s: 1.0 if s < 6 else 100.0)  # x100 from step 6
    make = batch_maker(6, 3)
    used = []
    with stabscope.Recorder(model, run_dir, schedulers=ramp, budget=10) as rec:
        for step in range(10):
            x, y = make(step)
            adam.zero_grad()
            sgd.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            used.append(max(g["lr"] for o in (adam, sgd) for g in o.param_groups))
            adam.step()
            sgd.step()
            ramp.step()
            rec.step(loss=loss)
    plan = read_meta(run_dir)["lr_plan"]
    assert plan["from_step"] == 0 and plan["steps"] == list(range(10))
    assert plan["lr"] == pytest.approx(used) and plan["peak"]["lr"] == pytest.approx(1.0)
    assert recorded_lr(run_dir) == pytest.approx(dict(enumerate(used)), rel=1e-6)
