"""Naming and selecting the modules and parameters of a model, and the module table in meta.

Names are the qualified names of ``named_modules()`` with wrapper prefixes removed
(``_orig_mod.`` from ``torch.compile``, ``module.`` from DDP), so the same model gives the same
names however it is wrapped. The root module is called ``<root>``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from ..errors import UsageError

ROOT_NAME = "<root>"

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")

# Coarse roles from the class name; transformer structure proper is found elsewhere.
_ROLE_BY_TYPE = (
    ("loss", re.compile(r"Loss$")),
    ("norm", re.compile(r"Norm", re.I)),
    ("attention", re.compile(r"Attention|Attn", re.I)),
    ("embedding", re.compile(r"Embedding")),
    ("mlp", re.compile(r"MLP|FeedForward|FFN", re.I)),
    ("linear", re.compile(r"^(Linear|Conv1D|LazyLinear|Bilinear|NonDynamically\w*Linear)$")),
    ("conv", re.compile(r"^Conv")),
    ("dropout", re.compile(r"Dropout")),
    (
        "activation",
        re.compile(
            r"^(ReLU|GELU|SiLU|Tanh|Sigmoid|Softmax|LeakyReLU|ELU|Mish|"
            r"NewGELUActivation|GELUActivation|SiLUActivation)"
        ),
    ),
    ("container", re.compile(r"^(ModuleList|ModuleDict|Sequential|ParameterList)$")),
)
_ROLE_BY_NAME = (
    ("attention", re.compile(r"(^|\.)(attn|attention|self_attn|self_attention)$")),
    ("mlp", re.compile(r"(^|\.)(mlp|ffn|feed_forward|feedforward)$")),
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP-style wrappers (``.module``) and ``torch.compile``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model = model.module  # type: ignore[assignment]
    return model


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules (inside its wrappers) by their ``clean_name``: the names the
    structure, the run table and the probes use."""
    return {clean_name(n): m for n, m in unwrap_model(model).named_modules()}


def clean_name(name: str) -> str:
    """Qualified name without wrapper prefixes; ``<root>`` for the model itself."""
    parts = [p for p in name.split(".") if p not in ("_orig_mod",)]
    name = ".".join(parts)
    return name or ROOT_NAME


def layer_index(name: str) -> int | None:
    """The first integer component of a qualified name (``blocks.3.attn`` -> 3)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def guess_role(name: str, module: nn.Module) -> str:
    """A coarse role for display and grouping: norm, attention, mlp, linear, block, ..."""
    if name == ROOT_NAME:
        return "model"
    type_name = type(module).__name__
    for role, pattern in _ROLE_BY_TYPE:
        if pattern.search(type_name):
            return role
    for role, pattern in _ROLE_BY_NAME:
        if pattern.search(name):
            return role
    if re.search(r"\.\d+$", name) and any(True for _ in module.children()):
        return "block"
    return "other"


def matches(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Glob selection on qualified names (``*`` also crosses dots)."""
    if not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def scripted(module: nn.Module) -> bool:
    """A TorchScript module (``torch.jit.script`` or ``torch.jit.trace``): its forward runs in
    TorchScript, where Python hooks never fire, and its class's ``forward`` is a descriptor
    that fails when read from the class. Its parameters are ordinary tensors, read as any."""
    return isinstance(module, torch.jit.ScriptModule)


def scripted_note(model: nn.Module) -> str | None:
    """meta.json's note for a model with scripted modules (the outermost ones named)."""
    outer = [
        clean_name(n) for n, m in unwrap_model(model).named_modules() if scripted(m)
    ]  # a scripted module's children are scripted too: keep the outermost
    outer = [n for n in outer if not any(n.startswith(o + ".") for o in outer if o != n)]
    if not outer:
        return None
    if ROOT_NAME in outer:
        return (
            "the model runs as TorchScript (torch.jit): Python hooks never fire inside it, so "
            "no module's activations or gradients are recorded, nor anything that replays its "
            "forward; its parameters, the loss and the optimizer's steps are"
        )
    named = ", ".join(outer[:4]) + (f" and {len(outer) - 4} more" if len(outer) > 4 else "")
    return (
        f"{named} run as TorchScript (torch.jit): Python hooks never fire inside them, so "
        "their activations and gradients are not recorded; their parameters are"
    )


