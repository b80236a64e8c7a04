"""TensorBoard scalars for a session's metric events (the events log stays the source of truth).

Writes classic `simple_value` scalar summaries with TensorBoard's own protobufs and record
writer: no torch, no TensorFlow, readable by every TensorBoard loader. One sink per log
folder: TensorBoard reads the event files of a folder one after another, so two live writers
in one folder lose points.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

_EVENT_FILE_RE = re.compile(r"tfevents\.(\d+)\.")


class TensorBoardSink:
    """Appends metric events to a new event file in `logdir`, created on the first write.

    `purge_step=S` (on resume): TensorBoard discards points with step >= S written by earlier
    attempts, as torch's `SummaryWriter(purge_step=S)` does, via a `SessionLog.START` event.
    """

    def __init__(self, logdir: str | Path, *, purge_step: int | None = None) -> None:
        self.logdir = Path(logdir)
        self.purge_step = purge_step
        self.path: Path | None = None
        self._file: Any = None
        self._record_writer: Any = None
        self._next_step = purge_step or 0
        self._closed = False
        self._lock = threading.Lock()

    def write(self, events: list[dict[str, Any]]) -> None:
        """Write metric events {step, epoch, values, t}; non-numeric values are skipped."""
        with self._lock:
            if self._closed:
                raise ValueError(f"TensorBoardSink for {self.logdir} is closed")
            for event in events:
                values = _numeric_values(event.get("values"))
                if not values:
                    continue
                step = event.get("step")
                if isinstance(step, bool) or not isinstance(step, int) or not -(2**63) <= step < 2**63:
                    # like W&B: a log call without a step gets the next one
                    step = self._next_step
                self._next_step = max(self._next_step, step + 1)
                wall_time = event.get("t")
                if not isinstance(wall_time, (int, float)) or isinstance(wall_time, bool):
                    wall_time = time.time()
                self._write_scalars(values, step, float(wall_time))

    def flush(self) -> None:
        """Make what was written visible to TensorBoard."""
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        """Flush and close the event file; closing twice is harmless."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.flush()
                self._file.close()
                self._file = None
                self._record_writer = None

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_scalars(self, values: dict[str, float], step: int, wall_time: float) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self._open(wall_time)
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self._write_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))

    def _write_event(self, event: Any) -> None:
        self._record_writer.write(event.SerializeToString())

    def _open(self, wall_time: float) -> None:
        if self._file is not None:
            return
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.logdir.mkdir(parents=True, exist_ok=True)
        existing = _event_file_times(self.logdir)
        # TensorBoard reads a folder's event files in name order: this file must sort after
        # those of earlier attempts even when they started within the same second.
        stamp = max([int(time.time()), *(t + 1 for t in existing)])
        name = f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}.{id(self)}"
        self.path = self.logdir / name
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across writes, closed in close()
        self._record_writer = RecordWriter(self._file)
        self._write_event(event_pb2.Event(wall_time=wall_time, file_version="brain.Event:2"))
        # A SessionLog.START makes TensorBoard drop earlier points with step >= its step. The
        # first START of a folder only marks the beginning (the plugin loader ignores the first
        # one), so later purges work; without purge_step, a continuation must not purge at all.
        if self.purge_step is not None or not existing:
            start_step = self.purge_step or 0
            self._write_event(event_pb2.Event(
                wall_time=wall_time, step=start_step,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))


def _numeric_values(values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    out: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            out[str(name)] = float(value)
        except OverflowError:  # an int too large for a float
            out[str(name)] = math.inf if value > 0 else -math.inf
    return out


def _event_file_times(logdir: Path) -> list[int]:
    times = []
    try:
        entries = list(logdir.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _EVENT_FILE_RE.search(entry.name)
        if match and entry.is_file():
            times.append(int(match.group(1)))
    return times
