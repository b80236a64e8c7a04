"""Durable file writes shared by the session store and checkpoints."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


CRASH_ENV = "TRAINCTL_CRASH_AT"


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


@contextmanager
def temp_beside(path: Path) -> Iterator[Path]:
    """A fresh temp name in `path`'s folder (same filesystem, so os.replace is atomic); the temp
    file is removed when the block fails."""
    tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"
    try:
        yield tmp
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None,
                       sync_dir: bool = True, crash_label: str | None = None) -> None:
    """Write to a temp file in the same folder, fsync, os.replace, fsync the folder.

    `sync_dir=False` keeps the atomic swap but skips the folder fsync: after a power cut the file
    may be the previous version, never a torn one (enough for records rewritten often).
    `crash_label` names the steps for :func:`crash_point` (`<label>:written`, `<label>:replaced`).
    """
    path = Path(path)
    with temp_beside(path) as tmp:
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
                      sync_dir: bool = True, crash_label: str | None = None) -> None:
    data = json.dumps(obj, indent=2, sort_keys=False, default=str).encode() + b"\n"
    atomic_write_bytes(path, data, mode=mode, sync_dir=sync_dir, crash_label=crash_label)
