"""``meta.json``: what the run is, how it was recorded, and how it ended."""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import MetaError, NotARunError, RunWriteError
from ..version import __version__
from .atomic import write_text_atomically
from .interrupts import deferred
from .layout import META_FILE
from .meta_check import check_meta
from .rank_errors import merge_rank_errors
from .schema import SCHEMA_VERSION


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (torch only if already imported)."""
    import pyarrow

    versions = {
        "stabscope": __version__,
        "python": platform.python_version(),
        "pyarrow": pyarrow.__version__,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch"] = torch.__version__
    return versions


def new_meta(command: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    """A fresh meta document with status ``running``."""
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex[:12],
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished": None,
        "host": platform.node(),
        "pid": os.getpid(),
        "versions": library_versions(),
        "command": list(sys.argv if command is None else command),
    }
    meta.update(fields)
    return meta


#: A file that could not grow: a full disk, a full quota, a per-file size limit (ulimit -f).
_NO_ROOM = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def save_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """Atomically replace ``run_dir/meta.json``. Where the disk has no room for it, it is
    written once more without indentation and with each traceback cut to its last frame
    (about a third smaller): a run that ends on a full disk should still say how it ended."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    document = _finite(meta)
    text = json.dumps(document, indent=1, default=_json_default, allow_nan=False)
    with deferred():  # a signal waits until meta.json is whole
        try:
            write_text_atomically(Path(run_dir) / META_FILE, text + "\n")
        except RunWriteError as err:
            if err.errno not in _NO_ROOM:
                raise
            compact = json.dumps(
                _last_frames(document),
                separators=(",", ":"),
                default=_json_default,
                allow_nan=False,
            )
            write_text_atomically(Path(run_dir) / META_FILE, compact + "\n")


def _last_frames(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with every recorded traceback (``error``, ``write_error``, ...) cut to its
    last entry, the line that names the exception."""
    out = dict(meta)
    for key, value in meta.items():
        if isinstance(value, dict) and isinstance(value.get("traceback"), list):
            out[key] = {**value, "traceback": value["traceback"][-1:]}
    return out


def update_meta(meta: dict[str, Any], notes: Iterable[str] = (), **fields: Any) -> dict[str, Any]:
    """The one way code outside the Recorder changes a meta document (the Recorder's open
    ``rec.meta``, or one read back by ``update_meta_file``): ``fields`` are merged in, a dict
    into the dict already there key by key (``run={"dynamo": ...}`` keeps the rest of
    ``run``), anything else replacing what was there; ``notes`` are appended to ``notes``.
    Returns ``meta``."""
    _merge(meta, fields)
    if notes:
        meta["notes"] = [*meta.get("notes", []), *notes]
    return meta


def _merge(into: dict[str, Any], fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def update_meta_file(
    run_dir: str | os.PathLike[str], notes: Iterable[str] = (), **fields: Any
) -> dict[str, Any]:
    """``update_meta`` on a closed run's meta.json, read and replaced atomically."""
    meta = update_meta(read_meta(run_dir), notes, **fields)
    save_meta(Path(run_dir), meta)
    return meta


def _finite(obj: Any) -> Any:
    """Strict JSON has no NaN/Inf: write them as strings so every JSON reader can load meta."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return repr(obj)


def read_meta(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``meta.json`` of a run directory; raises ``NotARunError`` when there is none, and
    its subclass ``MetaError`` when it is not valid JSON or not shaped like a run's meta
    (see ``meta_check``): the one place every reader's meta is checked."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise NotARunError(f"{run_dir} is not a stabscope run (no {META_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MetaError(f"{path} is not valid JSON: {err}") from err
    except OSError as err:
        raise MetaError(f"cannot read {path}: {err.strerror or err}") from err
    # Another rank's error, where it failed first, is the run's error (rank 0's the knock-on).
    return merge_rank_errors(check_meta(meta, str(path)), Path(run_dir))
