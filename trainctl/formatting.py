"""How trainctl writes numbers for people and for JSON: durations, metric values, pace, and
NaN/Inf where JSON has none. Standard library only and cheap to import (`sessions list` uses it)."""

from __future__ import annotations

import math
from typing import Any


def format_pace(step_rate: float | None, epoch_rate: float | None, eta_s: float | None) -> list[str]:
    """['12.3 step/s', 'ETA 4m'] (or epochs a minute when no step rate is known), for status lines."""
    parts = []
    if step_rate:
        parts.append(f"{step_rate:.3g} step/s")
    elif epoch_rate:
        parts.append(f"{epoch_rate * 60:.3g} epoch/min")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return parts


def format_duration(seconds: float | None) -> str:
    """'45s', '6m', '1h05m', '2d3h': short enough for a status line."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(max(0, seconds) + 0.5)  # 8.9999 s of float arithmetic is 9 s
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def format_value(value: Any) -> str:
    """A metric value in at most ~8 characters."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int) or (value == int(value) and abs(value) < 1e6):
        return str(int(value)) if abs(value) < 1e9 else f"{value:.3g}"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4g}"


def json_safe(value: Any) -> Any:
    """`value` with NaN and Infinity (not JSON) written as the strings 'nan', 'inf', '-inf',
    inside dicts, lists and tuples too."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
