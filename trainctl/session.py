"""The session store: session.json (atomic rewrite) and events.jsonl (locked append) per run."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from . import sysinfo
from .errors import SessionNotFoundError, TrainctlError, TrainctlWarning
from .fsutil import atomic_write_json

EVENT_SCHEMA_VERSION = 1


class State(str, Enum):
    """How a session or one attempt stands. The values are what session.json records; a State
    compares equal to its value, so records read back as strings work with it."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    PREEMPTED = "preempted"
    KILLED = "killed"
    STOPPED = "stopped"  # `trainctl sessions stop`: emergency checkpoint, then the end
    CRASHED = "crashed"  # never recorded: shown for a session whose processes are gone without an end

    def __str__(self) -> str:
        return self.value


STATUSES = tuple(s.value for s in State if s is not State.CRASHED)  # what session.json may record
TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.PREEMPTED, State.KILLED, State.STOPPED})
LOCK_TIMEOUT_S = 60.0
LOCK_POLL_S = 0.0005

# Metrics whose best value is the largest; everything else (losses, errors, perplexity) is min.
_MAX_HINTS = ("acc", "f1", "precision", "recall", "auc", "score", "bleu", "rouge", "map",
              "iou", "reward", "return", "dice", "r2")


@lru_cache(maxsize=4096)
def metric_mode(name: str) -> str:
    lowered = name.lower()
    if "loss" in lowered or "err" in lowered or "ppl" in lowered or "perplexity" in lowered:
        return "min"
    return "max" if any(h in lowered for h in _MAX_HINTS) else "min"


