"""The dictionary-encoded string columns of a run's parts, read batch by batch: integer ids
that hold across parts whose dictionaries differ. Shared by the rules' one-pass scan
(rules/scan.py) and the report's grids (report/aggregate.py). No torch import here.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

BATCH_ROWS = 1 << 20  # ~20 MB of columns per batch


class Names:
    """Integer ids for the strings of a dictionary column, stable across parts whose
    dictionaries differ. Rows are never translated one by one: a batch's dictionary gets a
    lookup table (kept while the next batches carry the same dictionary, as every batch
    of one part does), and only the rows that are used go through it."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self._dictionary: pa.Array | None = None
        self._lut = np.zeros(0, np.int64)

    def id(self, name: str) -> int:
        code = self.ids.get(name)
        if code is None:
            code = self.ids[name] = len(self.names)
            self.names.append(name)
        return code

    def lut(self, dictionary: pa.Array, grow: bool = True) -> np.ndarray:
        """Ids of the dictionary's strings; without ``grow``, unknown strings get the id
        ``len(names)``, one past every lookup table built from these names."""
        if self._dictionary is None or not (
            dictionary is self._dictionary or dictionary.equals(self._dictionary)
        ):
            unknown = len(self.names)
            self._lut = np.array(
                [self.id(n) if grow else self.ids.get(n, unknown) for n in dictionary.to_pylist()],
                np.int64,
            )
            self._dictionary = dictionary
        return self._lut


def dictionary_column(batch: pa.RecordBatch, name: str) -> pa.DictionaryArray:
    column = batch.column(name)
    return column if pa.types.is_dictionary(column.type) else column.dictionary_encode()


__all__ = ["BATCH_ROWS", "Names", "dictionary_column"]
