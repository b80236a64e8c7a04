"""What any process can do to a session it did not start: follow its output, stop it, delete
it. Everything goes through the session store and the recorded handle's backend; nothing here
prints (the CLI shows what these return)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.base import Handle, LogChunk, get_backend
from ..errors import TrainctlError, UsageError
from ..session import (
    TERMINAL,
    Session,
    SessionStore,
    State,
    effective_status,
    summarize_metrics,
)

FOLLOW_PAUSE_S = 0.2
SETTLE_S = 10.0  # after the script ends, how long the engine may take to record the end


def recorded_handle(data: dict[str, Any]) -> Handle | None:
    """The handle of the session's latest attempt, as session.json holds it; for a multi-node
    job, that of a node running on this machine (each node records its own)."""
    raw = data.get("handle")
    if raw is None and isinstance(data.get("nodes"), dict):
        from .. import sysinfo

        here = [n for n in data["nodes"].values() if isinstance(n, dict) and n.get("handle")
                and n.get("host") == sysinfo.host()]
        running = [n for n in here if n.get("state") not in {s.value for s in TERMINAL}]
        raw = (running or here or [{}])[0].get("handle")
    try:
        return Handle.from_json(raw)
    except ValueError:
        return None


def refresh(session: Session) -> None:
    """Let the backend of a session that has not ended bring its record here up to date (a
    cloud backend copies the output and events from storage and records the end)."""
    data = _read(session)
    if not data or effective_status(data) in TERMINAL:
        return
    handle = recorded_handle(data)
    if handle is not None:
        try:
            get_backend(handle.backend).describe(handle)
        except TrainctlError:
            pass  # unreachable for now: the record stays as it was


def output_tail(session: Session, lines: int) -> tuple[bytes, int]:
    """The last `lines` lines of the session's output (all of it when `lines` < 0), and the
    offset where they end (the session's record refreshed first)."""
    refresh(session)
    try:
        with open(session.output_log, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            if lines < 0:
                f.seek(0)
                return f.read(), end
            if lines == 0:
                return b"", end
            block = 65536
            data = b""
            pos = end
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except OSError:
        return b"", 0
    body = data[:-1] if data.endswith(b"\n") else data
    cut = -1
    for _ in range(lines):
        cut = body.rfind(b"\n", 0, cut if cut >= 0 else len(body))
        if cut < 0:
            break
    return (data if cut < 0 and pos == 0 else data[cut + 1:]), end


def follow_output(session: Session, since: int) -> Iterator[LogChunk]:
    """The session's output from byte `since` until the session ends: what output.log holds,
    then each attempt's output through its backend (a restart is followed too)."""
    offset = since
    while True:
        for chunk in _read_log(session.output_log, offset):
            offset = chunk.offset + len(chunk.data)
            yield chunk
        data = _read(session)
        status = effective_status(data) if data else State.CRASHED
        if status in TERMINAL or status is State.CRASHED:
            for chunk in _read_log(session.output_log, offset):  # written while we looked
                offset = chunk.offset + len(chunk.data)
                yield chunk
            return
        handle = recorded_handle(data)
        if handle is not None:
            backend = get_backend(handle.backend)
            if backend.describe(handle).running:
                for chunk in backend.log_iter(handle, since=offset, follow=True):
                    end = chunk.offset + len(chunk.data)
                    if end > offset:  # only what was not shown yet
                        yield LogChunk(offset, chunk.data[max(0, offset - chunk.offset):], chunk.stream)
                        offset = end
                continue
        time.sleep(FOLLOW_PAUSE_S)  # between two attempts, or the engine has not launched yet


def _read_log(path: Path, offset: int) -> Iterator[LogChunk]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while True:
                data = f.read(65536)
                if not data:
                    return
                yield LogChunk(offset, data, "output")
                offset += len(data)
    except FileNotFoundError:
        return


def _read(session: Session) -> dict[str, Any]:
    try:
        return session.read()
    except Exception:
        return {}


# ---------------------------------------------------------------------------------- stop

@dataclass
class StopResult:
    """What `stop` did: the status the session ended with, and whether it was running."""

    session: Session
    was_running: bool
    status: str
    data: dict[str, Any] = field(default_factory=dict)


def stop(session: Session, *, now: bool, grace_period_s: float | None = None,
         settle_s: float = SETTLE_S, release: bool = True) -> StopResult:
    """Stop a running session: a stop request in the store (so the engine neither restarts nor
    calls it preempted), then SIGTERM to the script through its backend (the emergency
    checkpoint), SIGKILL after the grace period (at once with `now`). Waits for the end; then
    releases what the attempt held unless told not to (a stopped pod kept for its volume)."""
    data = session.read()
    status = effective_status(data)
    if status in TERMINAL or status is State.CRASHED:
        return StopResult(session, False, status, data)
    handle = recorded_handle(data)
    deadline = time.monotonic() + settle_s
    while handle is None and (data.get("command") or [None])[0] == "trainctl" and time.monotonic() < deadline:
        time.sleep(0.05)  # started by trainctl, its first attempt not launched yet
        data = _read(session)
        if effective_status(data) is not State.RUNNING:
            return StopResult(session, False, effective_status(data), data)
        handle = recorded_handle(data)
    if handle is None:
        pid = next((p.get("pid") for p in data.get("processes") or [] if p.get("role") == "script"), None)
        raise UsageError(f"session {session.id} was not started by trainctl local (no recorded handle).",
                         f"Stop its script yourself: kill -TERM {pid}" if pid else
                         "Stop its script yourself with kill -TERM PID.")
    grace = 0.0 if now else float(grace_period_s if grace_period_s is not None else
                                  (data.get("restart") or {}).get("grace_period_s", 30.0))
    session.update(stop_request={"t": time.time(), "now": now, "pid": os.getpid()})
    session.event("stop", now=now, grace_period_s=grace)
    backend = get_backend(handle.backend)
    backend.stop(handle, grace)
    while backend.describe(handle).running:  # describe keeps the grace period's deadline
        time.sleep(0.05)
    if release:
        backend.release(handle)
    data = _settle(session, handle, grace, settle_s)
    return StopResult(session, True, effective_status(data) if data else State.CRASHED, data)


def _settle(session: Session, handle: Handle, grace_period_s: float, settle_s: float) -> dict[str, Any]:
    """Wait for whoever watched the run (the engine, or the runtime when the engine is gone)
    to record its end, stopping an attempt the engine launched meanwhile; record the end here
    when nobody is left to."""
    deadline = time.monotonic() + settle_s
    while True:
        data = _read(session)
        status = effective_status(data) if data else State.CRASHED
        if status in TERMINAL:
            return data
        if status is State.CRASHED:
            break
        current = recorded_handle(data)
        if current is not None and current != handle:  # a restart raced the stop request
            backend = get_backend(current.backend)
            if backend.describe(current).running:
                backend.stop(current, grace_period_s)
                while backend.describe(current).running:
                    time.sleep(0.05)
            handle = current
            deadline = time.monotonic() + settle_s
        if time.monotonic() >= deadline:
            return data  # its engine lives and has not recorded the end yet
        time.sleep(0.05)
    events = list(session.iter_events(("checkpoint",)))
    summary = {**summarize_metrics(session.metrics()), "checkpoints": len(events),
               "last_checkpoint": events[-1].get("path") if events else None}
    now = time.time()
    attempts = data.get("attempts") or []
    if attempts and isinstance(attempts[-1], dict) and not attempts[-1].get("ended_at"):
        attempts[-1].update(ended_at=now, status=State.STOPPED)
    data = session.update(status=State.STOPPED, ended_at=now, summary=summary, attempts=attempts)
    session.event("status", status=State.STOPPED, source="stop")
    return data


# -------------------------------------------------------------------------------- delete

@dataclass
class Removal:
    """One session to delete: what goes, what is kept and why, the bytes freed."""

    session_id: str
    paths: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)
    bytes: int = 0
    refused: str | None = None
    checkpoint_folder: Path | None = None  # removed too once the files in it are


def plan_delete(store: SessionStore, refs: list[str], *, checkpoints: bool,
                checkpoint_root: Path) -> tuple[list[Removal], list[str]]:
    """(what deleting `refs` removes, ids already gone). Nothing is deleted here. A running
    session is refused; checkpoints go only with `checkpoints`, only under `checkpoint_root`,
    and never one a running session resumes from."""
    from ..errors import SessionNotFoundError

    removals: list[Removal] = []
    gone: list[str] = []
    seen: set[str] = set()
    protected = running_resume_paths(store)
    for ref in refs:
        try:
            session = store.get(ref)
        except SessionNotFoundError:
            if _looks_like_id(ref):
                gone.append(ref)  # deleted before: deleting again is a no-op
                continue
            raise
        if session.id in seen:
            continue
        seen.add(session.id)
        data = _read(session)
        removal = Removal(session.id)
        status = effective_status(data) if data else State.CRASHED
        if status in (State.RUNNING, State.PENDING):
            removal.refused = f"session {session.id} is {status}"
            removals.append(removal)
            continue
        removal.paths.append(session.dir)
        removal.bytes += _size(session.dir)
        location = session.checkpoint_location(data)
        folder = Path(location) if location and "://" not in location else None
        if folder is not None and folder.exists():
            inside = folder.resolve() == checkpoint_root.resolve() or checkpoint_root.resolve() in folder.resolve().parents
            if not checkpoints:
                removal.kept.append((folder, "checkpoints are kept without --checkpoints"))
            elif not inside or folder.resolve() == checkpoint_root.resolve():
                removal.kept.append((folder, f"outside the checkpoint dir {checkpoint_root}"))
            else:
                removal.checkpoint_folder = folder
                for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                    if os.path.realpath(path) in protected:
                        removal.kept.append((path, "a running session resumes from it"))
                        continue
                    removal.paths.append(path)
                    removal.bytes += _size(path)
        removals.append(removal)
    return removals, gone


def delete(removal: Removal) -> None:
    """Remove what `plan_delete` listed: checkpoint manifests before their files, the session
    folder last, so an interrupted delete leaves no valid-looking half."""
    from ..checkpoint import MANIFEST_SUFFIX, delete_checkpoint

    if removal.refused:
        raise UsageError(f"{removal.refused}; not deleted.", f"Stop it first: trainctl sessions stop {removal.session_id}")
    files = [p for p in removal.paths if not p.is_dir()]
    for path in files:
        if path.name.endswith(MANIFEST_SUFFIX) and path.with_name(path.name[:-len(MANIFEST_SUFFIX)]) in files:
            continue  # removed with its checkpoint
        if Path(str(path) + MANIFEST_SUFFIX) in files:
            delete_checkpoint(path)
        else:
            path.unlink(missing_ok=True)
    for folder in {p.parent for p in files}:
        _remove_empty(folder, removal.checkpoint_folder)
    for path in removal.paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _remove_empty(folder: Path, top: Path | None) -> None:
    """Remove `folder` and its parents up to `top` (included) while they are empty."""
    if top is None or (folder != top and top not in folder.parents):
        return
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == top:
            return
        folder = folder.parent


def _size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def _looks_like_id(ref: str) -> bool:
    parts = ref.split("-")
    return len(parts) == 3 and parts[0].isdigit() and len(parts[0]) == 8 and parts[1].isdigit()


def running_resume_paths(store: SessionStore) -> set[str]:
    """Real paths of the checkpoints running sessions resume from: never deleted."""
    records, _problems = store.list(status=State.RUNNING)
    out = set()
    for r in records:
        for value in [r.get("resume_from"), *[a.get("resume_from") for a in r.get("attempts") or [] if isinstance(a, dict)]]:
            if isinstance(value, str) and value:
                out.add(os.path.realpath(value if os.path.isabs(value) else os.path.join(r.get("cwd") or ".", value)))
    return out
