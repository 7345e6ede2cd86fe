"""How far the attention probe's sampled statistics are from the full computation.

    python bench/attention_sampling.py --cache /tmp/attn    # the three models below, 150 steps
    python bench/attention_sampling.py --task successor --steps 300 --lr 1e-3  # near-uniform

Models, Adam, vocabulary 256, on a task that needs attention (``--task periodic``: 3 random
tokens repeated; the next token is the one 2 back, found only by attention) or the
sample GPT's successor task (``--task successor``: the next token depends on the current one
only, so attention may stay near uniform):
  gpt     the sample GPT (sample_models/gpt.py), Pre-LN, 6 layers, d=128, 4 heads
  gpt2    transformers' GPT2LMHeadModel from a config: 4 layers, d=128, 4 heads, sdpa
  llama   transformers' LlamaForCausalLM from a config: 4 layers, d=128, 4 heads, 2 kv heads
At init and after ``--steps`` steps, one forward pass on a held-out batch of ``--batch``
sequences is taken apart: every ``F.scaled_dot_product_attention`` call's q, k, mask and
scale are caught (a TorchFunctionMode), and per head

  full      mean normalised entropy over every query with two or more keys, of every
            sequence; max |logit| over every query and allowed key of every sequence
  before    the probe before: the first 2 sequences at 16 evenly spaced queries
  all-q     every query of the first 2 sequences
  recorded  what the probe records now (``sdpa_sample``, the recorder's own function), for
            each sampling in ``--samplings``
  bound     scale · max ‖q_i‖ · max ‖k_j‖ over every sequence (Cauchy-Schwarz): an upper
            bound of the true maximum, for scale

Reported per model and state, over all (layer, head) pairs: the entropy's error (recorded −
full; absolute, as entropy is in [0, 1]) and each max estimate's relative error
(estimate / full − 1). ``--cache DIR`` keeps the trained weights for the next run.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
import gpt

from stabscope.drivers.script import ScriptConfig
from stabscope.probes.attention import AttentionSampling, query_positions, sdpa_sample

SDPA = F.scaled_dot_product_attention


class Catch(TorchFunctionMode):
    """Every SDPA call's q, k, mask, causal flag and scale."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            bound = dict(zip(("q", "k", "v", "mask", "dropout_p", "causal", "scale"), args))
            bound.update(
                {
                    {"attn_mask": "mask", "is_causal": "causal"}.get(k, k): v
                    for k, v in kwargs.items()
                }
            )
            self.calls.append(
                {
                    "q": bound["q"].detach().float(),
                    "k": bound["k"].detach().float(),
                    "mask": None if bound.get("mask") is None else bound["mask"].detach(),
                    "causal": bool(bound.get("causal", False)),
                    "scale": bound.get("scale"),
                }
            )
        return func(*args, **kwargs)


