"""`probe index`, `probe search`, `probe dedup`: FAISS similarity search over a store."""

from __future__ import annotations

from .app import app, emit, handles_errors  # noqa: F401
