"""Vectors as FAISS wants them, read a block of store rows at a time: ``prepare`` (float32, C order, L2-normalised
for cosine) and ``Rows`` (an HDF5 /features dataset or an in-memory array, iterated in blocks, never read whole).

Example:
    >>> with h5py.File("cache/big.h5") as f:
    ...     for ids, x in Rows(f["features"], "cosine").blocks():   # (b,), (b, D) L2-normalised
    ...         index.add_with_ids(x, ids)
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import h5py
import numpy as np


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """(n, D) -> contiguous float32, L2-normalised for cosine (a copy: the caller's array is not touched)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if metric == "cosine" and len(x):
        faiss.normalize_L2(x)
    return x


class Rows:
    """(N, D) vectors read ``chunk_rows`` store rows at a time and prepared for ``metric`` on each read: a store's
    HDF5 /features dataset (never read whole) or an in-memory array already prepared (``metric=None``, not copied).
    ``n`` limits reading to the first n rows."""

    def __init__(self, data: np.ndarray | h5py.Dataset, metric: str | None, chunk_rows: int = 16_384,
                 n: int | None = None):
        self.data, self.metric, self.chunk = data, metric, chunk_rows
        self.n = data.shape[0] if n is None else n
        self.dim = int(data.shape[1])

    def _read(self, start: int, stop: int, sel: np.ndarray | None) -> np.ndarray:
        if sel is None:
            x = self.data[start:stop]
        elif isinstance(self.data, np.ndarray) or len(sel) * 64 < stop - start:
            x = self.data[sel]  # sparse rows: h5py reads just these (sorted) rows
        else:
            x = self.data[start:stop][sel - start]  # dense: one contiguous read beats ~0.1 ms per row
        if self.metric is None:
            return x
        if isinstance(self.data, h5py.Dataset):  # a fresh array from disk: normalise it in place
            x = np.ascontiguousarray(x, dtype=np.float32)
            if self.metric == "cosine" and len(x):
                faiss.normalize_L2(x)
            return x
        return prepare(x, self.metric)

    def blocks(self, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids (b,) int64, prepared vectors (b, D)) of every row, or of the sorted ``rows``, block by block."""
        for start in range(0, self.n, self.chunk):
            stop = min(self.n, start + self.chunk)
            if rows is None:
                yield np.arange(start, stop, dtype=np.int64), self._read(start, stop, None)
                continue
            sel = rows[np.searchsorted(rows, start): np.searchsorted(rows, stop)]
            if len(sel):
                yield sel.astype(np.int64), self._read(start, stop, sel)

    def span(self, start: int, stop: int) -> np.ndarray:
        """Prepared vectors (stop - start, D) of the rows [start, stop), in one read (a view of an in-memory array
        that needs no preparing)."""
        return self._read(start, min(stop, self.n), None)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Prepared vectors (len(rows), D) of the sorted ``rows``: a sample, read without loading the rest."""
        parts = [x for _, x in self.blocks(rows)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
