"""Text that keeps every byte: how patch bytes that are not UTF-8 travel as ``str``.

A patch may carry bytes that are not UTF-8 (a latin-1 comment in an old kernel file), and
git applies them as they are. Mail bodies and git output are therefore decoded as UTF-8
with ``surrogateescape``: each undecodable byte becomes a lone surrogate and `encode` turns
it back into the same byte for git. Such strings cannot be written as UTF-8 (results.json,
reports, a terminal); `display` shows those bytes as U+FFFD. Use it for display text
only, never for what is applied.
"""

from __future__ import annotations

from typing import TypeVar

ENCODING = "utf-8"
ERRORS = "surrogateescape"

T = TypeVar("T")


def encode(text: str) -> bytes:
    return text.encode(ENCODING, ERRORS)


def decode(data: bytes) -> str:
    return data.decode(ENCODING, ERRORS)


def display(text: str) -> str:
    """The text with its undecodable bytes shown as U+FFFD (printable, JSON-safe)."""
    if text.isascii():
        return text
    return encode(text).decode(ENCODING, "replace")


def _clean(value):
    if isinstance(value, str):
        return display(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clean(v) for v in value)
    return value


def displayable(model: T) -> T:
    """A pydantic record fit for JSON and reports: the same model if it holds no raw
    bytes, else a copy whose strings went through `display` (conflict hunks and git
    subjects can carry them)."""
    data = model.model_dump()       # type: ignore[attr-defined]
    clean = _clean(data)
    return model if clean == data else type(model).model_validate(clean)   # type: ignore[attr-defined]
