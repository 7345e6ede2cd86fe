"""``[tool.stabscope]`` in pyproject.toml: finding the file and reading its tables (no torch).

The recorder's settings (stabscope.record.config) and the gate's (stabscope.rules.gate) both
read from here, so the read side never imports the recording side for its settings.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}", str(path)) from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}", str(path)) from None


def read_toml_table(path: Path, *keys: str) -> dict[str, Any]:
    """The table at ``keys`` (e.g. "tool", "stabscope", "rules") of a TOML file, or {} when a
    key is missing; ``ConfigError`` when one is there but is not a table."""
    table: Any = _load_toml(path)
    for depth, key in enumerate(keys):
        table = table.get(key, {})
        if not isinstance(table, dict):
            name = ".".join(keys[: depth + 1])
            raise ConfigError(
                f"{path}: {name} must be a table ([{name}]), got {json.dumps(table, default=str)}",
                str(path),
            )
    return dict(table)


def find_pyproject(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).resolve()
    return next(
        (d / "pyproject.toml" for d in (here, *here.parents) if (d / "pyproject.toml").is_file()),
        None,
    )


def check_keys(
    table: dict[str, Any],
    expected: dict[str, tuple[Callable[[Any], bool], str]],
    where: str,
    source: str,
) -> None:
    """Unknown keys and values of the wrong type or range: one ``ConfigError`` naming both."""
    unknown = sorted(set(table) - set(expected))
    if unknown:
        raise ConfigError(
            f"{source}: unknown {where} keys {unknown}; known: {sorted(expected)}", source
        )
    for key, value in table.items():
        test, words = expected[key]
        if not test(value):
            got = json.dumps(value, default=str)  # as TOML writes it: true, "x", [1]
            raise ConfigError(f"{source}: {where} {key} must be {words}, got {got}", source)


__all__ = ["check_keys", "find_pyproject", "read_toml_table"]
