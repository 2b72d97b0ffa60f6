"""The exceptions a user can cause (bad data, names, files, values): the CLI and the service turn these into a
clear message (exit code 1 / HTTP 4xx); anything else is a bug and keeps its traceback."""

from __future__ import annotations

from .backbones import BackboneError
from .data import DatasetError
from .store import StoreError

USER_ERRORS: tuple[type[BaseException], ...] = (BackboneError, DatasetError, StoreError, ValueError,
                                                FileNotFoundError)
