"""The session store: session.json (atomic rewrite) and events.jsonl (locked append) per run."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import threading
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
from .fsutil import atomic_write_json, fsync_dir
from .values import is_number

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
        """session.json, checked against SESSION_FIELDS: CorruptSessionError saying what is wrong."""
        data = self.read_raw()
        problem = session_problem(data)
        if problem:
            raise CorruptSessionError(f"session {self.id}: session.json is unreadable: {problem}.",
                                      f"Fix or remove that field in {self.json_path}; other sessions are unaffected.")
        return data

    def read_raw(self) -> dict[str, Any]:
        """session.json as stored (a JSON object), without checking its fields."""
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CorruptSessionError(f"session {self.id}: session.json is missing.",
                                      f"The folder {self.dir} is not a complete session.") from e
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CorruptSessionError(f"session {self.id}: session.json is unreadable ({e}).",
                                      "It may have been written by a crashed process; other sessions are unaffected.") from e
        if not isinstance(data, dict):
            raise CorruptSessionError(f"session {self.id}: session.json is not an object.")
        return data

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into session.json under the session lock; dict values merge one level."""
        with _lock(self.dir / "session.json.lock"):
            try:
                data = self.read_raw()  # a field another writer got wrong is kept, not dropped
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
            fd = os.open(self.events_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                # a torn last line from a writer killed mid-write must not glue onto ours
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    payload = b"\n" + payload
                try:
                    written = os.write(fd, payload)  # whole records in one write
                    if written != len(payload):
                        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} "
                                      f"of {len(payload)} bytes)", str(self.events_path))
                except BaseException:
                    # back to the last whole line: the caller keeps these events and retries
                    # them, and a partial copy left here would be a torn line plus duplicates
                    try:
                        os.ftruncate(fd, size)
                    except OSError:
                        pass
                    raise
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


_LINE_AT: dict[tuple[str, int], int] = {}  # (events file, byte offset) -> line number there
_WARNED: set[str] = set()


