"""What a caller of the service can get wrong, each with the HTTP status it becomes. All are ValueErrors, so the
CLI's and the library's user-error handling treat them like any other bad input."""

from __future__ import annotations

from ..errors import ProbeError


class ServiceError(ProbeError):
    """A request the service refuses; ``status`` is the HTTP status code (4xx)."""

    status = 422


class NotFound(ServiceError):
    """An unknown head, index, few-shot set or gallery id; the message names the available ones."""

    status = 404


class Conflict(ServiceError):
    """The request clashes with the state: a set that exists already, or one made with another backbone."""

    status = 409


class TooLarge(ServiceError):
    """An upload above the byte limit, or an image above the pixel limit."""

    status = 413


class NotAnImage(ServiceError):
    """An upload that Pillow cannot identify as any image format."""

    status = 415


class BadImage(ServiceError):
    """An upload that is an image format but cannot be decoded (empty, truncated, corrupt)."""

    status = 422


def available(kinds: str, names) -> str:
    """'available heads: a, b' or 'no heads are loaded' — the tail of every NotFound message."""
    names = sorted(names)
    return f"available {kinds}: {', '.join(names)}" if names else f"no {kinds} are loaded"
