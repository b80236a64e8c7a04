"""TensorBoard scalars for a session's metric events (the events log stays the source of truth).

Writes classic `simple_value` scalar summaries, readable by every TensorBoard loader. The few
protobuf messages and the TFRecord framing are encoded here (a scalar event is ~40 bytes):
importing tensorboard's protobufs costs ~0.25 s of CPU and ~20 MB in the training process and
in the launcher, which is more than every event a run writes. One sink per log
folder: TensorBoard reads the event files of a folder one after another, so two live writers
in one folder lose points.
"""

from __future__ import annotations

import math
import os
import platform
import re
import struct
import threading
import time
from pathlib import Path
from typing import Any

from .values import is_number

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

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_scalars(self, values: dict[str, float], step: int, wall_time: float) -> None:
        self._open(wall_time)
        summary = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", _f32(value)))
                           for tag, value in values.items())
        self._write_event(_event(wall_time, step, _field(5, summary)))

    def _write_event(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc32c(header)) + data
                         + struct.pack("<I", _masked_crc32c(data)))

    def _open(self, wall_time: float) -> None:
        if self._file is not None:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        existing = _event_file_times(self.logdir)
        # TensorBoard reads a folder's event files in name order: this file must sort after
        # those of earlier attempts even when they started within the same second.
        stamp = max([int(time.time()), *(t + 1 for t in existing)])
        name = f"events.out.tfevents.{stamp:010d}.{platform.node()}.{os.getpid()}.{id(self)}"
        self.path = self.logdir / name
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across writes, closed in close()
        self._write_event(_event(wall_time, None, _field(3, b"brain.Event:2")))
        # A SessionLog.START makes TensorBoard drop earlier points with step >= its step. The
        # first START of a folder only marks the beginning (the plugin loader ignores the first
        # one), so later purges work; without purge_step, a continuation must not purge at all.
        if self.purge_step is not None or not existing:
            start_step = self.purge_step or 0
            self._write_event(_event(wall_time, start_step, _field(7, b"\x08\x01")))  # status: START


# --- the wire format: protobuf fields and TFRecord framing -----------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64: negative numbers as two's complement, 10 bytes
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, sub-messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int | None, what: bytes) -> bytes:
    """An Event: wall_time (1, double), step (2, int64), then one field of its `what` oneof."""
    out = b"\x09" + struct.pack("<d", wall_time)
    if step:
        out += b"\x10" + _varint(step)
    return out + what


def _f32(value: float) -> float:
    if math.isfinite(value) and abs(value) > 3.4028234663852886e38:
        return math.copysign(math.inf, value)  # what a float32 field holds for it
    return value


_CRC_TABLE: list[int] = []


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli), rotated and offset."""
    if not _CRC_TABLE:
        for i in range(256):
            crc = i
            for _ in range(8):
                crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
            _CRC_TABLE.append(crc)
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _numeric_values(values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    out: dict[str, float] = {}
    for name, value in values.items():
        if not is_number(value):
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
