"""`LocalStore`: the storage interface over a folder (tests, a shared filesystem).

Objects are plain files under the folder, so people and tools can read them directly. trainctl's
record of each (size, sha256, etag, and the inode and mtime it describes) is a JSON file under
`.trainctl-meta/`, written after the object is in place; a record that no longer describes the
file (a crash between the two writes, a file changed by hand) is ignored, and the object reads
as a foreign one (no digest). Writes go to a temp file beside the target, fsync, `os.replace`,
fsync of the folder. Conditional writes hold a per-key lock (`fcntl.flock`, filelock elsewhere)
around check-and-replace, so two writers race exactly as they would on S3: one wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..fsutil import atomic_write_json, fsync_dir, temp_beside
from .base import (
    CHUNK_BYTES,
    DIGEST_PREFIX,
    ObjectInfo,
    Store,
    check_conditions,
    check_digest,
    check_key,
    check_prefix,
    same_etag,
    sha256_bytes,
)
from .errors import ConditionalWriteError, IntegrityError, ObjectNotFoundError, StorageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

META_DIR = ".trainctl-meta"
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # fsutil.temp_beside's names


class LocalStore(Store):
    """Objects as files under `root` (created on the first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = self.root.as_uri()

    # --- paths ---------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == META_DIR:
            from ..errors import UsageError

            raise UsageError(f"Storage key {key!r} is reserved.", f"Keys may not start with '{META_DIR}/'.")
        return self.root / key

    def _meta_path(self, key: str) -> Path:
        return self.root / META_DIR / (key + ".json")

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        lock = self.root / META_DIR / (key + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows
            from filelock import FileLock

            with FileLock(str(lock)):
                yield
            return
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # --- records -------------------------------------------------------------------------------
    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        """The object's info from its record when the record describes this very file."""
        try:
            record = json.loads(self._meta_path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if (isinstance(record, dict) and record.get("size") == st.st_size
                and record.get("ino") == st.st_ino and record.get("mtime_ns") == st.st_mtime_ns):
            return ObjectInfo(key, st.st_size, record["etag"], record.get("sha256"), st.st_mtime)
        # a foreign or stale file: an etag that changes with every replace or edit, no digest
        return ObjectInfo(key, st.st_size, f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"', None,
                          st.st_mtime)

    def _commit(self, key: str, tmp: Path, digest: str) -> ObjectInfo:
        """Move a complete, fsynced temp file into place and record it (caller holds the lock)."""
        path = self._path(key)
        st = os.stat(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        etag = '"' + digest[len(DIGEST_PREFIX):][:32] + '"'
        meta = self._meta_path(key)
        meta.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta, {"size": st.st_size, "sha256": digest, "etag": etag, "ino": st.st_ino,
                                 "mtime_ns": st.st_mtime_ns})
        return ObjectInfo(key, st.st_size, etag, digest, st.st_mtime)

    def _stat(self, key: str) -> os.stat_result | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st if not os.path.isdir(self._path(key)) else None

    def _missing(self, key: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(f"No object {self.url(key)}.", "List what is there with the storage URI's folder.",
                                   uri=self.url(key))

    # --- the interface -------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo | None:
        st = self._stat(key)
        return None if st is None else self._info(key, st)

    def put_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        check_digest(sha256)
        dest = self._path(key)
        if not os.path.isfile(path):
            raise StorageError(f"Cannot upload {path}: not a file.", "Check the path.", uri=self.url(key))
        dest.parent.mkdir(parents=True, exist_ok=True)
        with temp_beside(dest) as tmp:
            digest = _copy_hashing(Path(path), tmp, expect=sha256, what=f"upload of {path} to {self.url(key)}")
            with self._lock(key):
                return self._commit(key, tmp, digest)

    def get_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        check_digest(sha256)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            src = open(self._path(key), "rb", buffering=0)  # noqa: SIM115 - closed below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(key) from None
        with src:
            info = self._info(key, os.fstat(src.fileno()))
            expected = [d for d in (info.sha256, sha256) if d]
            with temp_beside(dest) as tmp:
                digest = _copy_hashing(src, tmp, expect=None, what=f"download of {self.url(key)}")
                for want in expected:
                    if digest != want:
                        raise IntegrityError(
                            f"Download of {self.url(key)} does not match its digest ({digest[:19]}... != {want[:19]}...).",
                            "The stored object is damaged or was changed by something else; nothing was written to "
                            f"{dest}. Upload it again from a good copy.", uri=self.url(key))
                os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return ObjectInfo(key, info.size, info.etag, digest, info.modified_s)

    def put_bytes(self, key: str, data: bytes, *, if_none_match: str | None = None,
                  if_match: str | None = None) -> ObjectInfo:
        check_conditions(if_none_match, if_match)
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = sha256_bytes(data)
        with self._lock(key):
            current = self.head(key)
            if if_none_match == "*" and current is not None:
                raise ConditionalWriteError(f"{self.url(key)} already exists (create-only write).",
                                            "Another writer created it first.", uri=self.url(key),
                                            current_etag=current.etag)
            if if_match is not None and (current is None or not same_etag(current.etag, if_match)):
                raise ConditionalWriteError(
                    f"{self.url(key)} changed since it was read (expected etag {if_match}, found "
                    f"{current.etag if current else 'no object'}).",
                    "Another writer moved it; read it again before writing.", uri=self.url(key),
                    current_etag=current.etag if current else None)
            with temp_beside(dest) as tmp:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                return self._commit(key, tmp, digest)

    def get_bytes(self, key: str) -> tuple[bytes, ObjectInfo]:
        try:
            with open(self._path(key), "rb") as f:
                info = self._info(key, os.fstat(f.fileno()))
                data = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(key) from None
        if len(data) != info.size or (info.sha256 and sha256_bytes(data) != info.sha256):
            raise IntegrityError(f"{self.url(key)} does not match its recorded size or digest.",
                                 "The object is damaged or was changed by something else; write it again.",
                                 uri=self.url(key))
        return data, info

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        # walk only the folder the prefix names (its part up to the last '/')
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root / base if base else self.root
        found: list[ObjectInfo] = []
        for folder, dirs, files in os.walk(top):
            rel = Path(folder).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            dirs[:] = [d for d in dirs if not (rel == "" and d == META_DIR)]
            for name in files:
                key = rel + name
                if _TEMP_RE.match(name) or not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue  # deleted while listing
                info = self._info(key, st)
                # listings carry no digest (an S3 listing has no metadata): `head` has it
                found.append(ObjectInfo(key, info.size, info.etag, None, info.modified_s))
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._lock(key):
            for p in (path, self._meta_path(key)):
                try:
                    os.unlink(p)
                except (FileNotFoundError, NotADirectoryError):
                    pass
                except IsADirectoryError:
                    raise StorageError(f"{self.url(key)} is a folder, not an object.",
                                       "Delete the objects under it one by one.", uri=self.url(key)) from None
        # empty folders left behind have no meaning in an object store
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _copy_hashing(src: Path | object, tmp: Path, *, expect: str | None, what: str) -> str:
    """Copy `src` (a path or an open binary file) into the new file `tmp` while hashing the
    bytes, fsync, and check that the source did not change meanwhile; returns the digest."""
    own = isinstance(src, Path)
    f = open(src, "rb", buffering=0) if own else src  # noqa: SIM115 - closed below when owned
    try:
        before = os.fstat(f.fileno())  # type: ignore[union-attr]
        h = hashlib.sha256()
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb", buffering=0) as out:
            buf = bytearray(CHUNK_BYTES)
            view = memoryview(buf)
            while n := f.readinto(buf):  # type: ignore[union-attr]
                h.update(view[:n])
                out.write(view[:n])
                size += n
            os.fsync(out.fileno())
            written = os.fstat(out.fileno()).st_size
        after = os.fstat(f.fileno())  # type: ignore[union-attr]
    finally:
        if own:
            f.close()  # type: ignore[union-attr]
    digest = DIGEST_PREFIX + h.hexdigest()
    if size != before.st_size or written != size or after.st_mtime_ns != before.st_mtime_ns:
        raise IntegrityError(f"The {what} read {size} bytes of a {before.st_size}-byte file that changed meanwhile.",
                             "Something is still writing it; upload it once it is complete.")
    if expect is not None and digest != expect:
        raise IntegrityError(f"The {what} does not match the expected digest ({digest[:19]}... != {expect[:19]}...).",
                             "The file changed after its digest was taken; take it again from a complete file.")
    return digest
