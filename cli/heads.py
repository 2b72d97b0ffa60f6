"""`probe fit-head`, `predict`, `eval`, `fewshot`: heads on cached features."""

from __future__ import annotations

from .app import app, emit, handles_errors  # noqa: F401
