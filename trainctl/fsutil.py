"""Durable file writes shared by the session store and checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CRASH_ENV = "TRAINCTL_CRASH_AT"
# `.<name>.trainctl-[<tag>-]<8 hex>.tmp`: a shape only trainctl gives its temp files, so cleanup
# never takes a user's `.notes.tmp` for a leftover; the tag says which session wrote it
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.trainctl-(?:(?P<tag>[A-Za-z0-9_-]{1,64})-)?[0-9a-f]{8}\.tmp$")


def crash_point(name: str) -> None:
    """Fault injection: SIGKILL this process here when $TRAINCTL_CRASH_AT names this point.

    Tests drive it to kill a real process at every step of a write sequence; unset, it costs
    one environment lookup.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder: os.replace is atomic, but only durable once the folder entry is synced."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path, tag: str | None = None) -> Path:
    """A fresh temp name beside `path` (same filesystem, so os.replace is atomic) that only trainctl
    makes: `.<name>.trainctl-<tag>-<random>.tmp`; `tag` (a session id) names who wrote it."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "", tag or "")[:64]
    return path.parent / f".{path.name}.trainctl-{safe + '-' if safe else ''}{os.urandom(4).hex()}.tmp"


def parse_temp_name(name: str) -> tuple[str, str | None] | None:
    """(the file it was going to become, its tag) for a name temp_name() made; else None."""
    m = _TEMP_RE.match(name)
    return (m.group("target"), m.group("tag")) if m else None


@contextmanager
def temp_beside(path: Path, tag: str | None = None) -> Iterator[Path]:
    """A fresh temp_name() beside `path`; the temp file is removed when the block fails."""
    tmp = temp_name(path, tag)
    try:
        yield tmp
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None,
                       sync_dir: bool = True, crash_label: str | None = None,
                       tag: str | None = None) -> None:
    """Write to a temp file in the same folder, fsync, os.replace, fsync the folder.

    `sync_dir=False` keeps the atomic swap but skips the folder fsync: after a power cut the file
    may be the previous version, never a torn one (enough for records rewritten often).
    `crash_label` names the steps for :func:`crash_point` (`<label>:written`, `<label>:replaced`).
    """
    path = Path(path)
    with temp_beside(path, tag) as tmp:
        # O_EXCL on a random name is what tempfile.mkstemp does, without its import (start-up)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if crash_label:
            crash_point(f"{crash_label}:written")
        os.replace(tmp, path)
    if crash_label:
        crash_point(f"{crash_label}:replaced")
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, mode: int | None = None,
                      sync_dir: bool = True, crash_label: str | None = None,
                      tag: str | None = None) -> None:
    data = json.dumps(obj, indent=2, sort_keys=False, default=str).encode() + b"\n"
    atomic_write_bytes(path, data, mode=mode, sync_dir=sync_dir, crash_label=crash_label, tag=tag)
