"""Values as scripts hand them over: one coercion of a logged value to a plain number."""

from __future__ import annotations

from typing import Any


def scalar(value: Any) -> int | float | None:
    """A logged value as a Python int/float: numbers as they are, bools as 0/1, one-element
    tensors and numpy scalars through .item(), numeric strings parsed; anything else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    numel = getattr(value, "numel", None)
    if callable(numel):
        try:
            if numel() != 1:
                return None
        except Exception:
            return None
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except Exception:
            return None
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else \
            (int(value) if isinstance(value, bool) else None)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
