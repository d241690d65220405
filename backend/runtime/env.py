"""Numbers from the environment, read one way: a value that is not one stops the start with an error that
names the variable, instead of being replaced by a default nobody asked for."""

from __future__ import annotations

import os


def positive_int(name: str) -> int | None:
    """$name as a whole number of at least 1, or None when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def whole(name: str, default: int) -> int:
    """$name as a whole number, 0 included, or `default` when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"{name} must be a whole number (0 or more), got {value!r}")
    return int(value)
