"""What every cloud backend shares: the local folder of a session that runs elsewhere, kept in
step with its copy in storage, and its cost so far from the machines its record lists.

A cloud session has a local folder like any other (`.trainctl/sessions/<id>/`), so `sessions
list/show/logs/attach`, `monitor` and `plot` read it as they read a local run. Its run writes
to storage, not to that folder: `SessionMirror` appends what appeared in storage since the
last look (output segments to `output.log`, event segments to `events.jsonl`, the machine's
end and summary to `session.json`). Any number of processes may mirror one session at once:
a lock and a small state file (`mirror.json`: how many bytes of each log are in) keep every
byte in exactly once.

session.json's `cloud` table, what the launcher records and `recorded_cost` reads:

    {"provider": "aws", "region": ..., "storage": <session URI>, "deadline": <ISO UTC>,
     "machines": [{"id", "type", "market", "usd_per_hour", "price_source", "state",
                   "started_at", "ended_at"}], "seen_at": <unix time of the last look>}
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..fsutil import atomic_write_json
from ..session import TERMINAL, Session
from .base import LogChunk

if TYPE_CHECKING:
    from ..storage.remote import RemoteSession, SegmentReader

MIRROR_STATE = "mirror.json"
MIRROR_LOCK = "mirror.lock"
READ_BYTES = 65536
# what the machine's record says better than the launcher's (the rest stays the launcher's)
REMOTE_FIELDS = ("summary", "diagnosis", "exit_code", "signal", "totals", "config", "runtime", "error",
                 "resume_from", "gpus", "torch", "git")


@contextmanager
def _locked(path: os.PathLike[str] | str) -> Iterator[None]:
    import fcntl

    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Log:
    """One remote log read incrementally: the bytes this process has seen, from byte 0."""

    def __init__(self, remote: RemoteSession, which: str) -> None:
        self.remote, self.which = remote, which
        self.reader = self._reader()
        self.seen = 0

    def _reader(self) -> SegmentReader:
        return self.remote.output_reader() if self.which == "output" else self.remote.events_reader()

    def poll(self) -> tuple[int, bytes]:
        """(offset, bytes) that appeared since the last poll."""
        data = self.reader.poll()
        start = self.seen
        self.seen += len(data)
        return start, data

    def reread(self) -> bytes:
        """Everything, from byte 0 (a fresh reader)."""
        self.reader = self._reader()
        data = self.reader.poll()
        self.seen = len(data)
        return data


class SessionMirror:
    """The local folder of a session whose run writes to `remote`."""

    def __init__(self, session: Session, remote: RemoteSession) -> None:
        self.session = session
        self.remote = remote
        self._output = _Log(remote, "output")
        self._events = _Log(remote, "events")

    def _state(self) -> dict[str, int]:
        try:
            data = json.loads((self.session.dir / MIRROR_STATE).read_text(encoding="utf-8"))
            return {k: int(v) for k, v in data.items() if k in ("output", "events")}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def pull(self) -> LogChunk | None:
        """Bring output.log and events.jsonl up to date; returns the output this process had not
        seen yet (offsets count from the run's first byte, as in output.log)."""
        new_output = self._output.poll()
        new_events = self._events.poll()
        with _locked(self.session.dir / MIRROR_LOCK):
            state = self._state()
            out_done = self._append(self._output, new_output, state.get("output", 0), self.session.output_log,
                                    whole_lines=False)
            ev_done = self._append(self._events, new_events, state.get("events", 0), self.session.events_path,
                                   whole_lines=True)
            if (out_done, ev_done) != (state.get("output", 0), state.get("events", 0)):
                atomic_write_json(self.session.dir / MIRROR_STATE, {"output": out_done, "events": ev_done},
                                  sync_dir=False)
        offset, data = new_output
        return LogChunk(offset, data, "output") if data else None

    def read(self, offset: int) -> Iterator[LogChunk]:
        """output.log from byte `offset` (the run's output as far as any mirror brought it in)."""
        try:
            with open(self.session.output_log, "rb") as f:
                f.seek(offset)
                while data := f.read(READ_BYTES):
                    yield LogChunk(offset, data, "output")
                    offset += len(data)
        except FileNotFoundError:
            return

    def _append(self, log: _Log, new: tuple[int, bytes], done: int, path: os.PathLike[str] | str, *,
                whole_lines: bool) -> int:
        """Append to `path` the bytes of `log` past `done` (what is already in); returns the new
        count. Another process may have appended some already; a gap is filled by rereading."""
        start, data = new
        if log.seen <= done:
            return done
        if start > done:  # this process started late or another one fell behind: read it all again
            data, start = log.reread(), 0
        data = data[done - start:]
        if whole_lines:
            data = data[: data.rfind(b"\n") + 1]  # a torn last line waits for the next look
        if data:
            with open(path, "ab") as f:
                f.write(data)
        return done + len(data)

    def remote_record(self) -> dict[str, Any] | None:
        return self.remote.read_session()


def merge_remote_record(local: dict[str, Any], remote: dict[str, Any] | None) -> dict[str, Any]:
    """The fields of session.json the machine knows better (summary, diagnosis, exit code...)."""
    if not isinstance(remote, dict):
        return {}
    return {k: remote[k] for k in REMOTE_FIELDS if k in remote and remote[k] != local.get(k)}


# ----------------------------------------------------------------------------------- cost

def epoch_seconds(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 time (AWS's `...Z`); None otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class RecordedCost:
    """Cost so far of a cloud session, from its record: `total_usd` None when no price is known."""

    total_usd: float | None
    machines: int
    machine_hours: float
    unknown: tuple[str, ...]
    estimate: bool
    as_of: float

    def short(self) -> str:
        if self.total_usd is None:
            return "unknown"
        return f"{'~' if self.estimate else ''}${self.total_usd:.2f}"

    def describe(self) -> str:
        if not self.machines:
            return "$0.00 (no machines)"
        parts = [f"{self.machines} machine{'s' if self.machines != 1 else ''}", f"{self.machine_hours:.2f} machine-hours"]
        if self.unknown and self.total_usd is not None:
            parts.append(f"price unknown for {', '.join(self.unknown)}: not included")
        if self.estimate:
            parts.append("spot: estimate")
        return f"{self.short()} ({'; '.join(parts)})"


def recorded_cost(data: dict[str, Any], now: float | None = None) -> RecordedCost | None:
    """Price x running time summed over the machines session.json lists (None: not a cloud
    session). A machine still running is counted up to now while the session runs, else up to
    the last look; reads nothing but the record."""
    from ..cloud.aws.cost import MachineUsage, session_cost

    cloud = data.get("cloud")
    if not isinstance(cloud, dict) or not isinstance(cloud.get("machines"), list):
        return None
    now = time.time() if now is None else now
    status = data.get("status")
    live = status not in {s.value for s in TERMINAL}
    seen = epoch_seconds(cloud.get("seen_at")) or now
    usages = []
    for m in cloud["machines"]:
        if not isinstance(m, dict):
            continue
        started = epoch_seconds(m.get("started_at"))
        if started is None:
            continue
        ended = epoch_seconds(m.get("ended_at"))
        if ended is None and not live:
            ended = epoch_seconds(data.get("ended_at")) or seen
        price = m.get("usd_per_hour")
        usages.append(MachineUsage(
            str(m.get("id") or "?"), str(m.get("type") or "?"), str(m.get("market") or "on-demand"),
            datetime.fromtimestamp(started, timezone.utc),
            datetime.fromtimestamp(ended, timezone.utc) if ended is not None else None,
            float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) else None))
    summary = session_cost(usages, datetime.fromtimestamp(now, timezone.utc))
    return RecordedCost(summary.total_usd, len(summary.machines), summary.running_s / 3600.0, summary.unknown,
                        summary.estimate, now if live else seen)
