"""Loading a model script: the small convention that ``stabscope profile`` runs.

A model script is a plain Python file that defines:

    CONFIG = {"depth": 6, "lr": 1e-3}        # optional: parameters for --set key=value
    def model(cfg): ...                      # required: returns the nn.Module
    def batches(cfg): ...                    # required: an iterable (or generator) of batches
    def loss(model, batch): ...              # required: forward pass, returns a scalar loss
    def optimizer(model, cfg): ...           # optional: default AdamW(lr=cfg.get("lr", 1e-3))
    def scheduler(optimizer, cfg): ...       # optional: an LR scheduler stepped once per step

``cfg`` is a ``ScriptConfig``: a dict with attribute access, holding CONFIG after overrides.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ScriptError, UsageError
from ..store.interrupts import Terminated

REQUIRED = ("model", "batches", "loss")
OPTIONAL = ("optimizer", "scheduler")


class ScriptConfig(dict):
    """CONFIG after ``--set`` overrides; ``cfg.depth`` and ``cfg["depth"]`` both work."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; known: {sorted(self)}") from None


@dataclass
class ModelScript:
    """The entry points of a loaded model script."""

    path: Path
    module: ModuleType
    config: ScriptConfig
    model: Callable[[ScriptConfig], Any]
    batches: Callable[[ScriptConfig], Iterable[Any]]
    loss: Callable[[Any, Any], Any]
    optimizer: Callable[[Any, ScriptConfig], Any] | None
    scheduler: Callable[[Any, ScriptConfig], Any] | None


def script_failure(path: Path, err: BaseException, where: str) -> ScriptError:
    """One line naming the script's own frame that raised, for an exception inside user code."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
    loc = f" at {path.name}:{frames[-1].lineno}" if frames else ""
    if where == "being imported":  # importing it again shows the same traceback
        hint = f"fix the script (`python {path}` shows the full traceback)"
    else:  # the run holds it too: running the script again would train again
        hint = (
            "fix the script; `stabscope summary` of the run shows its traceback (meta.json's "
            "`error.traceback`), and what was recorded so far is kept"
        )
    return ScriptError(f"{path.name} raised {type(err).__name__}{loc} while {where}: {err}", hint)


def script_path(path: str | Path) -> Path:
    """The resolved path of an existing ``.py`` file; bad input otherwise."""
    path = Path(path).resolve()
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a script", hint="pass a Python script")
    if not path.is_file():
        raise UsageError(f"no such script: {path}", hint="pass the path of a Python script")
    if path.suffix != ".py":
        raise UsageError(f"{path} is not a .py file", hint="pass a Python script")
    return path


def top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (not inside functions, classes or guards)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def missing_entry_points(path: str | Path) -> list[str]:
    """The required entry points of a model script that ``path`` does not define, read from
    its source: importing a file to find out would run an unguarded training loop."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as err:
        raise UsageError(
            f"{path.name} is not valid Python: {err.msg} (line {err.lineno})",
            hint=f"`python {path}` shows the same error",
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}", hint="pass a readable .py file") from None
    names = top_level_names(tree)
    return [name for name in REQUIRED if name not in names]


def load_script(path: str | Path, overrides: dict[str, str] | None = None) -> ModelScript:
    """Import a model script and apply ``--set`` overrides to its CONFIG.

    A file that does not define ``model``, ``batches`` and ``loss`` at its top level is
    refused before anything in it runs: it is a training script, whose top-level code may
    train (``profile SCRIPT -- ARGS`` is the command that runs those)."""
    path = script_path(path)
    missing = missing_entry_points(path)
    if missing:
        raise UsageError(
            f"{path.name} is not a model script: it does not define {', '.join(missing)} "
            "at its top level (it was not run)",
            hint=f"record a training script with `stabscope profile {path.name} -- ARGS`; "
            "a model script defines model(cfg), batches(cfg) and loss(model, batch) "
            "(README: Model scripts)",
        )
    name = f"stabscope_user_script_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))  # scripts may import their neighbours
    try:
        spec.loader.exec_module(module)
    except Terminated:  # SIGTERM while importing, not the script's own sys.exit
        raise
    except SystemExit as err:
        raise ScriptError(
            f"{path.name} called sys.exit({err.code}) on import",
            hint="guard the training code with `if __name__ == '__main__':`",
        ) from err
    except Exception as err:
        raise script_failure(path, err, "being imported") from err
    missing = [fn for fn in REQUIRED if not callable(getattr(module, fn, None))]
    if missing:
        raise UsageError(
            f"{path.name} does not define {', '.join(missing)}",
            hint="a model script defines model(cfg), batches(cfg) and loss(model, batch); "
            "optionally CONFIG, optimizer(model, cfg), scheduler(optimizer, cfg). "
            "See README 'Model scripts'",
        )
    base = getattr(module, "CONFIG", {})
    if not isinstance(base, dict):
        raise UsageError(f"{path.name}: CONFIG must be a dict", hint="CONFIG = {'lr': 1e-3}")
    config = ScriptConfig(apply_overrides(base, overrides or {}, path.name))
    return ModelScript(
        path=path,
        module=module,
        config=config,
        model=module.model,
        batches=module.batches,
        loss=module.loss,
        optimizer=getattr(module, "optimizer", None),
        scheduler=getattr(module, "scheduler", None),
    )


def parse_set(items: list[str]) -> dict[str, str]:
    """``["depth=24", "norm=post"]`` -> ``{"depth": "24", "norm": "post"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad --set {item!r}", hint="use --set key=value, e.g. --set depth=24")
        out[key.strip()] = value.strip()
    return out


def apply_overrides(base: dict[str, Any], overrides: dict[str, str], source: str) -> dict[str, Any]:
    """CONFIG with overrides parsed to the type of each default value."""
    result = dict(base)
    for key, text in overrides.items():
        if key not in base:
            raise UsageError(
                f"unknown --set key {key!r} for {source}",
                hint=f"known keys: {', '.join(sorted(base)) or '(script has no CONFIG)'}",
            )
        result[key] = _parse_value(text, base[key], key)
    return result


def _parse_value(text: str, default: Any, key: str) -> Any:
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise UsageError(
            f"--set {key}={text}: expected a {type(default).__name__} like {default!r}",
            hint=f"e.g. --set {key}={default!r}",
        ) from err