def new_session_id(now: float | None = None) -> str:
    """Sortable: UTC time first, then a short random part."""
    t = time.gmtime(now if now is not None else time.time())
    return time.strftime("%Y%m%d-%H%M%S", t) + "-" + os.urandom(3).hex()


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive lock on `path` across processes.

    On POSIX this is fcntl.flock on the lock file, which is what filelock does underneath
    (the two interoperate), without filelock's ~25 ms import and its polling sleeps between
    writers; elsewhere filelock itself.
    """
    if fcntl is None:  # pragma: no cover - Windows
        from filelock import FileLock

        with FileLock(str(path), timeout=LOCK_TIMEOUT_S).acquire(poll_interval=LOCK_POLL_S):
            yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                deadline = deadline or now + LOCK_TIMEOUT_S
                if now > deadline:
                    raise SessionLockTimeout(path) from None
                time.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


class SessionLockTimeout(TrainctlError, TimeoutError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} stayed locked for {LOCK_TIMEOUT_S:.0f} s.",
                         "A process holding it may be stopped (Ctrl-Z?); resume or end it, then retry.")
        self.path = path


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(value)


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default)


def encode_event(event: dict[str, Any]) -> str:
    """One JSON line; NaN/Inf are kept (as JSON's NaN/Infinity, which Python reads back)."""
    return _ENCODER.encode(event)


class CorruptSessionError(TrainctlError, ValueError):
    pass


class AmbiguousSessionError(SessionNotFoundError):
    def __init__(self, ref: str, matches: list[str]) -> None:
        TrainctlError.__init__(self, f"'{ref}' matches {len(matches)} sessions ({', '.join(matches[:3])}"
                               + (", ..." if len(matches) > 3 else "") + ").",
                               "Give more of the id, or use latest / latest~N.")
        self.session_ref = ref
        self.matches = matches


@dataclass
class Session:
    """One session directory. Cheap to construct; reads happen on demand."""

    dir: Path

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def json_path(self) -> Path:
        return self.dir / "session.json"

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def output_log(self) -> Path:
        return self.dir / "output.log"

    @property
    def tensorboard_dir(self) -> Path:
        return self.dir / "tensorboard"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CorruptSessionError(f"session {self.id}: session.json is missing.",
                                      f"The folder {self.dir} is not a complete session.") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptSessionError(f"session {self.id}: session.json is unreadable ({e}).",
                                      "It may have been written by a crashed process; other sessions are unaffected.") from e
        if not isinstance(data, dict):
            raise CorruptSessionError(f"session {self.id}: session.json is not an object.")
        return data

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into session.json under the session lock; dict values merge one level."""
        with _lock(self.dir / "session.json.lock"):
            try:
                data = self.read()
            except CorruptSessionError:
                data = {"id": self.id}
            for key, value in fields.items():
                if isinstance(value, dict) and isinstance(data.get(key), dict):
                    data[key] = {**data[key], **value}
                else:
                    data[key] = value
            atomic_write_json(self.json_path, data, sync_dir=False)
            return data

    def append_events(self, events: Iterable[dict[str, Any]]) -> None:
        """Append events as JSON lines under the events lock: one write, never rewritten."""
        lines = []
        for event in events:
            event.setdefault("v", EVENT_SCHEMA_VERSION)
            event.setdefault("t", time.time())
            lines.append(encode_event(event))
        if not lines:
            return
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        with _lock(self.dir / "events.jsonl.lock"):
            fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # a torn last line from a writer killed mid-write must not glue onto ours
                size = os.fstat(fd).st_size
                if size:
                    with open(self.events_path, "rb") as f:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":
                            payload = b"\n" + payload
                view = memoryview(payload)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            finally:
                os.close(fd)

    def event(self, kind: str, **fields: Any) -> None:
        self.append_events([{"kind": kind, **fields}])

    def iter_events(self, kinds: Iterable[str] | None = None, *, offset: int = 0) -> Iterator[dict[str, Any]]:
        """Events in order; torn or malformed lines are skipped (with one warning per file)."""
        wanted = set(kinds) if kinds else None
        for event in read_events(self.events_path, offset=offset)[0]:
            if wanted is None or event.get("kind") in wanted:
                yield event

    def metrics(self, *, include_superseded: bool = False) -> list[dict[str, Any]]:
        """Metric events, without those superseded by a resume (unless asked)."""
        events = list(self.iter_events(("metric", "supersede")))
        if include_superseded:
            return [e for e in events if e.get("kind") == "metric"]
        return effective_metrics(events)

    def status(self, data: dict[str, Any] | None = None) -> State:
        data = data if data is not None else self.read()
        return effective_status(data)

    def checkpoint_location(self, data: dict[str, Any] | None = None) -> str | None:
        """Where this session's checkpoints go (a folder today, a URI later): recorded in
        session.json when the session is created; older records are worked out from their config."""
        if data is None:
            try:
                data = self.read()
            except CorruptSessionError:
                return None
        location = data.get("checkpoint_location")
        if isinstance(location, str) and location:
            return location
        cfg = data.get("trainctl_config") or {}
        base = cfg.get("checkpoint_dir")
        if isinstance(base, str) and base:
            root = Path(cfg.get("project_root") or data.get("cwd") or ".")
            return str((root / base / self.id).resolve())
        return None


def effective_metrics(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop metric events that a later resume superseded.

    A `supersede` event {attempt, from_step} says: metrics of attempts before `attempt` with
    step >= from_step belong to work that was thrown away (the run resumed from an earlier
    checkpoint), so the curve shows each step once.
    """
    supersedes = [(e.get("attempt", 0), e.get("from_step")) for e in events if e.get("kind") == "supersede"]
    out = []
    for e in events:
        if e.get("kind") != "metric":
            continue
        step, attempt = e.get("step"), e.get("attempt", 0)
        if step is not None and any(
            attempt < a and from_step is not None and step >= from_step for a, from_step in supersedes
        ):
            continue
        out.append(e)
    return out


def read_events(path: Path, *, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Parse events.jsonl from byte `offset`; return (events, offset after the last full line)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # an unterminated last line may still be being written
    events: list[dict[str, Any]] = []
    bad = 0
    for raw in data[:end].splitlines():
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(event, dict):
            events.append(event)
        else:
            bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)", TrainctlWarning, stacklevel=3)
    return events, offset + end


def effective_status(data: dict[str, Any]) -> State:
    """The recorded status, or CRASHED for a session whose processes are gone without an end."""
    try:
        status = State(data.get("status", "pending"))
    except ValueError:
        return State.CRASHED  # written by something else: not a session we can vouch for
    if status in TERMINAL:
        return status
    if data.get("host") and data.get("host") != sysinfo.host():
        return status  # another machine: can't tell from here
    pids = [(p.get("pid"), p.get("start_ticks")) for p in data.get("processes", []) if isinstance(p, dict)]
    if not pids:
        return status
    if any(sysinfo.pid_alive(pid, ticks) for pid, ticks in pids):
        return status
    return State.CRASHED


def summarize_metrics(metrics: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """{'last': {name: value}, 'best': {name: {'value','step','mode'}}, 'steps': n}."""
    last: dict[str, Any] = {}
    best: dict[str, dict[str, Any]] = {}
    count = 0
    for e in metrics:
        count += 1
        for name, value in (e.get("values") or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            last[name] = value
            if isinstance(value, float) and not math.isfinite(value):
                continue
            mode = metric_mode(name)
            current = best.get(name)
            if current is None or (value < current["value"] if mode == "min" else value > current["value"]):
                best[name] = {"value": value, "step": e.get("step"), "epoch": e.get("epoch"), "mode": mode}
    return {"last": last, "best": best, "points": count}


class SessionStore:
    """All sessions of one project: `<state_dir>/sessions/<id>/`."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.sessions_dir = self.state_dir / "sessions"

    def create(self, *, session_id: str | None = None, status: str = "pending",
               **fields: Any) -> Session:
        session_id = session_id or new_session_id()
        directory = self.sessions_dir / session_id
        directory.mkdir(parents=True, exist_ok=False)
        (directory / "tensorboard").mkdir()
        now = time.time()
        data = {
            "id": session_id,
            "status": status,
            "created_at": now,
            "host": sysinfo.host(),
            "python": sysinfo.python_version(),
            "torch": sysinfo.torch_version(),
            **fields,
        }
        atomic_write_json(directory / "session.json", data)
        session = Session(directory)
        session.event("status", status=status)
        return session

    def ids(self) -> list[str]:
        try:
            return sorted((p.name for p in self.sessions_dir.iterdir() if p.is_dir()), reverse=True)
        except FileNotFoundError:
            return []

    def get(self, ref: str) -> Session:
        """By id, unique id prefix or suffix, name, 'latest' or 'latest~N' (N sessions before)."""
        ids = self.ids()
        if not ids:
            raise SessionNotFoundError(ref, "No sessions yet: start one with: trainctl local SCRIPT")
        if ref == "latest" or ref.startswith("latest~"):
            back = ref.partition("~")[2]
            if back and not back.isdigit():
                raise SessionNotFoundError(ref, "Use latest, latest~1 (the one before), latest~2, ...")
            n = int(back or 0)
            if n >= len(ids):
                raise SessionNotFoundError(ref, f"This project has {len(ids)} session(s).")
            return Session(self.sessions_dir / ids[n])
        if ref in ids:
            return Session(self.sessions_dir / ref)
        matches = [i for i in ids if i.startswith(ref) or i.endswith(ref)]
        if len(matches) == 1:
            return Session(self.sessions_dir / matches[0])
        if len(matches) > 1:
            raise AmbiguousSessionError(ref, matches)
        for i in ids:  # by name, newest first
            try:
                if Session(self.sessions_dir / i).read().get("name") == ref:
                    return Session(self.sessions_dir / i)
            except CorruptSessionError:
                continue
        raise SessionNotFoundError(ref)

    def list(self, *, status: str | None = None, limit: int | None = None,
             ) -> tuple[list[dict[str, Any]], list[str]]:
        """(records newest first, problems): reads session.json files only."""
        records: list[dict[str, Any]] = []
        problems: list[str] = []
        for i in self.ids():
            session = Session(self.sessions_dir / i)
            try:
                data = session.read()
            except CorruptSessionError as e:
                problems.append(str(e))
                continue
            data["status"] = effective_status(data)
            if status and data["status"] != status:
                continue
            data.setdefault("id", i)
            data["dir"] = str(session.dir)
            records.append(data)
            if limit and len(records) >= limit:
                break
        return records, problems
