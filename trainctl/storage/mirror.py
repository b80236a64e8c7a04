"""A remote session, read from the laptop: mirrored into the local session store, or followed.

`pull_session` copies a session from storage into `<state_dir>/sessions/<id>/` incrementally
(what changed since the last pull), then fixes up what only makes sense where it ran: the
checkpoint location points at the mirrored manifests (and files, with `checkpoints=True`), and
TensorBoard event files are rebuilt from the metrics, so `sessions show`, `monitor`, `plot`,
`checkpoint list` and `tensorboard` work on it as on a local run. `follow_output` streams the
output segments as they grow, until the session ends or its writer goes quiet; `RemoteView`
keeps a throwaway local copy of a session's record, events and output current from storage,
for readers of local sessions (`monitor`), without touching the project.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..fsutil import atomic_write_json
from .remote import PullResult, RemoteSession
from .uri import parse_uri

HEARTBEAT_STALE_S = 120.0
FOLLOW_POLL_S = 2.0
SESSION_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def looks_like_uri(ref: str) -> bool:
    """A storage URI or a folder path, not a session id (ids hold no '/')."""
    return "/" in ref or ref.startswith("~")


def remote_session(ref: str, cfg: Any) -> RemoteSession:
    """The remote session `ref` names: a storage URI of the session itself, or a session id
    under `[cloud] storage` for this project (`<storage>/<project>/<id>`)."""
    from . import open_store

    if looks_like_uri(ref):
        uri = parse_uri(ref)
    else:
        storage = cfg.get("cloud", "storage")
        if not storage:
            raise UsageError(f"'{ref}' is a session id, and no [cloud] storage is set to find it under.",
                             "Pass the session's URI (s3://bucket/prefix/project/ID), or set storage under [cloud] "
                             "in trainctl.toml.")
        if not set(ref) <= SESSION_ID_CHARS:
            raise UsageError(f"'{ref}' is not a session id.", "Pass an id like 20260101-120000-ab12cd, or a URI.")
        uri = parse_uri(storage).join(project_name(cfg), ref)
    store = open_store(uri, endpoint_url=cfg.get("cloud", "endpoint_url") or None,
                       region=cfg.get("cloud", "region") or None, checksums=cfg.get("cloud", "checksums"))
    return RemoteSession(store)


def remote_of(ref: str, cfg: Any) -> RemoteSession | None:
    """The remote session `ref` names: a storage URI (or folder), or a session pulled into this
    project from storage (read at its source); None for a session that lives here."""
    from ..errors import NotFoundError
    from ..session import SessionStore

    if looks_like_uri(ref):
        return remote_session(ref, cfg)
    try:
        data = SessionStore(cfg.state_dir).get(ref).read()
    except NotFoundError:
        return None
    if data.get("pulled_at") and isinstance(data.get("storage"), str):
        return remote_session(data["storage"], cfg)
    return None


def project_name(cfg: Any) -> str:
    """The project's name in storage: its root folder's name."""
    return Path(cfg.root).resolve().name or "project"


def session_id_of(remote: RemoteSession) -> str:
    record = remote.read_session() or {}
    found = record.get("id") if isinstance(record.get("id"), str) else None
    return found or remote.uri.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class Pulled:
    """What `pull_session` did: the local folder and the objects fetched."""

    session_id: str
    folder: Path
    result: PullResult
    exists: bool


def pull_session(remote: RemoteSession, state_dir: str | os.PathLike[str], *, checkpoints: bool = False) -> Pulled:
    """Mirror `remote` into the session store at `state_dir` (see the module docstring)."""
    session_id = session_id_of(remote)
    if not set(session_id) <= SESSION_ID_CHARS or session_id in (".", ".."):
        raise UsageError(f"The remote session's id {session_id!r} cannot name a folder.",
                         "Pull it by its URI into another project, or fix its session.json.")
    folder = Path(state_dir) / "sessions" / session_id
    existed = folder.exists()
    if existed and (folder / "session.json").exists() and not _read(folder / "session.json").get("pulled_at"):
        raise UsageError(f"Session {session_id} ran in this project: it is here already, not a copy to update.",
                         "Read it with trainctl sessions show; pull it into another project to compare.")
    result = remote.pull(folder, checkpoints=checkpoints)
    record = remote.read_session() if "session.json" in result.downloaded or not (folder / "session.json").exists() \
        else None
    if record is not None or not (folder / "session.json").exists():
        _write_record(folder, record or {}, session_id, remote)
    if any(name.startswith("events/") for name in result.downloaded) or not (folder / "tensorboard").exists():
        _rebuild_tensorboard(folder)
    return Pulled(session_id, folder, result, existed)


def _read(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(folder: Path, record: dict[str, Any], session_id: str, remote: RemoteSession) -> None:
    """session.json as a local reader needs it: the id, where the mirrored checkpoints are, and
    nothing that names processes of another machine."""
    data = {k: v for k, v in record.items() if k not in ("processes", "handle", "stop_request")}
    data.update(id=session_id, storage=remote.uri, pulled_at=time.time(),
                checkpoint_location=str(folder / "checkpoints"))
    data.setdefault("status", "pending")
    atomic_write_json(folder / "session.json", data, sync_dir=False)


def _rebuild_tensorboard(folder: Path) -> None:
    """TensorBoard event files from the mirrored metrics (storage keeps no event files)."""
    import shutil

    from ..session import Session
    from ..tensorboard_sink import TensorBoardSink

    target = folder / "tensorboard" / "pulled"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    metrics = Session(folder).metrics()
    if metrics:
        with TensorBoardSink(target) as sink:
            sink.write(metrics)


def follow_output(remote: RemoteSession, *, poll_s: float = FOLLOW_POLL_S,
                  stale_s: float = HEARTBEAT_STALE_S, say: Callable[[str], None] = lambda text: None,
                  clock: Callable[[], float] = time.time) -> Iterator[bytes]:
    """The session's output from its start, then what each poll adds; ends once the session
    ended (ended.json, or a released heartbeat) and the output is drained. A heartbeat older
    than `stale_s` is said once (the machine may be gone), and following goes on."""
    reader = remote.output_reader()
    warned = False
    while True:
        data = reader.poll()
        if data:
            yield data
        beat = remote.read_heartbeat() or {}
        finished = remote.ended() is not None or bool(beat.get("released"))
        if finished:
            rest = reader.poll()
            if rest:
                yield rest
            return
        last = beat.get("t")
        if isinstance(last, (int, float)) and clock() - last > stale_s and not warned:
            warned = True
            say(f"no heartbeat for {clock() - last:.0f}s: the machine may be gone (still following)")
        elif isinstance(last, (int, float)) and clock() - last <= stale_s:
            warned = False
        time.sleep(poll_s)


class RemoteView:
    """A remote session as a local session folder under `folder` (a temporary one: nothing in
    the project changes): `update()` copies its record, then what its event and output
    segments gained, so a reader that reads local sessions incrementally (`Monitor`) follows it.
    The record is read before the segments: once it says the session ended, the segments
    already hold everything (the writer uploads them first)."""

    def __init__(self, remote: RemoteSession, folder: str | os.PathLike[str]) -> None:
        from ..session import Session

        self.remote = remote
        session_id = session_id_of(remote)
        if not set(session_id) <= SESSION_ID_CHARS or session_id in (".", ".."):
            session_id = "remote"
        self.session = Session(Path(folder) / session_id)
        self.session.dir.mkdir(parents=True, exist_ok=True)
        self._events = remote.events_reader()
        self._output = remote.output_reader()
        self.heartbeat: dict[str, Any] = {}
        self.ended: dict[str, Any] | None = None

    def update(self) -> None:
        record = self.remote.read_session() or {}
        self.ended = self.remote.ended()
        beat = self.remote.read_heartbeat()
        self.heartbeat = beat if isinstance(beat, dict) else {}
        for reader, path in ((self._events, self.session.events_path), (self._output, self.session.output_log)):
            data = reader.poll()
            with open(path, "ab") as f:
                f.write(data)
        # what names another machine's processes means nothing here (its pids are not ours)
        data = {k: v for k, v in record.items() if k not in ("processes", "handle", "stop_request", "cwd")}
        data.update(id=self.session.id, storage=self.remote.uri, checkpoint_location=self.remote.uri + "/checkpoints")
        data.setdefault("status", "pending")
        atomic_write_json(self.session.json_path, data, sync_dir=False)

    @property
    def finished(self) -> bool:
        """Whether nothing more will come: the session ended, or its writer released it."""
        return self.ended is not None or bool(self.heartbeat.get("released"))

    def heartbeat_age_s(self, now: float | None = None) -> float | None:
        last = self.heartbeat.get("t")
        if not isinstance(last, (int, float)) or isinstance(last, bool):
            return None
        return max(0.0, (time.time() if now is None else now) - last)
