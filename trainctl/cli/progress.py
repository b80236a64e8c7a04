"""The launcher's progress display: a bar kept below the script's output, or plain status lines.

On a terminal the script's bytes pass through unchanged and one bar line (tqdm's format) sits
under them: before each chunk the bar is erased, after it the bar is drawn again under the
cursor. When the script leaves a line unfinished (its own tqdm bar redrawn with ``\\r``), our
bar goes on the next row and the cursor is put back where the script left it, so the script's
``\\r`` updates keep landing on its own line. Off a terminal (or with ``quiet``) the output is
passed through untouched and, unless quiet, a status line goes to stderr now and then.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading
import time
import unicodedata
from typing import Any, BinaryIO, TextIO

from .. import metrics
from ..session import Session, read_events

# Cursor movement, clears and other CSI/OSC sequences: zero width for our column count.
_ESCAPE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# Sequences that move the cursor in ways a column count can't follow (tqdm's nested bars).
_MOVES = re.compile(rb"\x1b\[[0-9;]*[ABEFHJf]|\x1b[78M]")

_RATE_POINT_S = 0.5  # at most one (time, step) point per half second feeds the rate


def _visible_width(segment: bytes, col: int) -> int:
    """Column after writing `segment` (no line breaks in it) from column `col`."""
    text = _ESCAPE.sub(b"", segment).decode("utf-8", "ignore")
    if text.isascii() and "\t" not in text:
        return col + sum(1 for c in text if c >= " ")
    for ch in text:
        if ch == "\t":
            col = (col // 8 + 1) * 8
        elif ch >= " ":
            col += 2 if unicodedata.east_asian_width(ch) in "WF" else 1
    return col


# An escape sequence cut off by the end of a chunk (CSI or OSC not yet finished).
_PARTIAL_ESCAPE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?)?\Z")


def _split_incomplete(data: bytes) -> tuple[bytes, bytes]:
    """(what can be written now, an unfinished UTF-8 character or escape sequence at the end).

    Our bar's sequences must never land inside one of those, or the terminal shows garbage.
    """
    esc = data.rfind(b"\x1b", max(0, len(data) - 64))
    if esc >= 0 and _PARTIAL_ESCAPE.match(data, esc):
        return data[:esc], data[esc:]
    for back in (1, 2, 3):
        if len(data) < back:
            break
        byte = data[-back]
        if byte < 0x80:
            break
        if byte >= 0xC0:  # a lead byte: how long its character is
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if need > back:
                return data[:-back], data[-back:]
            break
    return data, b""


def _add_point(points: collections.deque[tuple[float, float]], t: float, position: float) -> None:
    """Keep points at least _RATE_POINT_S apart; the newest one slides forward."""
    if len(points) >= 2 and t - points[-2][0] < _RATE_POINT_S:
        points[-1] = (t, position)
    else:
        points.append((t, position))


def _binary(stream: Any) -> Any:
    return getattr(stream, "buffer", stream)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class ProgressDisplay:
    """Progress of one session while the launcher runs it (or a terminal attaches to it); thread-safe."""

    def __init__(self, session: Session, *, totals: dict[str, Any], quiet: bool = False,
                 stream: TextIO | None = None, is_tty: bool | None = None,
                 status_interval_s: float = 30.0, poll_interval_s: float = 0.5,
                 stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
                 parsed_from_events: bool = False) -> None:
        self.session = session
        # attached to a run another process watches: its parsed metrics arrive as events
        self.parsed_from_events = parsed_from_events
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = _isatty(self.stream) if is_tty is None else is_tty
        self.bar = self.is_tty and not quiet
        self.status_interval_s = status_interval_s
        self.poll_interval_s = poll_interval_s
        self._out = stdout if stdout is not None else _binary(sys.stdout)
        self._err = stderr if stderr is not None else _binary(sys.stderr)
        # which passthrough targets share the bar's screen
        self._on_screen = {False: self.bar and _isatty(sys.stdout if stdout is None else stdout),
                           True: self.bar and _isatty(sys.stderr if stderr is None else stderr)}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset = 0
        self._started = time.time()
        # progress state; totals: trainctl.init() > arguments > parsed text
        self._totals_init: dict[str, Any] = {}
        self._totals_args = {k: v for k, v in (totals or {}).items() if v}
        self._totals_text: dict[str, Any] = {}
        self.step: int | None = None
        self.epoch: int | float | None = None
        self.loss_name: str | None = None
        self.loss: float | None = None
        self.checkpoints = 0
        self._points: collections.deque[tuple[float, float]] = collections.deque(maxlen=60)
        self._epoch_points: collections.deque[tuple[float, float]] = collections.deque(maxlen=60)
        # (t, step, epoch) for the fraction's pace, and how steps map to epochs
        self._recent: collections.deque[tuple[float, Any, Any]] = collections.deque(maxlen=60)
        self._model = metrics.EpochModel()
        self._finished = False
        self._changed = False
        # screen state (bar mode)
        self._col: int | None = 0  # the script's cursor column; None: unknown (no bar)
        self._bar_where: str | None = None  # None (not drawn), "here" (this row) or "below"
        self._bar_text = ""
        self._bar_rendered_at = 0.0
        self._width = 80
        self._width_at = 0.0
        # status-line state (plain mode)
        self._held = {False: b"", True: b""}  # an unfinished character, written with the next chunk
        self._stderr_at_line_start = True
        self._last_status = time.monotonic()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread that follows the session's events and refreshes the bar/status."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="trainctl-progress", daemon=True)
        self._thread.start()

    def close(self, status: str = "done") -> None:
        """Stop following; leave the final bar (or status line, ending in `status`) behind."""
        self._final_status = status
        self._finished = status == "completed"  # a finished run is at 100% of its last epoch
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._poll_events()
        with self._lock:
            if self.bar:
                payload = self._erase()
                for is_err, held in self._held.items():
                    if held:
                        self._write_screen(payload + held, stderr=is_err)
                        payload = b""
                        self._track_column(held)
                if self._col:
                    payload += b"\r\n"
                text = self._render(force=True)
                if text and self._width >= 20:
                    payload += text.encode("utf-8", "replace") + b"\x1b[K\r\n"
                self._col = 0
                self._write_screen(payload)
            elif not self.quiet and self._has_progress():
                self._write_status(final=True)

    # -- output ---------------------------------------------------------------------------------

    def write_output(self, data: bytes, *, stderr: bool = False) -> None:
        """Pass a chunk of the script's output to the real stdout/stderr, keeping the bar below."""
        target = self._err if stderr else self._out
        if not self._on_screen[stderr]:
            try:
                target.write(data)
                target.flush()
            except (OSError, ValueError):
                pass
            if stderr and data:
                self._stderr_at_line_start = data.endswith((b"\n", b"\r"))
            return
        with self._lock:
            data, self._held[stderr] = _split_incomplete(self._held[stderr] + data)
            if not data:
                return
            payload = self._erase() + data
            self._track_column(data)
            payload += self._draw()
            try:
                target.write(payload)
                target.flush()
            except (OSError, ValueError):
                pass

    def on_parsed(self, parsed: dict[str, Any]) -> None:
        """A metric parsed from the script's output (what MetricParser.feed returns)."""
        with self._lock:
            self._update(parsed, time.time())
            for key, total_key in (("total_steps", "steps"), ("total_epochs", "epochs")):
                if parsed.get(key):
                    self._totals_text[total_key] = parsed[key]

    # -- state ----------------------------------------------------------------------------------

    def _update(self, record: dict[str, Any], t: float) -> None:
        step, epoch = record.get("step"), record.get("epoch")
        is_step = isinstance(step, int) and not isinstance(step, bool)
        if is_step:
            if self.step is not None and step < self.step:
                self._points.clear()
                new_epoch = metrics.is_finite(epoch) and self.epoch is not None and epoch > self.epoch
                if not new_epoch:  # a restart resumed from an earlier step (else: steps per epoch)
                    self._recent.clear()
                    self._model.rewind(step)
            self.step = step
            _add_point(self._points, t, step)
        if metrics.is_finite(epoch):
            if self.epoch is not None and epoch < self.epoch:
                self._epoch_points.clear()
            self.epoch = epoch
            _add_point(self._epoch_points, t, epoch)
        if is_step or metrics.is_finite(epoch):
            self._model.observe(step, epoch)
            point = (t, step if is_step else None, epoch if metrics.is_finite(epoch) else None)
            if len(self._recent) >= 2 and t - self._recent[-2][0] < _RATE_POINT_S:
                self._recent[-1] = point
            else:
                self._recent.append(point)
        values = record.get("values") or {}
        if values:
            if self.loss_name not in values:
                losses = [n for n in values if "loss" in n.lower()]
                if losses and (self.loss_name is None or self.loss is None):
                    self.loss_name = metrics.primary_metric(losses)
            if self.loss_name in values:
                value = values[self.loss_name]
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.loss = value
        self._changed = True

    def _totals(self) -> tuple[int | None, int | None]:
        def pick(key: str) -> int | None:
            for source in (self._totals_init, self._totals_args, self._totals_text):
                if source.get(key):
                    return source[key]
            return None

        return pick("steps"), pick("epochs")

    def _has_progress(self) -> bool:
        return self.step is not None or self.epoch is not None or self.loss is not None

    def _poll_events(self) -> None:
        try:
            events, self._offset = read_events(self.session.events_path, offset=self._offset)
        except Exception:  # a malformed line is a warning (an error under -W error): skip past it
            try:
                self._offset = self.session.events_path.stat().st_size
            except OSError:
                pass
            return
        if not events:
            return
        with self._lock:
            for e in events:
                kind = e.get("kind")
                if kind == "metric" and (self.parsed_from_events or e.get("source") != "output"):
                    self._update(e, float(e.get("t") or time.time()))
                elif kind == "totals":
                    for key in ("steps", "epochs"):
                        if e.get(key):
                            self._totals_init[key] = e[key]
                    self._changed = True
                elif kind == "checkpoint":
                    self.checkpoints += 1
                    self._changed = True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self._poll_events()
            with self._lock:
                if self._closed:
                    return
                if self.bar:
                    self._refresh_bar()
                elif (not self.quiet and self._has_progress() and self._stderr_at_line_start
                      and time.monotonic() - self._last_status >= self.status_interval_s):
                    self._write_status()

    # -- text -----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Progress as data: step, epoch, totals, rate (per second), ETA, loss."""
        total_steps, total_epochs = self._totals()
        step_rate = metrics.rate(list(self._points))
        epoch_rate = metrics.rate(list(self._epoch_points))
        where = metrics.run_progress(list(self._recent), total_steps=total_steps,
                                     total_epochs=total_epochs, model=self._model,
                                     finished=self._finished)
        return {"step": self.step, "total_steps": total_steps,
                "total_steps_estimated": where["total_steps_estimated"], "epoch": where["epoch"],
                "total_epochs": total_epochs, "fraction": where["fraction"],
                "step_rate": step_rate, "epoch_rate": epoch_rate,
                "eta_s": where["eta_s"], "loss_name": self.loss_name, "loss": self.loss,
                "checkpoints": self.checkpoints, "elapsed_s": time.time() - self._started}

    def status_line(self) -> str:
        """'[trainctl] epoch 3/10 step 300/1000 (30%) loss 0.41 1.9 step/s ETA 6m'."""
        s = self.summary()
        parts = ["[trainctl]"]
        if s["epoch"] is not None:
            epoch = metrics.format_value(s["epoch"])
            parts.append(f"epoch {epoch}/{s['total_epochs']}" if s["total_epochs"] else f"epoch {epoch}")
        total = s["total_steps"] or s["total_steps_estimated"]
        if s["step"] is not None:
            parts.append(f"step {s['step']}/{total}" if total else f"step {s['step']}")
        if s["fraction"] is not None:
            parts.append(f"({100.0 * s['fraction']:.0f}%)")
        if s["loss"] is not None:
            parts.append(f"{s['loss_name']} {metrics.format_value(s['loss'])}")
        parts += metrics.format_pace(s["step_rate"], s["epoch_rate"], s["eta_s"])
        if s["checkpoints"]:
            parts.append(f"ckpt {s['checkpoints']}")
        return " ".join(parts)

    def _write_status(self, final: bool = False) -> None:
        self._last_status = time.monotonic()
        line = self.status_line() + ("" if not final else f" ({getattr(self, '_final_status', 'done')})")
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _bar_line(self, width: int) -> str:
        s = self.summary()
        from tqdm import tqdm

        postfix = None
        if s["loss"] is not None:
            postfix = f"{s['loss_name']}={metrics.format_value(s['loss'])}"
        prefix = "trainctl"
        if s["epoch"] is not None:
            epoch = metrics.format_value(s["epoch"])
            prefix = f"epoch {epoch}/{s['total_epochs']}" if s["total_epochs"] else f"epoch {epoch}"
        if s["step"] is not None:
            n, total, unit, rate = s["step"], s["total_steps"] or s["total_steps_estimated"], "step", s["step_rate"]
            if not total and s["fraction"] is not None and s["fraction"] > 0:
                total = round(s["step"] / s["fraction"])  # what the fraction done says the run is
        elif s["fraction"] is not None:
            n, total, unit, rate = round(100 * s["fraction"]), 100, "%", None
        else:
            elapsed = metrics.format_duration(s["elapsed_s"])
            text = f"{prefix}: {elapsed} elapsed" + (f", {postfix}" if postfix else "")
            if s["checkpoints"]:
                text += f", {s['checkpoints']} checkpoint(s)"
            return text[:width]
        if total and n > total:
            total = None
        line = tqdm.format_meter(n, total, s["elapsed_s"], ncols=width, prefix=prefix, unit=unit,
                                 rate=rate, postfix=postfix)
        return line[:width]

    def _render(self, force: bool = False) -> str:
        now = time.monotonic()
        if now - self._width_at > 1.0:
            self._width_at = now
            try:
                self._width = os.get_terminal_size(self.stream.fileno()).columns
            except (AttributeError, ValueError, OSError):
                self._width = 80
        if force or self._changed or now - self._bar_rendered_at > 0.5:
            self._changed = False
            self._bar_rendered_at = now
            try:
                self._bar_text = self._bar_line(max(1, self._width - 1))
            except Exception:  # a display problem must never stop the run
                self._bar_text = ""
        return self._bar_text

    # -- screen ---------------------------------------------------------------------------------

    def _track_column(self, data: bytes) -> None:
        cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
        tail = data[cut + 1:] if cut >= 0 else data
        if _MOVES.search(tail) or (cut < 0 and self._col is None and tail):
            self._col = None  # the script moves the cursor itself: stay out of its way
            return
        start = 0 if cut >= 0 else (self._col or 0)
        self._col = _visible_width(tail, start) if tail else start

    def _erase(self) -> bytes:
        where, self._bar_where = self._bar_where, None
        if where == "here":
            return b"\r\x1b[K"
        if where == "below":
            # the bar row exists below, so moving down never scrolls and restoring is exact
            return b"\x1b7\x1b[B\r\x1b[K\x1b8"
        return b""

    def _draw(self) -> bytes:
        text = self._render()
        col = self._col
        if not text or col is None or self._width < 20 or col >= self._width - 1:
            return b""  # a wrapped line or a tiny terminal: no room for a bar without garbling
        bar = text.encode("utf-8", "replace")
        if col == 0:
            self._bar_where = "here"
            return b"\r" + bar + b"\x1b[K\r"
        self._bar_where = "below"
        return b"\n\r" + bar + b"\x1b[K\x1b[A\r" + (b"\x1b[%dC" % col)

    def _refresh_bar(self) -> None:
        if self._col is None:
            return
        payload = self._erase() + self._draw()
        self._write_screen(payload)

    def _write_screen(self, payload: bytes, stderr: bool | None = None) -> None:
        if not payload:
            return
        if stderr is None:
            stderr = self._on_screen[True]
        target = self._err if stderr else self._out
        try:
            target.write(payload)
            target.flush()
        except (OSError, ValueError):
            pass
