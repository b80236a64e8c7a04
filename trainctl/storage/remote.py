"""A session in object storage: the layout, the order of writes, and the readers.

    <session URI>/
      code/bundle.tar.gz  code/bundle.json  code/trainctl-<version>-py3-none-any.whl
      session.json                      what the session is (rewritten whole)
      events/000000.jsonl ...           the events log as numbered segments
      output/000000.log ...             the script's output as numbered segments
      checkpoints/<file>  checkpoints/<file>.json
      latest.json                       the newest checkpoint that is fully uploaded and verified
      heartbeat.json                    the writer is alive: time, attempt, step, rate
      leases/000000.json ...            one per attempt, created only if absent
      boots.json                        how many times a machine booted for this session
      ended.json                        the tombstone: the session is over, nothing restarts it

S3 objects cannot be appended, so a log goes up as segments: the current segment is rewritten
whole on each flush (an overwrite is atomic) and a new one starts every `SEGMENT_BYTES` (8 MB)
or `SEGMENT_AGE_S` (10 minutes), keeping the object count low; readers concatenate and drop a
torn last line.

Order is the contract (`push_checkpoint`): the checkpoint is uploaded and verified, then its
manifest, then `latest.json` moves with a conditional write against the version this writer
last saw. A reader that follows `latest.json` never meets a half-uploaded file, and a second
writer cannot move it behind the first one's back. This module works on files and dicts only:
no engine, no torch.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrainctlWarning, UsageError
from ..fsutil import atomic_write_bytes, atomic_write_json
from .base import ObjectInfo, Store, check_key
from .errors import ConditionalWriteError, IntegrityError, ObjectNotFoundError

LAYOUT_VERSION = 1
SEGMENT_BYTES = 8 << 20
SEGMENT_AGE_S = 600.0
EVENTS = "events/"
OUTPUT = "output/"
CHECKPOINTS = "checkpoints/"
LEASES = "leases/"
CODE = "code/"
CODE_ARCHIVE = "code/bundle.tar.gz"
CODE_RECORD = "code/bundle.json"
SESSION = "session.json"
LATEST = "latest.json"
HEARTBEAT = "heartbeat.json"
HEAD = "nodes/head.json"  # a multi-node job: where its head (node 0) hosts the rendezvous
BOOTS = "boots.json"
ENDED = "ended.json"
PULL_STATE = ".pull-state.json"
_SEGMENT_RE = re.compile(r"^(\d{6,})(\.[a-z]+)$")


def _segment_index(key: str, prefix: str, suffix: str) -> int | None:
    m = _SEGMENT_RE.match(key[len(prefix):]) if key.startswith(prefix) else None
    return int(m.group(1)) if m and m.group(2) == suffix else None


class SegmentWriter:
    """Appends to a log kept as numbered objects `<prefix><index:06d><suffix>`.

    `append` buffers; `flush` rewrites the current segment whole and, once it holds
    `max_bytes` or is `max_age_s` old, seals it (cut after its last newline where there is one)
    and starts the next. A new writer on an existing log starts after its last segment, so
    what an earlier writer sealed or left is never rewritten.
    """

    def __init__(self, store: Store, prefix: str, suffix: str, *, max_bytes: int = SEGMENT_BYTES,
                 max_age_s: float = SEGMENT_AGE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.prefix, self.suffix = store, prefix, suffix
        self.max_bytes, self.max_age_s, self.clock = max_bytes, max_age_s, clock
        self.index: int | None = None
        self.buffer = bytearray()
        self.started_at: float | None = None
        self._dirty = False
        self._tails: dict[str, int] = {}

    def key(self, index: int) -> str:
        return f"{self.prefix}{index:06d}{self.suffix}"

    def append(self, data: bytes) -> None:
        if data:
            if self.started_at is None:
                self.started_at = self.clock()
            self.buffer += data
            self._dirty = True

    def append_file(self, path: str | os.PathLike[str]) -> int:
        """Append what `path` gained since the last call (a local log the script writes);
        a file that shrank was replaced and is read from its start. Returns the bytes added."""
        key = os.fspath(path)
        offset = self._tails.get(key, 0)
        try:
            with open(key, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:
                    offset = 0
                f.seek(offset)
                data = f.read(size - offset)
        except FileNotFoundError:
            return 0
        self._tails[key] = offset + len(data)
        self.append(data)
        return len(data)

    def flush(self) -> list[ObjectInfo]:
        """Upload what changed; returns the segments written (none when nothing changed)."""
        if not self._dirty:
            return []
        if self.index is None:
            taken = [i for i in (_segment_index(o.key, self.prefix, self.suffix)
                                 for o in self.store.list(self.prefix)) if i is not None]
            self.index = max(taken) + 1 if taken else 0
        written = []
        while len(self.buffer) > self.max_bytes:
            cut = self.buffer.rfind(b"\n", 0, self.max_bytes) + 1 or self.max_bytes
            written.append(self.store.put_bytes(self.key(self.index), bytes(self.buffer[:cut])))
            del self.buffer[:cut]
            self.index += 1
            self.started_at = self.clock()
        if self.buffer:
            written.append(self.store.put_bytes(self.key(self.index), bytes(self.buffer)))
        self._dirty = False
        old = self.started_at is not None and self.clock() - self.started_at >= self.max_age_s
        if self.buffer and (len(self.buffer) >= self.max_bytes or old):
            self.buffer.clear()
            self.index += 1
            self.started_at = None
        return written


class SegmentReader:
    """Reads a segmented log incrementally: each `poll` returns the bytes that appeared since
    the previous one (for `--follow`), fetching only segments whose etag changed."""

    def __init__(self, store: Store, prefix: str, suffix: str) -> None:
        self.store, self.prefix, self.suffix = store, prefix, suffix
        self.index = 0  # the segment being read
        self.offset = 0  # bytes of it already returned
        self.etag: str | None = None

    def poll(self) -> bytes:
        segments = sorted((i, o) for o in self.store.list(self.prefix)
                          if (i := _segment_index(o.key, self.prefix, self.suffix)) is not None)
        out = bytearray()
        for index, info in segments:
            if index < self.index or (index == self.index and info.etag == self.etag):
                continue
            if index > self.index:
                self.index, self.offset = index, 0
            try:
                data, info = self.store.get_bytes(info.key)
            except ObjectNotFoundError:
                continue  # removed between the listing and the read
            out += data[self.offset:]
            self.offset, self.etag = len(data), info.etag
        return bytes(out)


def parse_jsonl(data: bytes, *, where: str = "events") -> list[dict[str, Any]]:
    """Events from JSON lines; a torn last line (a writer caught mid-line) is dropped, other
    unreadable lines are skipped with one warning."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    events, bad = [], 0
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number == len(lines) - 1 and not data.endswith(b"\n"):
                break  # torn last line
            bad += 1
            continue
        if isinstance(event, dict):
            events.append(event)
        else:
            bad += 1
    if bad:
        warnings.warn(f"{where}: skipped {bad} malformed line(s)", TrainctlWarning, stacklevel=3)
    return events