def allowed_and_logits(call: dict, b: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, S) logits and allowed keys of one call, from its first ``b`` sequences."""
    q, k, mask = call["q"][:b], call["k"][:b], call["mask"]
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = call["scale"] or 1 / math.sqrt(q.shape[-1])
    logits = q @ k.transpose(-2, -1) * scale
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if call["causal"]:
        allowed &= torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if mask is not None:
        mask = mask.expand(call["q"].shape[0], q.shape[1], q.shape[2], k.shape[2])[:b]
        if mask.dtype == torch.bool:
            allowed &= mask
        else:
            ok = torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min / 2)
            allowed &= ok
            logits = logits + mask.float().masked_fill(~ok, 0)
    return logits, allowed


def full_stats(call: dict, b: int | None = None, queries: int | None = None) -> torch.Tensor:
    """(H, 2): mean normalised entropy over every row with 2+ keys, max |logit| allowed; of
    the first ``b`` sequences, at ``queries`` evenly spaced positions (None: all)."""
    logits, allowed = allowed_and_logits(call, b)
    if queries is not None:
        qi = query_positions(logits.shape[2], queries, logits.device)
        logits, allowed = logits[:, :, qi], allowed[:, :, qi]
    p = logits.masked_fill(~allowed, -math.inf).softmax(-1)
    ent = torch.special.entr(p).sum(-1)
    keys = allowed.sum(-1)
    valid = keys > 1
    norm = torch.where(valid, ent / torch.log(keys.clamp(min=2).float()), 0)
    mean = norm.sum((0, 2)) / valid.sum((0, 2))
    peak = logits.abs().masked_fill(~allowed, 0).amax((0, 2, 3))
    return torch.stack((mean, peak), 1)


def bound(call: dict, b: int | None) -> torch.Tensor:
    """(H,) scale · max_i ‖q_i‖ · max_j ‖k_j‖ over the first ``b`` sequences (None: all)."""
    q, k = call["q"][:b], call["k"][:b]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = call["scale"] or 1 / math.sqrt(q.shape[-1])
    return scale * q.norm(dim=-1).amax((0, 2)) * k.norm(dim=-1).amax((0, 2))


def build(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Callable]:
    torch.manual_seed(args.seed)
    if name == "gpt":
        cfg = ScriptConfig(
            gpt.CONFIG
            | dict(depth=6, width=128, heads=4, seq_len=args.seq_len, vocab=256, successors=4)
        )
        return gpt.model(cfg), lambda m, x: m(x)
    import transformers as tf

    common = dict(vocab_size=256, attn_implementation="sdpa")
    if name == "gpt2":
        config = tf.GPT2Config(
            n_layer=4, n_embd=128, n_head=4, n_positions=args.seq_len,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )  # fmt: skip
        model = tf.GPT2LMHeadModel(config)
    else:
        config = tf.LlamaConfig(
            num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, max_position_embeddings=args.seq_len, **common,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(config)
    return model, lambda m, x: m(input_ids=x).logits


def measure(model, logits_of, batch, samplings: list[AttentionSampling]) -> dict[str, np.ndarray]:
    """Per (layer, head): the full statistics, each sampling's probe values, and for the
    first sampling the other max estimates, from one forward pass."""
    model.eval()
    with torch.no_grad(), Catch() as catch:
        logits_of(model, batch)
    model.train()
    out: dict[str, list] = {}

    def add(key: str, value: torch.Tensor) -> None:
        out.setdefault(key, []).append(value.double())

    for call in catch.calls:
        full = full_stats(call)
        add("ent", full[:, 0])
        add("max", full[:, 1])
        for i, sampling in enumerate(samplings):
            probe = sdpa_sample(
                call["q"], call["k"], call["mask"], call["causal"], call["scale"], sampling
            )
            add(f"ent{i}", probe[:, 0])
            add(f"max{i}", probe[:, 1])
        before = full_stats(call, 2, 16)  # the probe before: 2 sequences x 16 queries
        add("ent_before", before[:, 0])
        add("max_before", before[:, 1])
        every = full_stats(call, 2)  # every query of those 2 sequences
        add("ent_allq", every[:, 0])
        add("max_allq", every[:, 1])
        add("max_cs", bound(call, None))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def periodic_batches(batch: int, length: int, period: int = 3):
    """Endless (B, length+1) sequences: ``period`` random tokens, repeated; from position
    ``period`` on, the next token is the one ``period - 1`` back, found only by attention."""
    g = torch.Generator().manual_seed(7)
    while True:
        x = torch.randint(256, (batch, period), generator=g)
        yield x.repeat(1, length // period + 2)[:, : length + 1]


def train(model, logits_of, data, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = next(data)
        out = logits_of(model, batch[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def pct(x: np.ndarray) -> str:
    return f"{np.median(x):+.1%} [{x.min():+.1%}, {x.max():+.1%}]"


def rows(name: str, state: str, m: dict[str, np.ndarray], samplings) -> list[str]:
    """Table rows: the probe before (2 sequences x 16 evenly spaced queries), every query of
    those 2 sequences, each sampling of the probe now, the Cauchy-Schwarz bound (max only)."""
    lines = [
        ("before: first 2 seqs x 16 queries", "before"),
        ("every query of the first 2 seqs", "allq"),
        *(
            (f"{s.batch * s.queries} rows spread, {s.peak} likeliest per seq", str(i))
            for i, s in enumerate(samplings)
        ),
        ("Cauchy-Schwarz upper bound", "cs"),
    ]
    out = []
    for label, key in lines:
        ent = m.get(f"ent_{key}", m.get(f"ent{key}"))
        top = m.get(f"max_{key}", m.get(f"max{key}"))
        entropy = "-"
        if ent is not None:
            err = ent - m["ent"]
            entropy = f"{np.median(np.abs(err)):.4f} / {np.abs(err).max():.4f} ({err.mean():+.4f})"
        out.append(
            f"| {name} | {state} | {label} | {m['ent'].mean():.3f} | {entropy} | "
            f"{np.median(m['max']):.3g} | {pct(top / m['max'] - 1)} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="gpt,gpt2,llama")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="sequences per batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--samplings",
        default="2x16x4,2x16x0,2x16x1,2x16x8,4x16x4",
        help="samplings compared, AttentionSampling(batch, queries, peak) as BxQxP: B·Q "
        "entropy rows spread over the sequences, P likeliest queries per sequence for the max",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", choices=("periodic", "successor"), default="periodic")
    ap.add_argument("--cache", default="", help="keep trained weights here, reuse them")
    args = ap.parse_args()
    samplings = [AttentionSampling(*map(int, s.split("x"))) for s in args.samplings.split(",")]
    task = ScriptConfig(
        gpt.CONFIG
        | dict(seq_len=args.seq_len, batch_size=args.batch, vocab=256, successors=4, task_seed=7)
    )
    print(
        f"# attention sampling: {args.task} task, seq {args.seq_len}, batch {args.batch}, "
        f"{args.steps} steps at lr {args.lr:g}, "
        f"torch {torch.__version__}"
    )
    print(
        "| model | state | rows read | full entropy (mean) | entropy error: median / max abs "
        "(mean) | full max logit (median) | max: median [min, max] rel. error |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, logits_of = build(name, args)
        data = (
            gpt.batches(task)
            if args.task == "successor"
            else periodic_batches(args.batch, args.seq_len)
        )
        probe_batch = next(data)[:, :-1]  # the same held-out batch at init and after training
        for line in rows(
            name, "init", measure(model, logits_of, probe_batch, samplings), samplings
        ):
            print(line, flush=True)
        tag = f"{name}-{args.task}-{args.seq_len}-{args.steps}-{args.lr:g}"
        cached = Path(args.cache) / f"{tag}.pt" if args.cache else None
        if cached is not None and cached.exists():  # trained before: same weights, same loss
            saved = torch.load(cached)
            model.load_state_dict(saved["model"])
            loss = saved["loss"]
        else:
            loss = train(model, logits_of, data, args.steps, args.lr)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": model.state_dict(), "loss": loss}, cached)
        state = f"step {args.steps} (loss {loss:.2f})"
        m = measure(model, logits_of, probe_batch, samplings)
        for line in rows(name, state, m, samplings):
            print(line, flush=True)


if __name__ == "__main__":
    main()
