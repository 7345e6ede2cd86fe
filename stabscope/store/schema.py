"""The run format: one tidy long table, split into Parquet parts, plus meta.json.

Every row is one number: ``(step, rank, phase, module, call, metric, index) -> value``.
This file is the single source of truth for the column types; the writer, the reader and
the README all follow it. Bump ``SCHEMA_VERSION`` on any incompatible change and keep the
reader able to open older versions.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

#: Module name used for run-level rows (loss, learning rate, first non-finite markers).
RUN_MODULE = "__run__"

#: Phases a row can belong to. Statistics of ``no_grad`` / ``eval()`` passes are kept apart.
PHASES = ("train", "eval")

_STR = pa.dictionary(pa.int32(), pa.string())

SCHEMA = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("phase", _STR, nullable=False),
        pa.field("module", _STR, nullable=False),
        pa.field("call", pa.int16(), nullable=False),
        pa.field("metric", _STR, nullable=False),
        pa.field("index", pa.int16(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ]
)

#: Columns that carry strings (dictionary-encoded on disk); the rest are plain numbers.
STRING_COLUMNS = ("phase", "module", "metric")

#: Parquet writer settings, measured on the long table: dictionary encoding on the string
#: columns only, zstd, and byte-stream-split on the float column (~3 MB per million rows).
PARQUET_OPTIONS = {
    "compression": "zstd",
    "use_dictionary": list(STRING_COLUMNS),
    "use_byte_stream_split": ["value"],
    "write_statistics": ["step"],
}
