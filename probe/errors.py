"""The one base of every error a user can cause (bad data, names, files, values, mismatched artefacts).

The CLI prints a ``ProbeError`` as one line and exits 1, the service answers it with a 4xx; any other exception is
a bug in probe and keeps its traceback. ``ProbeError`` is a ``ValueError``, so scikit-learn's tools (and callers
that caught ``ValueError`` before) treat a bad value as they expect. Messages name the library's parameters
(``shots``); the CLI maps them to its flags (``--shots``).
"""

from __future__ import annotations


class ProbeError(ValueError):
    """A user-facing error: its message says what was wrong (the file or value) and what was expected."""


class DatasetError(ProbeError):
    """DATA cannot be read as a dataset (no images, unknown layout, a bad manifest)."""


class BackboneError(ProbeError):
    """A backbone name, weights or checkpoint that cannot be used."""


class StoreError(ProbeError):
    """A feature store that cannot be read or written as asked."""


class IndexMismatchError(ProbeError):
    """A search index and what it is used with (a store's rows, query vectors) do not belong together."""


class MissingFileError(ProbeError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError, for callers that catch that)."""


class DiskFullError(StoreError, OSError):
    """A write ran out of space (ENOSPC, or a library's version of it): the file, the space needed and free.
    Also an OSError with ``errno`` ENOSPC and ``filename`` set, for callers that catch those."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IntegrityError(ProbeError):
    """An artefact probe wrote (store, head, index, checkpoint) whose payload no longer matches its checksum."""