def _local_manifest(data: bytes) -> bytes:
    """A stored manifest as the checkpoint's own: without the record of where it was stored
    (the manifest covers itself with a digest, which that record would break)."""
    try:
        manifest = json.loads(data)
    except ValueError:
        return data
    if not isinstance(manifest, dict) or "storage" not in manifest:
        return data
    manifest.pop("storage")
    return json.dumps(manifest, indent=1, default=str).encode() + b"\n"


@dataclass
class PullResult:
    """What `RemoteSession.pull` fetched into the local folder."""

    downloaded: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)  # checkpoints (and code) left remote


class RemoteSession:
    """One session's objects in a store (all keys below `prefix`, '' for the store's root).

    Writers call `acquire_lease` first; `push_checkpoint` keeps the upload order; readers use
    `read_events`, `read_output`, `latest_checkpoint` and `pull`.
    """

    def __init__(self, store: Store, prefix: str = "") -> None:
        self.store = store
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if self.prefix:
            check_key(self.prefix.rstrip("/"))
        self._latest_etag: str | None = None

    def key(self, name: str) -> str:
        return self.prefix + name

    @property
    def uri(self) -> str:
        return self.store.url(self.prefix.rstrip("/")) if self.prefix else self.store.uri

    # --- session record, heartbeat --------------------------------------------------------------
    def write_session(self, record: dict[str, Any]) -> ObjectInfo:
        return self.store.put_json(self.key(SESSION), record)

    def read_session(self) -> dict[str, Any] | None:
        return self._get_json(SESSION)

    def heartbeat(self, *, attempt: int, step: int | None = None, rate: float | None = None,
                  **fields: Any) -> ObjectInfo:
        """`heartbeat.json`: the writer is alive (every ~30 s), where training stands."""
        record = {"v": LAYOUT_VERSION, "t": time.time(), "attempt": attempt, "step": step, "rate": rate,
                  "host": socket.gethostname(), "pid": os.getpid(), **fields}
        return self.store.put_json(self.key(HEARTBEAT), record)

    def read_heartbeat(self) -> dict[str, Any] | None:
        return self._get_json(HEARTBEAT)

    # --- a multi-node job's head ----------------------------------------------------------------
    def publish_head(self, *, attempt: int, address: str, port: int, **fields: Any) -> ObjectInfo:
        """`nodes/head.json`: where node 0 (the head) of this attempt hosts the rendezvous; the
        other nodes' agents wait for it rather than guess an address."""
        record = {"v": LAYOUT_VERSION, "t": time.time(), "attempt": attempt, "address": address, "port": port,
                  **fields}
        return self.store.put_json(self.key(HEAD), record)

    def read_head(self) -> dict[str, Any] | None:
        return self._get_json(HEAD)

    def check_in(self, node_rank: int, *, attempt: int, job_round: int, **fields: Any) -> ObjectInfo:
        """`nodes/<rank>.json`: this node is up for `round` of the head's job (the head starts a
        round once every node checked in for it)."""
        record = {"v": LAYOUT_VERSION, "t": time.time(), "node_rank": node_rank, "attempt": attempt,
                  "round": job_round, **fields}
        return self.store.put_json(self.key(f"nodes/{int(node_rank)}.json"), record)

    def read_check_in(self, node_rank: int) -> dict[str, Any] | None:
        found = self._get_json(f"nodes/{int(node_rank)}.json")
        return found if isinstance(found, dict) else None

    def _get_json(self, name: str) -> Any:
        try:
            return self.store.get_json(self.key(name))
        except ObjectNotFoundError:
            return None

    # --- code --------------------------------------------------------------------------------
    def put_code(self, bundle: Any, wheel: str | os.PathLike[str] | None = None, *,
                 run: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload the code bundle (a `bundle.Bundle`) and a wheel of trainctl, then
        `code/bundle.json` naming both with their digests, written last: a machine that finds
        the record never meets a half-uploaded bundle. `run` (script, args, options) goes into
        the record for an agent started without a script. Returns the record."""
        archive = self.store.put_file(self.key(CODE_ARCHIVE), bundle.path, sha256=bundle.sha256)
        record: dict[str, Any] = {
            "v": LAYOUT_VERSION, "t": time.time(),
            "bundle": {"key": CODE_ARCHIVE, "sha256": archive.sha256, "bytes": archive.size},
            "summary": bundle.summary(), "wheel": None, "run": run}
        if wheel is not None:
            wheel = Path(wheel)
            name = check_key(wheel.name)
            stored = self.store.put_file(self.key(CODE + name), wheel)
            record["wheel"] = {"key": CODE + name, "file": name, "sha256": stored.sha256, "bytes": stored.size}
        self.store.put_json(self.key(CODE_RECORD), record)
        return record

    def code_record(self) -> dict[str, Any] | None:
        return self._get_json(CODE_RECORD)

    def fetch_code(self, dest_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Path, Path | None]:
        """Download the bundle (and the wheel, when there is one) into `dest_dir`, each verified
        against the digest `code/bundle.json` recorded. Returns (record, archive, wheel)."""
        record = self.code_record()
        if not isinstance(record, dict) or not isinstance(record.get("bundle"), dict):
            raise ObjectNotFoundError(f"{self.uri} has no code bundle ({CODE_RECORD} is missing).",
                                      "Upload the project before starting a machine (the launcher does it).",
                                      uri=self.store.url(self.key(CODE_RECORD)))
        dest = Path(dest_dir)
        bundle = record["bundle"]
        archive = dest / "bundle.tar.gz"
        self.store.get_file(self.key(check_key(bundle["key"])), archive, sha256=bundle.get("sha256"))
        wheel_path = None
        wheel = record.get("wheel")
        if isinstance(wheel, dict):
            wheel_path = dest / check_key(wheel["file"])
            self.store.get_file(self.key(check_key(wheel["key"])), wheel_path, sha256=wheel.get("sha256"))
        return record, archive, wheel_path

    # --- logs --------------------------------------------------------------------------------
    def events_writer(self, **kw: Any) -> SegmentWriter:
        return SegmentWriter(self.store, self.key(EVENTS), ".jsonl", **kw)

    def output_writer(self, **kw: Any) -> SegmentWriter:
        return SegmentWriter(self.store, self.key(OUTPUT), ".log", **kw)

    def events_reader(self) -> SegmentReader:
        return SegmentReader(self.store, self.key(EVENTS), ".jsonl")

    def output_reader(self) -> SegmentReader:
        return SegmentReader(self.store, self.key(OUTPUT), ".log")

    def read_events(self) -> list[dict[str, Any]]:
        """Every event, in order (segments concatenated; a torn last line dropped)."""
        return parse_jsonl(self.events_reader().poll(), where=self.store.url(self.key(EVENTS)))

    def read_output(self) -> str:
        return self.output_reader().poll().decode("utf-8", errors="replace")

    # --- checkpoints ---------------------------------------------------------------------------
    def push_checkpoint(self, path: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
        """Upload a checkpoint in the order readers rely on: the file (verified), then its
        manifest, then `latest.json` (conditional). Returns the new `latest.json` record.

        The file must match `manifest["bytes"]`, and a ``sha256:`` digest when the manifest has
        one; other digest kinds (trainctl's ``zipcrc:``) are the runtime's to check before this
        call (`trainctl.checkpoint.verify`). Raises ConditionalWriteError when another writer
        moved `latest.json` since this one last did: this writer no longer owns the session.
        """
        path = Path(path)
        name = path.name
        key = self.key(CHECKPOINTS + check_key(name))
        if name.endswith(".json"):  # that name is its manifest's
            raise UsageError(f"Checkpoint file name {name!r} cannot be stored.", "Name it like 'ckpt-step100.pt'.")
        size = path.stat().st_size
        if "bytes" in manifest and manifest["bytes"] != size:
            raise IntegrityError(f"{path} is {size} bytes; its manifest says {manifest['bytes']}.",
                                 "The checkpoint is incomplete or was changed; it is not uploaded.", uri=str(path))
        digest = manifest.get("digest")
        expected = digest if isinstance(digest, str) and digest.startswith("sha256:") else None
        stored = self.store.put_file(key, path, sha256=expected)
        remote_manifest = {**manifest, "storage": {"key": key, "bytes": stored.size, "sha256": stored.sha256,
                                                   "etag": stored.etag}}
        self.store.put_json(key + ".json", remote_manifest)
        meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
        latest = {"v": LAYOUT_VERSION, "checkpoint": key, "manifest": key + ".json", "file": name,
                  "bytes": stored.size, "sha256": stored.sha256, "step": meta.get("step", manifest.get("step")),
                  "epoch": meta.get("epoch", manifest.get("epoch")), "t": time.time()}
        self._move_latest(latest)
        return latest

    def _move_latest(self, record: dict[str, Any]) -> None:
        if self._latest_etag is None:
            try:
                _, current = self.store.get_json_versioned(self.key(LATEST))
            except ObjectNotFoundError:
                current = None
            info = (self.store.put_json(self.key(LATEST), record, if_none_match="*") if current is None
                    else self.store.put_json(self.key(LATEST), record, if_match=current.etag))
        else:
            info = self.store.put_json(self.key(LATEST), record, if_match=self._latest_etag)
        self._latest_etag = info.etag

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """`latest.json`: the newest checkpoint whose upload completed and verified."""
        return self._get_json(LATEST)

    def checkpoints(self) -> list[dict[str, Any]]:
        """The manifests of the checkpoints stored, oldest key first."""
        out = []
        for info in self.store.list(self.key(CHECKPOINTS)):
            if info.key.endswith(".json"):
                try:
                    out.append(self.store.get_json(info.key))
                except (ObjectNotFoundError, IntegrityError):
                    continue
        return out

    def fetch_checkpoint(self, dest_dir: str | os.PathLike[str], latest: dict[str, Any] | None = None) -> Path:
        """Download the checkpoint `latest.json` names (and its manifest) into `dest_dir`,
        verified against the digest recorded at upload."""
        latest = latest or self.latest_checkpoint()
        if latest is None:
            raise ObjectNotFoundError(f"{self.uri} has no {LATEST}: no checkpoint was fully uploaded.",
                                      "Start without resuming.", uri=self.store.url(self.key(LATEST)))
        dest = Path(dest_dir) / latest["file"]
        self.store.get_file(latest["checkpoint"], dest, sha256=latest.get("sha256"))
        manifest = self.store.get_json(latest["manifest"])
        manifest.pop("storage", None)
        atomic_write_json(dest.with_name(dest.name + ".json"), manifest)
        return dest

    def delete_checkpoint(self, name: str) -> None:
        """Remove a stored checkpoint (retention): manifest first, so it is never listed without
        its file; refused for the one `latest.json` points to."""
        key = self.key(CHECKPOINTS + check_key(name))
        latest = self.latest_checkpoint()
        if latest and latest.get("checkpoint") == key:
            raise UsageError(f"{self.store.url(key)} is the checkpoint latest.json points to.",
                             "Keep it; push a newer checkpoint first.")
        self.store.delete(key + ".json")
        self.store.delete(key)

    # --- one writer: leases, boots, the end --------------------------------------------------------
    def acquire_lease(self, attempt: int, **owner: Any) -> dict[str, Any]:
        """Create `leases/<attempt>.json` only if no one has: the writer of this attempt.
        ConditionalWriteError when another process took it first."""
        if not isinstance(attempt, int) or attempt < 0:
            raise UsageError(f"attempt={attempt!r} is not a non-negative integer.", "Pass TRAIN_OPS_ATTEMPT's value.")
        record = {"v": LAYOUT_VERSION, "attempt": attempt, "t": time.time(), "host": socket.gethostname(),
                  "pid": os.getpid(), **owner}
        self.store.put_json(self.key(f"{LEASES}{attempt:06d}.json"), record, if_none_match="*")
        return record

    def current_lease(self) -> dict[str, Any] | None:
        """The lease of the newest attempt, or None."""
        leases = self.store.list(self.key(LEASES))
        for info in reversed(leases):
            try:
                return self.store.get_json(info.key)
            except ObjectNotFoundError:
                continue
        return None

    def count_boot(self, **fields: Any) -> int:
        """Add one to the boot counter (compare-and-swap, retried on a lost race); returns it."""
        for _ in range(20):
            try:
                current, info = self.store.get_json_versioned(self.key(BOOTS))
            except ObjectNotFoundError:
                current, info = None, None
            kept = current if isinstance(current, dict) else {}
            count = int(kept.get("count", 0)) + 1
            history = list(kept.get("boots", []))[-19:]
            record = {**kept, "v": LAYOUT_VERSION, "count": count,
                      "boots": [*history, {"boot": count, "t": time.time(), "host": socket.gethostname(), **fields}]}
            try:
                if info is None:
                    self.store.put_json(self.key(BOOTS), record, if_none_match="*")
                else:
                    self.store.put_json(self.key(BOOTS), record, if_match=info.etag)
                return count
            except ConditionalWriteError:
                time.sleep(0.05)
        raise ConditionalWriteError(f"{self.store.url(self.key(BOOTS))} kept changing under 20 updates.",
                                    "Too many machines are booting for one session; end the session.")

    def boots(self) -> int:
        record = self._get_json(BOOTS)
        return int(record.get("count", 0)) if isinstance(record, dict) else 0

    def mark_boot_healthy(self, boot: int) -> None:
        """Boot number `boot` got training going (or ended cleanly): boots before it no longer
        count as failed. Compare-and-swap; a later healthy boot is never moved back."""
        for _ in range(20):
            try:
                current, info = self.store.get_json_versioned(self.key(BOOTS))
            except ObjectNotFoundError:
                current, info = {}, None
            current = current if isinstance(current, dict) else {}
            if int(current.get("healthy", 0) or 0) >= boot:
                return
            record = {**current, "v": LAYOUT_VERSION, "healthy": boot}
            try:
                if info is None:
                    self.store.put_json(self.key(BOOTS), record, if_none_match="*")
                else:
                    self.store.put_json(self.key(BOOTS), record, if_match=info.etag)
                return
            except ConditionalWriteError:
                time.sleep(0.05)
        raise ConditionalWriteError(f"{self.store.url(self.key(BOOTS))} kept changing under 20 updates.",
                                    "Too many machines are booting for one session; end the session.")

    def failed_boots(self, boot: int) -> int:
        """How many boots before `boot` came after the last healthy one (none got training going)."""
        record = self._get_json(BOOTS)
        healthy = int(record.get("healthy", 0) or 0) if isinstance(record, dict) else 0
        return max(0, boot - 1 - healthy)

    def mark_ended(self, reason: str, **fields: Any) -> tuple[dict[str, Any], bool]:
        """Write the tombstone if there is none; returns (the tombstone that stands, whether
        this call wrote it). The first end wins: nothing restarts an ended session."""
        record = {"v": LAYOUT_VERSION, "reason": reason, "t": time.time(), "host": socket.gethostname(), **fields}
        try:
            self.store.put_json(self.key(ENDED), record, if_none_match="*")
            return record, True
        except ConditionalWriteError:
            return self.ended() or record, False

    def ended(self) -> dict[str, Any] | None:
        return self._get_json(ENDED)

    # --- mirroring -----------------------------------------------------------------------------
    def pull(self, dest_dir: str | os.PathLike[str], *, checkpoints: bool = False,
             code: bool = False) -> PullResult:
        """Mirror the session into `dest_dir` incrementally (objects whose etag changed since
        the last pull), then assemble `events.jsonl` and `output.log` from the segments.
        Checkpoint files (not their manifests) and `code/` are fetched only when asked."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        state_path = dest / PULL_STATE
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        result = PullResult()
        logs_changed = False
        for info in self.store.list(self.prefix):
            name = info.key[len(self.prefix):]
            try:
                check_key(name)  # a key written by something else must not lead out of dest
            except UsageError:
                result.skipped.append(name)
                continue
            is_checkpoint_file = name.startswith(CHECKPOINTS) and not name.endswith(".json")
            if (is_checkpoint_file and not checkpoints) or (name.startswith(CODE) and not code):
                result.skipped.append(name)
                continue
            local = dest / name
            if state.get(name) == info.etag and local.exists():
                result.unchanged += 1
                continue
            try:
                if info.size > SEGMENT_BYTES * 2:
                    info = self.store.get_file(info.key, local)
                else:
                    data, info = self.store.get_bytes(info.key)
                    local.parent.mkdir(parents=True, exist_ok=True)
                    if name.startswith(CHECKPOINTS) and name.endswith(".json"):
                        data = _local_manifest(data)
                    atomic_write_bytes(local, data, sync_dir=False)
            except ObjectNotFoundError:
                continue  # deleted between the listing and the read (retention, a probe)
            state[name] = info.etag
            result.downloaded.append(name)
            logs_changed |= name.startswith((EVENTS, OUTPUT))
        if logs_changed or not (dest / "events.jsonl").exists():
            for folder, suffix, target in ((EVENTS, ".jsonl", "events.jsonl"), (OUTPUT, ".log", "output.log")):
                parts = sorted((i, p) for p in (dest / folder).glob(f"*{suffix}")
                               if (i := _segment_index(folder + p.name, folder, suffix)) is not None)
                atomic_write_bytes(dest / target, b"".join(p.read_bytes() for _, p in parts), sync_dir=False)
        atomic_write_json(state_path, state, sync_dir=False)
        return result