def read_events(path: Path, *, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Parse events.jsonl from byte `offset`; return (events, offset after the last full line).

    A line that is not JSON or breaks its kind's schema (EVENT_FIELDS) is skipped with one
    warning naming the file and line; a torn last line is left for the next read.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # an unterminated last line may still be being written
    events: list[dict[str, Any]] = []
    bad: list[tuple[int, str]] = []
    first = _LINE_AT.get((str(path), offset), 1 if offset == 0 else None)
    for index, raw in enumerate(data[:end].split(b"\n")[:-1]):
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            bad.append((index, f"not JSON ({str(e).split(':')[0]})"))
            continue
        except RecursionError:
            bad.append((index, "nested too deeply"))
            continue
        problem = event_problem(event)
        if problem:
            bad.append((index, problem))
            continue
        events.append(event)
    if first is not None and end:
        if len(_LINE_AT) > 256:
            _LINE_AT.clear()
        _LINE_AT[(str(path), offset + end)] = first + data[:end].count(b"\n")
    if bad:
        def where(index: int) -> str:
            return f"{path}:{first + index}" if first is not None else f"{path} (line {index + 1} after byte {offset})"

        index, why = bad[0]
        more = f"; {len(bad) - 1} more bad line(s) skipped too" if len(bad) > 1 else ""
        message = f"{where(index)}: skipped a malformed record ({why}){more}"
        if message not in _WARNED:  # once per process, however often the file is read
            _WARNED.add(message)
            warnings.warn(message, TrainctlWarning, stacklevel=3)
    return events, offset + end


# -- record schemas --------------------------------------------------------------------------
# A record is checked when read; a bad one is skipped (events) or makes its session
# `unreadable` (session.json), so one hand-edited or half-written file never breaks a command.

_MAX_INT = 2**63  # what TensorBoard, JSON readers in other languages and torch hold


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -_MAX_INT <= v < _MAX_INT


def _is_num(v: Any) -> bool:
    return is_number(v) and (isinstance(v, float) or _is_int(v))


def _opt(check: Any) -> Any:
    return lambda v: v is None or check(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _is_step(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _is_value(v: Any) -> bool:
    """A logged metric value: a number (NaN/Inf included) or a label; never a container."""
    return v is None or isinstance(v, (str, bool, int, float))  # ints beyond float: drawn as inf


def _is_process(v: Any) -> bool:
    return (isinstance(v, dict) and _is_int(v.get("pid")) and 0 < v["pid"] < 2**31
            and (v.get("start_ticks") is None or (_is_int(v["start_ticks"]) and v["start_ticks"] >= 0)))


_EVENT_COMMON = {"kind": _is_str, "t": _opt(_is_num), "v": _opt(_is_int), "attempt": _opt(_is_step),
                 "source": _opt(_is_str)}
EVENT_FIELDS: dict[str, dict[str, Any]] = {
    "metric": {"step": _opt(_is_step), "epoch": _opt(_is_num),
               "values": lambda v: isinstance(v, dict) and all(_is_value(x) for x in v.values())},
    "checkpoint": {"path": _is_str, "step": _opt(_is_step), "epoch": _opt(_is_num),
                   "metrics": _opt(_is_dict), "bytes": _opt(_is_int), "digest": _opt(_is_str)},
    "checkpoint_failed": {"path": _opt(_is_str), "error": _is_str, "step": _opt(_is_step)},
    "supersede": {"from_step": _opt(_is_step), "resume": _opt(_is_str)},
    "status": {"status": _is_str, "exit_code": _opt(_is_int), "signal": _opt(_is_str),
               "error": _opt(_is_str)},
    "totals": {"steps": _opt(_is_step), "epochs": _opt(_is_step)},
    "restart": {"reason": _opt(_is_str), "resume": _opt(_is_str)},
    "warning": {"message": _is_str},
    "retention": {"removed": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)},
}

SESSION_FIELDS: dict[str, Any] = {
    "id": _is_str, "status": _is_str, "name": _opt(_is_str), "script": _opt(_is_str),
    "cwd": _opt(_is_str), "host": _opt(_is_str), "backend": _opt(_is_str),
    "parent": _opt(_is_str), "resume_from": _opt(_is_str), "error": _opt(_is_str),
    "signal": _opt(_is_str), "exit_code": _opt(_is_int),
    "created_at": _opt(_is_num), "started_at": _opt(_is_num), "ended_at": _opt(_is_num),
    "args": _opt(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "command": _opt(_is_list),
    "processes": _opt(lambda v: isinstance(v, list) and all(_is_process(p) for p in v)),
    "attempts": _opt(lambda v: isinstance(v, list) and all(isinstance(a, dict) for a in v)),
    "summary": _opt(lambda v: isinstance(v, dict) and isinstance(v.get("last", {}), dict)
                    and isinstance(v.get("best", {}), dict)
                    and all(isinstance(b, dict) for b in v.get("best", {}).values())
                    and (v.get("checkpoints") is None or _is_int(v["checkpoints"]))),
    "totals": _opt(lambda v: isinstance(v, dict) and all(x is None or _is_step(x) for x in v.values())),
    "config": _opt(_is_dict), "trainctl_config": _opt(_is_dict), "git": _opt(_is_dict),
    "runtime": _opt(_is_dict), "resources": _opt(_is_dict), "diagnosis": _opt(_is_dict),
    "degraded": _opt(_is_dict), "checkpoint_location": _opt(_is_str), "handle": _opt(_is_dict),
    "stop_request": _opt(_is_dict), "restart": _opt(_is_dict),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def event_problem(event: Any) -> str | None:
    """What is wrong with one events.jsonl record, or None (unknown kinds pass: newer writers)."""
    if not isinstance(event, dict):
        return f"a {type(event).__name__}, not an object"
    fields = EVENT_FIELDS.get(event.get("kind"), {}) if isinstance(event.get("kind"), str) else {}
    for schema in (_EVENT_COMMON, fields):
        for name, check in schema.items():
            value = event.get(name)  # a missing field reads as None: fine where optional
            if not check(value):
                return f"'{name}' is {_short(value)}" if name in event else f"no '{name}'"
    return None


def session_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with a session.json object, or None."""
    for name, check in SESSION_FIELDS.items():
        if name in data and not check(data[name]):
            return f"'{name}' is {_short(data[name])}"
    return None


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
        return _nodes_status(data, status)
    if any(sysinfo.pid_alive(pid, ticks) for pid, ticks in pids):
        return status
    return State.CRASHED


def _nodes_status(data: dict[str, Any], status: State) -> State:
    """A multi-node session lists each node's launcher under "nodes": CRASHED when every node
    ran on this machine and none of their launchers is alive (elsewhere: can't tell from here)."""
    nodes = [n for n in (data.get("nodes") or {}).values() if isinstance(n, dict)] \
        if isinstance(data.get("nodes"), dict) else []
    if not nodes or any(n.get("host") != sysinfo.host() for n in nodes):
        return status
    launchers = [n.get("launcher") for n in nodes if isinstance(n.get("launcher"), dict)]
    if not launchers or any(sysinfo.pid_alive(p.get("pid"), p.get("start_ticks")) for p in launchers):
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
        if directory.exists():
            raise FileExistsError(errno.EEXIST, "session exists", str(directory))
        # made whole under a hidden name, then renamed into place: a reader (sessions list,
        # latest, a second node on a shared state dir) never sees a folder without session.json
        staging = self.sessions_dir / f".new-{session_id}-{os.getpid()}-{threading.get_ident()}"
        staging.mkdir(parents=True)
        try:
            (staging / "tensorboard").mkdir()
            self._write_new(staging, session_id, status, fields)
            try:
                os.rename(staging, directory)  # onto a folder another creator filled: ENOTEMPTY
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(errno.EEXIST, "session exists", str(directory)) from e
                raise
            fsync_dir(self.sessions_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        session = Session(directory)
        session.event("status", status=status)
        return session

    @staticmethod
    def _write_new(directory: Path, session_id: str, status: str, fields: dict[str, Any]) -> None:
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

    def ids(self) -> list[str]:
        try:
            return sorted((p.name for p in self.sessions_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                          reverse=True)
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
                data = {"id": i, "status": "unreadable", "error": e.message}
                if status and status != "unreadable":
                    continue
                data["dir"] = str(session.dir)
                records.append(data)
                if limit and len(records) >= limit:
                    break
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
