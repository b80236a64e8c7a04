"""Metric curves of sessions: a compact unicode plot for the terminal, or an image via matplotlib."""

from __future__ import annotations

import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NotFoundError, UsageError
from ..values import is_number

MARKERS = ("●", "▲", "■", "◆", "○", "△", "□", "◇", "+", "x")
IMAGE_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*", "<", ">")
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")
DEFAULT_WIDTH = 72
DEFAULT_HEIGHT = 15
MIN_WIDTH = 16
MIN_HEIGHT = 3
PLOT_HINT = "Widen the terminal, or write an image with: --out plot.png"


@dataclass
class Curve:
    """One session's points of the chosen metric, sorted by x; non-finite values left out."""

    session_id: str
    label: str
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    skipped: int = 0


@dataclass
class Series:
    metric: str
    x_label: str
    curves: list[Curve]
    notes: list[str] = field(default_factory=list)


def _metric_names(events: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for event in events:
        for name, value in (event.get("values") or {}).items():
            if is_number(value):
                names.setdefault(name, None)
    return list(names)


def collect_series(items: list[tuple[str, str, list[dict[str, Any]]]], metric: str | None) -> Series:
    """Pick the metric and gather one curve per session from (id, label, metric events)."""
    names_by_session = {sid: _metric_names(events) for sid, _, events in items}
    notes: list[str] = []
    empty = [sid for sid, names in names_by_session.items() if not names]
    if len(empty) == len(items):
        which = f"session {empty[0]} has" if len(empty) == 1 else "none of these sessions has"
        raise NotFoundError(f"{which} no metrics yet.",
                            "Metrics appear once the script calls run.log(...) or prints lines like "
                            "'loss: 0.5'; check again with: trainctl monitor")
    notes.extend(f"note: session {sid} has no metrics yet; left out." for sid in empty)
    available = list(dict.fromkeys(n for names in names_by_session.values() for n in names))
    if metric is None:
        metric = "loss" if "loss" in available else next((n for n in available if "loss" in n.lower()), available[0])
    if metric not in available:
        raise NotFoundError(f"no metric '{metric}' in {_sessions_text(items)}.",
                            f"Metrics recorded: {', '.join(available)}. Pick one with: --metric NAME")

    curves: list[Curve] = []
    axes_used: set[str] = set()
    for sid, label, events in items:
        if sid in empty:
            continue
        if metric not in names_by_session[sid]:
            notes.append(f"note: session {sid} has no '{metric}' "
                         f"(it has: {', '.join(names_by_session[sid])}); left out.")
            continue
        curve = Curve(sid, label)
        points = []
        for index, event in enumerate(e for e in events if is_number((e.get("values") or {}).get(metric))):
            try:
                value = float(event["values"][metric])
            except OverflowError:  # an integer beyond float range
                value = math.inf
            if not math.isfinite(value):
                curve.skipped += 1
                continue
            if is_number(event.get("step")):
                axis, x_value = "step", event["step"]
            elif is_number(event.get("epoch")):
                axis, x_value = "epoch", event["epoch"]
            else:
                axis, x_value = "point", index
            try:
                x = float(x_value)
            except OverflowError:
                x = math.inf
            if not math.isfinite(x):
                curve.skipped += 1
                continue
            axes_used.add(axis)
            points.append((x, value))
        points.sort(key=lambda p: p[0])
        curve.xs = [p[0] for p in points]
        curve.ys = [p[1] for p in points]
        if curve.skipped:
            notes.append(f"note: {label}: {curve.skipped} point(s) of '{metric}' with NaN/Inf not drawn.")
        curves.append(curve)
    if not any(c.xs for c in curves):
        raise NotFoundError(f"'{metric}' has no finite values to draw in {_sessions_text(items)}.",
                            "The runs logged only NaN/Inf: check them with: trainctl monitor")
    x_label = axes_used.pop() if len(axes_used) == 1 else "step, epoch or point"
    return Series(metric, x_label, curves, notes)


def _sessions_text(items: list[tuple[str, str, list[dict[str, Any]]]]) -> str:
    return f"session {items[0][0]}" if len(items) == 1 else f"the {len(items)} sessions"


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def terminal_columns() -> int | None:
    """Columns available for output: $COLUMNS, else the terminal's; None when not a terminal."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        if sys.stdout.isatty():
            return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        pass
    return None


def _fraction(value: float, start: float, end: float) -> float:
    """Where `value` lies from `start` (0) to `end` (1); halves first so huge values don't overflow."""
    return (value / 2 - start / 2) / (end / 2 - start / 2)


def _lerp(start: float, end: float, fraction: float) -> float:
    return start * (1 - fraction) + end * fraction


def _bounds(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high


def render_terminal(series: Series, *, width: int | None = None, height: int | None = None,
                    columns: int | None = None) -> str:
    """Curves as unicode text: one marker per session, y labels, x range, legend."""
    height = height or DEFAULT_HEIGHT
    if height < MIN_HEIGHT:
        raise UsageError(f"--height {height} is too small; the plot needs at least {MIN_HEIGHT} rows.")
    columns = columns if columns is not None else terminal_columns()
    curves = [c for c in series.curves if c.xs]
    xs = [x for c in curves for x in c.xs]
    ys = [y for c in curves for y in c.ys]
    x_low, x_high = (min(xs), max(xs)) if min(xs) != max(xs) else _bounds(xs)
    y_low, y_high = _bounds(ys)
    tick_rows = sorted({round(i * (height - 1) / 4) for i in range(5)} if height >= 9 else
                       {0, (height - 1) // 2, height - 1})
    tick_labels = {r: _fmt(_lerp(y_high, y_low, r / (height - 1))) for r in tick_rows}
    gutter = max(len(t) for t in tick_labels.values()) + 1

    if width is None:
        width = DEFAULT_WIDTH if columns is None else min(DEFAULT_WIDTH, columns - gutter - 1)
        if width < MIN_WIDTH:
            raise UsageError(f"the terminal is {columns} columns wide; this plot needs at least "
                             f"{MIN_WIDTH + gutter + 1}.", PLOT_HINT)
    elif width < MIN_WIDTH:
        raise UsageError(f"--width {width} is too small; the plot needs at least {MIN_WIDTH} columns.")
    elif columns is not None and width + gutter + 1 > columns:
        raise UsageError(f"--width {width} does not fit this {columns}-column terminal "
                         f"(the plot needs {width + gutter + 1} columns).",
                         f"Use --width {max(columns - gutter - 1, MIN_WIDTH)} or less, or write an "
                         f"image with: --out plot.png")

    grid = [[" "] * width for _ in range(height)]
    for index, curve in enumerate(curves):
        marker = MARKERS[index % len(MARKERS)]
        for x, y in zip(curve.xs, curve.ys, strict=True):
            col = round(_fraction(x, x_low, x_high) * (width - 1))
            row = round(_fraction(y, y_high, y_low) * (height - 1))
            grid[row][col] = marker

    lines = [f"{series.metric}"[: gutter + 1 + width]]
    for r, row in enumerate(grid):
        label = tick_labels.get(r, "")
        axis = "┤" if r in tick_labels else "│"
        lines.append(f"{label:>{gutter - 1}} {axis}{''.join(row)}".rstrip())
    lines.append(" " * gutter + "└" + "─" * width)
    left, right = _fmt(x_low), _fmt(x_high)
    middle = series.x_label
    space = width - len(left) - len(right)
    if space >= len(middle) + 2:
        pad = space - len(middle)
        axis_text = left + " " * (pad // 2) + middle + " " * (pad - pad // 2) + right
    else:
        axis_text = left + " " * max(space, 1) + right
    lines.append(" " * (gutter + 1) + axis_text[:width])
    for index, curve in enumerate(curves):
        marker = MARKERS[index % len(MARKERS)]
        entry = f"{marker} {curve.label}  last {_fmt(curve.ys[-1]) if curve.ys else '-'}"
        lines.append((" " * (gutter + 1) + entry)[: gutter + 1 + width])
    return "\n".join(lines)


def check_out_path(out: str) -> Path:
    """Validate --out before any work: its folder exists and the suffix names a known format."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {path / 'plot.png'}.")
    if not path.parent.is_dir():
        raise UsageError(f"the folder {path.parent} does not exist (for --out {out}).",
                         f"Create it with: mkdir -p {path.parent}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {out}: unknown image type '{path.suffix}'; use one of "
                         f"{', '.join(IMAGE_SUFFIXES)}.")
    return path


def write_image(series: Series, path: Path, *, width: int | None = None, height: int | None = None) -> None:
    """Draw the curves with matplotlib (Agg, no display needed) and write the file atomically."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UsageError("matplotlib is not installed; it draws --out images.",
                         "Install with: pip install 'trainctl[plot]'  (or drop --out for a "
                         "terminal plot)") from e
    from ..fsutil import atomic_write_bytes

    dpi = 100
    figure = Figure(figsize=((width or 1000) / dpi, (height or 600) / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    curves = [c for c in series.curves if c.xs]
    # matplotlib's autoscaling overflows near the float limit: draw such values in units of 10^k
    largest = max(abs(y) for c in curves for y in c.ys)
    exponent = math.floor(math.log10(largest)) if largest >= 1e250 else 0
    for index, curve in enumerate(curves):
        label = curve.label + (f" ({curve.skipped} NaN/Inf not drawn)" if curve.skipped else "")
        ys = [y / 10.0**exponent for y in curve.ys] if exponent else curve.ys
        axes.plot(curve.xs, ys, label=label, linewidth=1.5,
                  marker=IMAGE_MARKERS[index % len(IMAGE_MARKERS)], markevery=max(len(curve.xs) // 12, 1),
                  markersize=4)
    axes.set_xlabel(series.x_label)
    axes.set_ylabel(series.metric + (f" (×1e{exponent})" if exponent else ""))
    axes.set_title(series.metric)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lower().lstrip("."))
    atomic_write_bytes(path, buffer.getvalue())
