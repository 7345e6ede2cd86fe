"""The run store: directory layout, Parquet parts, meta.json, readers. No torch import."""

from .meta import new_meta, read_meta, save_meta, update_meta, update_meta_file
from .meta_check import MetaError
from .parts import NotARunError, Parts, StabscopeWarning, list_parts, part_files, readable_parts
from .reader import count_rows, load_run, load_table
from .run_meta import RunMeta, load_meta
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
    "Parts",
    "RunMeta",
    "StabscopeWarning",
    "count_rows",
    "list_parts",
    "load_meta",
    "load_run",
    "load_table",
    "new_meta",
    "part_files",
    "read_meta",
    "readable_parts",
    "save_meta",
    "update_meta",
    "update_meta_file",
]