def defines_forward(module: nn.Module) -> bool:
    """Whether the module's class defines a forward: a ``ModuleList`` does not, and is never
    called; a scripted module does (read without touching its class's descriptor)."""
    return scripted(module) or type(module).forward is not nn.Module.forward


def select_modules(
    model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()
) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs to hook, in ``named_modules`` order; shared modules appear once.

    Containers without a forward of their own (``ModuleList``, ``ModuleDict``) are left out:
    they are never called, so a hook on them could never fire; so are scripted modules
    (``scripted``), whose hooks never fire either. So are loss modules
    (``nn.CrossEntropyLoss`` and the other ``torch.nn`` losses) that a LightningModule or a
    model holds: their output is the loss, recorded as such, and the gradient w.r.t. it is 1.
    """
    include, exclude = tuple(include), tuple(exclude)
    out = []
    for raw, module in unwrap_model(model).named_modules():
        name = clean_name(raw)
        if scripted(module) or not defines_forward(module) or isinstance(module, _Loss):
            continue  # never called, scripted (no hook fires), or a loss
        if matches(name, include, exclude):
            out.append((name, module))
    if not out and not select_parameters(model, include, exclude):
        raise _nothing_selected(model, include, exclude)
    return out


def _nothing_selected(
    model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...]
) -> UsageError:
    """Filters that leave nothing to record: a typo in --include, most often. Said before
    the first step, with names the filters could have matched."""
    names = [clean_name(raw) for raw, _ in unwrap_model(model).named_modules() if raw][:4]
    given = " ".join(
        [*(f"--include {p!r}" for p in include if p != "*"), *(f"--exclude {p!r}" for p in exclude)]
    )
    return UsageError(
        f"no module or parameter of {type(unwrap_model(model)).__name__} is left to record "
        f"with {given or 'these module filters'}",
        hint=f"its modules are named like {', '.join(names) or ROOT_NAME}; "
        "* also crosses dots (--include 'blocks.*')",
    )


def select_parameters(
    model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()
) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs; tied parameters appear once, under their first name."""
    include, exclude = tuple(include), tuple(exclude)
    return [
        (clean_name(raw), p)
        for raw, p in unwrap_model(model).named_parameters()
        if matches(clean_name(raw), include, exclude)
    ]


def module_table(modules: list[tuple[str, nn.Module]]) -> list[dict[str, Any]]:
    """The ``modules`` list of meta.json (forward order and fire counts are added later)."""
    return [
        {
            "name": name,
            "type": type(module).__name__,
            "layer": layer_index(name),
            "role": guess_role(name, module),
            "depth": 0 if name == ROOT_NAME else name.count(".") + 1,
            "params": sum(p.numel() for p in module.parameters()),
        }
        for name, module in modules
    ]


def mark_stepped(
    table: list[dict[str, Any]],
    params: list[tuple[str, nn.Parameter]],
    held: set[int],
    live: set[int],
    step: int,
) -> list[str]:
    """Set each record of ``table`` (``parameter_table(params)``) to say whether an optimizer
    the run owns holds that parameter (``stepped``): one with ``requires_grad`` that none holds
    gets gradients and never moves. A parameter no longer in the model (``live``: the ids of
    its parameters now; a block replaced mid-run) keeps its last ``stepped`` and gets
    ``left_at``, the step from which it is not part of the model; returns the names that
    left now. ``trainable`` is read again too: a body frozen for a fine-tune
    (``requires_grad_(False)``) keeps the gradient of its last backward, which no optimizer
    needs to hold, and a part unfrozen later trains."""
    left = []
    for record, (name, p) in zip(table, params):
        if "left_at" in record:
            continue
        if id(p) not in live:
            record["left_at"] = step
            left.append(name)
        else:
            record["stepped"] = id(p) in held
            record["trainable"] = p.requires_grad
    return left


def parameter_table(params: list[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """The ``parameters`` list of meta.json."""
    return [
        {
            "name": name,
            "shape": list(p.shape),
            "numel": p.numel(),
            "layer": layer_index(name),
            "trainable": p.requires_grad,
        }
        for name, p in params
    ]
