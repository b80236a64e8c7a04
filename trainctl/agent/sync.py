"""The sync loop: one local session, mirrored to storage while it runs.

What goes up, and in what order (`RemoteSession` keeps the storage side of each):
- checkpoints, as the session's events announce them: verified locally first (a checkpoint
  that fails is never uploaded), then the file, its manifest, and `latest.json` moved with a
  conditional write. When several are waiting only the newest goes (latest.json never moves
  back); the bucket copy then gets the project's retention, never losing what latest.json names;
- the events log and the script's output as segments, every `interval_s` and at the end;
- `session.json` (the launcher's record with the machine's facts merged in) when it changes,
  and `heartbeat.json` every `heartbeat_s`.

A failed upload is retried later with backoff and never reaches the training: the data stays
local (checkpoint files, the segment buffers) until an upload counts. Two threads do the work
(logs, checkpoints) so a large upload never holds up the logs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..session import Session, encode_event
from ..storage import ConditionalWriteError, StorageError
from ..storage.remote import SESSION, RemoteSession
from .lease import Lease

SYNC_INTERVAL_S = 10.0
HEARTBEAT_S = 30.0
OBSERVE_S = 1.0  # how often new events are looked at between two uploads of the logs
MAX_BACKOFF_S = 300.0
UPLOAD_MARGIN_S = 5.0  # kept free before a preemption deadline for the manifest and latest.json
NOTE_PREFIX = "[trainctl agent] "
# what the machine knows better than the launcher's record of the session
MACHINE_FIELDS = ("status", "attempts", "started_at", "ended_at", "exit_code", "signal", "summary", "diagnosis",
                  "runtime", "gpus", "torch", "python", "host", "totals", "config", "resume_from", "git", "error")
# what names this machine's processes and files: meaningless (or harmful: a pid) elsewhere
LOCAL_ONLY_FIELDS = ("id", "processes", "handle", "stop_request", "cwd", "trainctl_config")


class _Backoff:
    """When to try again after `failures` failures in a row: 1, 2, 4 ... MAX_BACKOFF_S seconds."""

    def __init__(self) -> None:
        self.failures = 0
        self.next_t = 0.0

    def failed(self, now: float) -> float:
        self.failures += 1
        delay = min(MAX_BACKOFF_S, 2.0 ** (self.failures - 1))
        self.next_t = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.next_t = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_t


class SyncLoop:
    """Mirrors one local session (`attach`) to `remote`; `start` runs it in the background,
    `close` does the last pass. Thread-safe entry points: note, add_events, request, set_deadline."""

    def __init__(self, remote: RemoteSession, *, lease: Lease | None = None, interval_s: float = SYNC_INTERVAL_S,
                 heartbeat_s: float = HEARTBEAT_S, retention: dict[str, Any] | None = None,
                 on_lost: Callable[[str], None] | None = None, on_first_step: Callable[[dict[str, Any]], None] | None = None,
                 machine: dict[str, Any] | None = None, base_record: dict[str, Any] | None = None,
                 session_id: str | None = None) -> None:
        self.remote = remote
        self.session_id = session_id
        self.lease = lease
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.retention = retention or {}
        self.on_lost = on_lost
        self.on_first_step = on_first_step
        self.machine = machine or {}
        self.base_record = base_record if base_record is not None else (remote.read_session() or {})
        self.events = remote.events_writer()
        self.output = remote.output_writer()
        self.session: Session | None = None
        self.status_override: str | None = None
        # state of the logs side
        self._lock = threading.Lock()
        self._notes: list[bytes] = []
        self._early_events: list[dict[str, Any]] = []
        self._events_offset = 0
        self._session_mtime: int | None = None
        self._session_etag: str | None = None
        self._last_beat = 0.0
        self._logs_backoff = _Backoff()
        # state of the checkpoint side
        self._pending: list[tuple[Path, dict[str, Any]]] = []
        self._uploading = False
        self._log_passes = 0
        self._ckpt_backoff = _Backoff()
        self.uploaded: list[dict[str, Any]] = []
        self.skipped: list[tuple[str, str]] = []
        self.bandwidth_bps: float | None = None
        self.deadline_t: float | None = None
        # where training stands
        self.step: int | None = None
        self.rate: float | None = None
        self.attempt = 0
        self._rate_window: list[tuple[float, int]] = []
        self._first_step = False
        self.lost: str | None = None
        self._stop = threading.Event()
        self._wake_logs = threading.Event()
        self._wake_ckpt = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- entry points -----------------------------------------------------------------------------
    def attach(self, session_dir: str | os.PathLike[str]) -> None:
        """Mirror this local session from its beginning; the agent's events so far go into it.
        Attaching another one (a multi-node job's next round) mirrors that one from then on."""
        with self._lock:
            self.session = Session(Path(session_dir))
            self._events_offset = 0
            self._session_mtime = None
            early, self._early_events = self._early_events, []
        if early:
            self.session.append_events(early)
        self.request()

    def note(self, text: str) -> None:
        """A line of the agent's own into the session's output (setup steps, notices)."""
        data = "".join(NOTE_PREFIX + line + "\n" for line in text.splitlines() or [""]).encode("utf-8", "replace")
        with self._lock:
            self._notes.append(data)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """Events of the agent's own (startup timings, notices, uploads) into the session's log."""
        stamped = [{"v": 1, "t": time.time(), "source": "agent", "machine": self.machine.get("id"), **e}
                   for e in events]
        with self._lock:
            session = self.session
            if session is None:
                self._early_events.extend(stamped)
                return
        session.append_events(stamped)

    def flush(self, timeout_s: float = 120.0) -> bool:
        """Everything so far in storage without stopping (before a new round of a multi-node
        job: its nodes fetch the checkpoint latest.json names): two passes of the logs (the
        second sees every event written before this call), then no checkpoint waiting."""
        end = time.monotonic() + timeout_s
        passes = self._log_passes
        while time.monotonic() < end and not self.lost:
            with self._lock:
                busy = bool(self._pending) or self._uploading
            if self._log_passes >= passes + 2 and not busy:
                return True
            self.request()
            time.sleep(0.05)
        return False

    def request(self) -> None:
        """Sync now rather than at the next interval."""
        self._wake_logs.set()
        self._wake_ckpt.set()

    def set_deadline(self, deadline_t: float | None) -> None:
        """The machine goes away at `deadline_t`: upload a checkpoint only if it fits before it."""
        self.deadline_t = deadline_t
        self.request()

    def start(self) -> None:
        for name, target in (("logs", self._logs_loop), ("checkpoints", self._checkpoint_loop)):
            thread = threading.Thread(target=target, name=f"trainctl-sync-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, *, status: str | None = None, timeout_s: float = 600.0) -> None:
        """Stop the threads, then the last pass: checkpoints still waiting (within `timeout_s`),
        events, output, session.json (with `status` when given) and the heartbeat."""
        if status is not None:
            self.status_override = status
        self._stop.set()
        self.request()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        self._threads.clear()
        if self.lost:
            return  # another writer owns the session: nothing more from this one
        end = time.monotonic() + timeout_s
        self._ckpt_backoff.succeeded()
        self.sync_logs()  # the last events name the last checkpoints
        while self._pending and not self.lost and time.monotonic() < end:
            if not self.upload_pending():
                time.sleep(max(0.0, min(self._ckpt_backoff.next_t - time.time(), end - time.monotonic())))
        with self._lock:
            early, self._early_events = self._early_events, []
        if early:  # no local session ever started (a setup failure): straight into storage
            self.events.append("".join(encode_event(e) + "\n" for e in early).encode())
        self._logs_backoff.succeeded()
        for _ in range(3):
            if self.sync_logs(force_session=True, beat=True):
                break
            time.sleep(1.0)

    # --- logs ---------------------------------------------------------------------------------------
    def _logs_loop(self) -> None:
        next_flush = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            woke = self._wake_logs.wait(max(0.0, min(OBSERVE_S, next_flush - time.monotonic())))
            self._wake_logs.clear()
            if self._stop.is_set() or self.lost:
                return
            if woke or time.monotonic() >= next_flush:
                if self._logs_backoff.ready(time.time()):
                    self.sync_logs()
                next_flush = time.monotonic() + self.interval_s
            else:
                # between uploads, only a look at the new events: a checkpoint starts up within a second
                self._observe(self._read_new_events())

    def _read_new_events(self) -> list[dict[str, Any]]:
        with self._lock:
            session, offset = self.session, self._events_offset
        if session is None:
            return []
        try:
            with open(session.events_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next pass
        if not complete:
            return []
        with self._lock:
            if self.session is not session:  # attached to another session meanwhile: read that one next
                return []
            self._events_offset = offset + len(complete)
        self.events.append(complete)
        events = []
        for line in complete.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def _observe(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event.get("kind")
            if kind == "checkpoint" and isinstance(event.get("path"), str):
                with self._lock:
                    self._pending.append((Path(event["path"]), event))
                self._wake_ckpt.set()
            elif kind == "metric" and isinstance(event.get("step"), int):
                self._on_metric(event)
            elif kind == "status" and isinstance(event.get("attempt"), int):
                self.attempt = event["attempt"]

    def _on_metric(self, event: dict[str, Any]) -> None:
        step, t = event["step"], float(event.get("t") or time.time())
        self.step = step
        window = [(wt, ws) for wt, ws in self._rate_window if t - wt <= 60.0 and ws <= step]
        window.append((t, step))
        self._rate_window = window
        if len(window) > 1 and window[-1][0] > window[0][0]:
            self.rate = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
        if not self._first_step:
            self._first_step = True
            if self.on_first_step is not None:
                self.on_first_step(event)

    def sync_logs(self, *, force_session: bool = False, beat: bool = False) -> bool:
        """One pass of the logs side; False when an upload failed (tried again with backoff)."""
        try:
            self._observe(self._read_new_events())
            if self.session is not None:
                self.output.append_file(self.session.output_log)
            with self._lock:
                notes, self._notes = self._notes, []
            for data in notes:
                self.output.append(data)
            self.events.flush()
            self.output.flush()
            self._push_session(force=force_session)
            now = time.time()
            if beat or now - self._last_beat >= self.heartbeat_s:
                self._beat(final=self._stop.is_set())
                self._last_beat = now
        except (StorageError, OSError) as e:
            delay = self._logs_backoff.failed(time.time())
            if self._logs_backoff.failures == 1:
                self.note(f"sync of logs failed ({e}); retrying every {delay:g}s and more, nothing is lost")
            return False
        if self._logs_backoff.failures:
            self.note(f"sync of logs works again after {self._logs_backoff.failures} failure(s)")
        self._logs_backoff.succeeded()
        self._log_passes += 1
        return True

    def _push_session(self, *, force: bool) -> None:
        local: dict[str, Any] = {}
        if self.session is not None:
            try:
                st = os.stat(self.session.json_path)
                if st.st_mtime_ns == self._session_mtime and not force:
                    return
                local = json.loads(self.session.json_path.read_text(encoding="utf-8"))
                self._session_mtime = st.st_mtime_ns
            except (OSError, ValueError):
                if not force:
                    return
        elif not force:
            return
        key = self.remote.key(SESSION)
        for _ in range(3):
            record = {**{k: v for k, v in local.items() if k not in LOCAL_ONLY_FIELDS}, **self.base_record,
                      **{k: local[k] for k in MACHINE_FIELDS if k in local}}
            record["machine"] = {**self.machine, "session": local.get("id")}
            if self.session_id:
                record["id"] = self.session_id
            if self.status_override:
                record["status"] = self.status_override
            try:
                if self._session_etag is None:
                    info = self.remote.store.put_json(key, record)
                else:
                    info = self.remote.store.put_json(key, record, if_match=self._session_etag)
                self._session_etag = info.etag
                return
            except ConditionalWriteError:
                # the launcher changed its record (a stop request, a cost update): merge again
                self.base_record = self.remote.read_session() or self.base_record
                current = self.remote.store.head(key)
                self._session_etag = current.etag if current else None
        self._session_mtime = None  # still changing under us: the next pass tries again

    def _beat(self, *, final: bool) -> None:
        fields = {"step": self.step, "rate": self.rate, "attempt": self.attempt,
                  "machine": self.machine.get("id"), "uploaded": len(self.uploaded),
                  "latest": self.uploaded[-1]["file"] if self.uploaded else None}
        if self.lease is not None:
            if not self.lease.check():
                self._lose("a newer lease was taken: another machine owns this session")
                return
            if final:
                self.lease.release(**fields)
            else:
                self.lease.beat(**fields)
        else:
            self.remote.heartbeat(**fields)

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            self._stop.set()
            self._wake_ckpt.set()
            self._wake_logs.set()
            if self.on_lost is not None:
                self.on_lost(why)

    # --- checkpoints -------------------------------------------------------------------------------
    def _checkpoint_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_ckpt.wait(self.interval_s)
            self._wake_ckpt.clear()
            if self._stop.is_set():
                return
            if self._ckpt_backoff.ready(time.time()):
                self.upload_pending()

    def upload_pending(self) -> bool:
        """Upload the newest checkpoint waiting (older ones waiting are superseded). False when
        an upload failed and waits for its backoff."""
        try:
            return self._upload_newest()
        finally:
            self._uploading = False

    def _upload_newest(self) -> bool:
        with self._lock:
            if not self._pending:
                return True
            path, event = self._pending[-1]
            superseded, self._pending = self._pending[:-1], []
            self._uploading = True
        for old, _ in superseded:
            self.skipped.append((old.name, "superseded by a newer checkpoint before its upload"))
        try:
            done = self._upload(path, event)
        except ConditionalWriteError as e:
            self._lose(f"latest.json was moved by another writer ({e})")
            return False
        except (StorageError, OSError) as e:
            with self._lock:  # keep it, unless a newer one arrived meanwhile
                if not self._pending:
                    self._pending.append((path, event))
            delay = self._ckpt_backoff.failed(time.time())
            self.add_events([{"kind": "warning", "message": f"upload of checkpoint {path.name} failed ({e}); "
                                                             f"retrying in {delay:g}s"}])
            return False
        self._ckpt_backoff.succeeded()
        return done

    def _upload(self, path: Path, event: dict[str, Any]) -> bool:
        from .. import checkpoint

        if self.lease is not None and not self.lease.check():
            self._lose("a newer lease was taken: another machine owns this session")
            return False
        manifest = checkpoint.read_manifest(path)
        if manifest is None or not path.exists():
            self.skipped.append((path.name, "gone or without a manifest (removed by retention?)"))
            return True
        result = checkpoint.verify(path)
        if not result.ok:
            self.skipped.append((path.name, f"failed verification: {result.reason}"))
            self.add_events([{"kind": "warning", "message": f"checkpoint {path.name} not uploaded: "
                                                             f"it failed verification ({result.reason})"}])
            return True
        size = int(manifest["bytes"])
        if self.deadline_t is not None and self.bandwidth_bps:
            needed = size / self.bandwidth_bps
            left = self.deadline_t - time.time() - UPLOAD_MARGIN_S
            if needed > left:
                why = (f"{size / 1e6:.0f} MB at {self.bandwidth_bps / 1e6:.1f} MB/s needs {needed:.0f}s; "
                       f"{max(0.0, left):.0f}s left before the machine goes")
                self.skipped.append((path.name, why))
                self.add_events([{"kind": "sync", "what": "checkpoint", "file": path.name, "uploaded": False,
                                  "reason": why}])
                return True
        started = time.monotonic()
        latest = self.remote.push_checkpoint(path, manifest)
        seconds = max(time.monotonic() - started, 1e-6)
        bps = size / seconds
        self.bandwidth_bps = bps if self.bandwidth_bps is None else 0.5 * self.bandwidth_bps + 0.5 * bps
        self.uploaded.append(latest)
        self.add_events([{"kind": "sync", "what": "checkpoint", "file": path.name, "uploaded": True,
                          "bytes": size, "seconds": round(seconds, 3), "step": latest.get("step")}])
        self._apply_retention(latest)
        return True

    def _apply_retention(self, latest: dict[str, Any]) -> None:
        """The project's retention on the bucket copy; latest.json's checkpoint always stays."""
        settings = {k: v for k, v in self.retention.items() if v}
        if not any(settings.get(k) for k in ("keep_last_n", "keep_best_k", "max_total_bytes")):
            return
        from ..checkpoint import CheckpointInfo, plan_retention

        infos = []
        for manifest in self.remote.checkpoints():
            meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
            name = manifest.get("file")
            if not isinstance(name, str):
                continue
            infos.append(CheckpointInfo(
                path=Path(name), kind="trainctl", status="valid", epoch=meta.get("epoch"), step=meta.get("step"),
                metrics=meta.get("metrics") or {}, bytes=int(manifest.get("bytes") or 0),
                saved_at=meta.get("saved_at"), mtime=float(meta.get("saved_at") or 0.0), meta=meta))
        plan = plan_retention(infos, protected=[latest["file"]], **self.retention)
        removed = []
        for info in plan:
            if info.path.name == latest["file"]:
                continue
            self.remote.delete_checkpoint(info.path.name)
            removed.append(info.path.name)
        if removed:
            self.add_events([{"kind": "sync", "what": "retention", "removed": removed}])


def _local_machine() -> dict[str, Any]:
    from .. import sysinfo

    return {"id": sysinfo.host(), "host": sysinfo.host(), "backend": "local", "pid": os.getpid()}


def _open_remote(session: Session, storage: str, *, project: str, cfg: Any) -> RemoteSession:
    from ..storage import open_store
    from ..storage.uri import parse_uri

    uri = parse_uri(storage).join(project, session.id)
    return RemoteSession(open_store(uri, endpoint_url=cfg.get("cloud", "endpoint_url") or None,
                                    region=cfg.get("cloud", "region") or None,
                                    checksums=cfg.get("cloud", "checksums")))


def claim_sync(session: Session, storage: str, *, project: str, cfg: Any, lease_ttl_s: float = 120.0) -> int:
    """Take the session's lease in storage for a local run that will be synced (one writer),
    where an error can be seen: a detached run claims it in the foreground and its background
    process syncs under that lease (`synced(..., lease_term=)`). The lease's term."""
    from .lease import LeaseLostError

    remote = _open_remote(session, storage, project=project, cfg=cfg)
    lease = Lease(remote, ttl_s=lease_ttl_s, machine=_local_machine()["id"])
    try:
        term = lease.acquire(wait_s=0)
    except LeaseLostError as e:
        raise LeaseLostError(str(e), "Another process writes this session in storage; sync to another URI.") from e
    session.update(storage=remote.uri)
    return term


@contextmanager
def synced(session: Session, storage: str, *, project: str, cfg: Any, interval_s: float = SYNC_INTERVAL_S,
           heartbeat_s: float = HEARTBEAT_S, lease_ttl_s: float = 120.0,
           lease_term: int | None = None) -> Iterator[SyncLoop]:
    """A local run mirrored to `<storage>/<project>/<session id>/` while the block runs
    (`trainctl local --sync`): the session's lease first (one writer; `lease_term` when
    `claim_sync` took it already), the last pass at the end."""
    from ..checkpoint import retention_settings

    if lease_term is None:
        lease_term = claim_sync(session, storage, project=project, cfg=cfg, lease_ttl_s=lease_ttl_s)
    remote = _open_remote(session, storage, project=project, cfg=cfg)
    machine = _local_machine()
    lease = Lease(remote, ttl_s=lease_ttl_s, machine=machine["id"])
    lease.term = lease_term
    loop = SyncLoop(remote, lease=lease, interval_s=interval_s, heartbeat_s=heartbeat_s,
                    retention=retention_settings(cfg), machine=machine, session_id=session.id)
    loop.attach(session.dir)
    loop.start()
    try:
        yield loop
    finally:
        loop.close()
