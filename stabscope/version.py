"""stabscope's version, single-sourced from ``[project] version`` in pyproject.toml.

An installed stabscope (wheel or editable) reads it from the package metadata; a source
checkout that was never installed reads pyproject.toml next to the package. No imports from
stabscope: every layer may use it, and it runs on its own (the fallback's test does).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

UNKNOWN = "0+unknown"


def from_pyproject(path: Path | None = None) -> str | None:
    """``[project] version`` of the checkout this file lies in, or None when there is none."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    path = path or Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        with open(path, "rb") as handle:
            project = tomllib.load(handle).get("project", {})
    except (OSError, ValueError):  # no file, or not TOML (TOMLDecodeError is a ValueError)
        return None
    if not isinstance(project, dict) or project.get("name") != "stabscope":
        return None
    version = project.get("version")
    return version if isinstance(version, str) else None


def package_version() -> str:
    """The installed distribution's version; else the source checkout's; else ``0+unknown``."""
    try:
        return metadata.version("stabscope")
    except metadata.PackageNotFoundError:
        return from_pyproject() or UNKNOWN


__version__ = package_version()

__all__ = ["__version__", "from_pyproject", "package_version"]
