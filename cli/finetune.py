"""`probe finetune` and `probe compare`: full-network transfer learning strategies."""

from __future__ import annotations

from .app import app, emit, handles_errors  # noqa: F401
