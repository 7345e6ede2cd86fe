"""The run store: directory layout, Parquet parts, meta.json, readers. No torch import."""

from .meta import new_meta, read_meta, save_meta
from .meta_check import MetaError
from .reader import NotARunError, StabscopeWarning, count_rows, load_run, load_table, part_files
from .schema import RUN_MODULE, SCHEMA, SCHEMA_VERSION
from .writer import Interner, PartWriter

__all__ = [
    "RUN_MODULE",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Interner",
    "MetaError",
    "NotARunError",
    "PartWriter",
    "StabscopeWarning",
    "count_rows",
    "load_run",
    "load_table",
    "new_meta",
    "part_files",
    "read_meta",
    "save_meta",
]
