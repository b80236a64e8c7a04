"""The one storage interface (`Store`), what it returns (`ObjectInfo`), and what every
implementation shares: key rules, the sha256 digest, bounded retries with backoff.

Contract, for every implementation (tests/test_storage.py runs one suite over all of them):

- `put_file` / `put_bytes` / `put_json` count only once the stored object is verified: its size
  and trainctl's digest (``sha256:<hex>``, kept with the object) match what was sent. A failed
  or interrupted write leaves the previous object (or none) in place, never a torn one.
- `get_file` / `get_bytes` / `get_json` check the bytes against the recorded size and digest
  and fail with `IntegrityError` on a mismatch; `get_file` writes its destination atomically.
- Conditional writes: ``if_none_match="*"`` creates only when the key is absent;
  ``if_match=etag`` replaces only the version with that etag. The loser of a race gets
  `ConditionalWriteError`, the same on a local folder as on S3.
- `delete` is idempotent; `list(prefix)` is sorted by key; `head` is None for a missing key.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import UsageError
from .errors import StorageUnavailableError

T = TypeVar("T")

DIGEST_PREFIX = "sha256:"
CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: `key` relative to the store, its `size` in bytes, the store's `etag`
    (the version a conditional write compares), trainctl's `sha256` digest (None for an object
    another tool wrote) and its modification time."""

    key: str
    size: int
    etag: str
    sha256: str | None = None
    modified_s: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """At most `attempts` tries; waits grow from `base_delay_s` to `max_delay_s` (full jitter)."""

    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay_s(self, failures: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * (2 ** (failures - 1))))


def with_retries(call: Callable[[], T], *, policy: RetryPolicy, is_transient: Callable[[BaseException], bool],
                 what: str, uri: str | None = None, on_retry: Callable[[int], None] | None = None) -> T:
    """Run `call`, retrying transient failures within `policy`; a permanent one is raised as is."""
    failures = 0
    while True:
        try:
            return call()
        except Exception as e:
            if not is_transient(e):
                raise
            failures += 1
            if failures >= policy.attempts:
                raise StorageUnavailableError(
                    f"{what} failed {failures} times; last error: {describe_error(e)}",
                    "The store or the network is failing; nothing stored before was changed. "
                    "Check the endpoint and retry.", uri=uri) from e
            if on_retry is not None:
                on_retry(failures)
            time.sleep(policy.delay_s(failures))


def describe_error(e: BaseException) -> str:
    text = str(e).strip() or e.__class__.__name__
    return text.splitlines()[0][:300]


def check_key(key: str) -> str:
    """A key is a relative '/'-separated path with no empty, '.' or '..' parts (the same rules
    keep a local folder and a bucket in step, and keep a local key inside its folder)."""
    if not isinstance(key, str) or not key:
        raise UsageError(f"Storage key {key!r} is empty.", "Name the object, e.g. 'checkpoints/ckpt.pt'.")
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"Storage key {key!r} is not a plain relative path.",
                         "Use '/'-separated names without empty, '.' or '..' parts, e.g. 'events/000001.jsonl'.")
    return key


def check_prefix(prefix: str) -> str:
    """A list prefix: empty, or a key's beginning (a trailing '/' lists one folder)."""
    if prefix:
        check_key(prefix.rstrip("/") or "x")
    return prefix


def check_conditions(if_none_match: str | None, if_match: str | None) -> None:
    if if_none_match is not None and if_none_match != "*":
        raise UsageError(f"if_none_match={if_none_match!r} is not supported.",
                         "Pass if_none_match='*' (create only) or if_match=<etag> (replace that version).")
    if if_none_match is not None and if_match is not None:
        raise UsageError("if_none_match and if_match were both given.",
                         "Use one: '*' to create only, or the etag to replace.")
    if if_match is not None and not (isinstance(if_match, str) and if_match.strip('"')):
        raise UsageError(f"if_match={if_match!r} is not an etag.", "Pass the etag a read or write returned.")


def same_etag(a: str | None, b: str | None) -> bool:
    """Etags compare without their quotes (stores differ in quoting)."""
    return a is not None and b is not None and a.strip('"') == b.strip('"')


def sha256_bytes(data: bytes) -> str:
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(digest, size) of a file, read once in 4 MB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return DIGEST_PREFIX + h.hexdigest(), size


def check_digest(digest: str | None) -> str | None:
    if digest is not None and not (digest.startswith(DIGEST_PREFIX) and len(digest) == len(DIGEST_PREFIX) + 64):
        raise UsageError(f"Digest {digest!r} is not 'sha256:' followed by 64 hex digits.",
                         "Pass the digest a previous put or trainctl's manifest recorded, or None.")
    return digest


def encode_json(value: Any) -> bytes:
    return json.dumps(value, indent=1, default=str).encode() + b"\n"


class Store(ABC):
    """Object storage under one URI: a local folder (`LocalStore`) or an S3 bucket and prefix
    (`S3Store`). Keys are relative to that URI."""

    uri: str

    def url(self, key: str) -> str:
        """The full URI of one key, for messages and records."""
        return self.uri.rstrip("/") + "/" + key

    # --- files ---------------------------------------------------------------------------------
    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        """Upload a file; `sha256` (when the caller knows it) must match the bytes sent."""

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        """Download to `path` atomically, after checking size and digest (the recorded one, and
        `sha256` when given)."""

    # --- small objects -------------------------------------------------------------------------
    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_none_match: str | None = None,
                  if_match: str | None = None) -> ObjectInfo:
        """Write a small object whole; conditional when asked (see the module docstring)."""

    @abstractmethod
    def get_bytes(self, key: str) -> tuple[bytes, ObjectInfo]:
        """A small object's bytes, checked against its recorded digest, and its info."""

    def put_json(self, key: str, value: Any, *, if_none_match: str | None = None,
                 if_match: str | None = None) -> ObjectInfo:
        return self.put_bytes(key, encode_json(value), if_none_match=if_none_match, if_match=if_match)

    def get_json(self, key: str) -> Any:
        return self.get_json_versioned(key)[0]

    def get_json_versioned(self, key: str) -> tuple[Any, ObjectInfo]:
        """The decoded value and the info whose etag a later `if_match` write compares."""
        from .errors import IntegrityError

        data, info = self.get_bytes(key)
        try:
            return json.loads(data), info
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IntegrityError(f"{self.url(key)} is not valid JSON ({e}).",
                                 "The object was written by something else; inspect or delete it.",
                                 uri=self.url(key)) from e

    # --- listing and the rest ------------------------------------------------------------------
    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or None when there is no object under `key`."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.uri!r})"

