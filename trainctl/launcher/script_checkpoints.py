"""Checkpoints a training script writes itself: find them, register the complete ones, verify
before a resume, and pick the newest good one of either kind.

Scripts not written for trainctl (nanoGPT's ``train.py``, Hugging Face Trainer, a plain
``torch.save``) save wherever they like, and many overwrite one file in place, so a kill during
a save leaves their only checkpoint torn. During a session the launcher polls the places such
a script writes every ``POLL_INTERVAL_S`` (`Watcher`): the session's checkpoint dir, folders
named by the script's arguments, ``[checkpoints] watch`` globs and, bounded in cost, new files
under the working directory. A file counts once it is stable (size and mtime unchanged across
two polls) and structurally whole (a torch zip's central directory, a safetensors header that
covers the file, a Hugging Face ``checkpoint-N/`` folder with ``trainer_state.json``). Each
registered version becomes a ``checkpoint`` event with ``source: "script"`` and a row in
``<session dir>/script_checkpoints.json``; nothing is written into the user's folders. With
``snapshot`` on, each registered version of a file is also copied, with a trainctl manifest,
into ``<session checkpoint dir>/script/``. Before a resume, `choose_resume` re-verifies what was
recorded, never picks a torn file, and falls back to the newest version that still verifies.

Engine code: no click and no printing; findings go to the ``on_event`` callback as events.
Reading a checkpoint never imports torch (see :mod:`trainctl.checkpoint_reader`).
"""

from __future__ import annotations

import json
import os
import re
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import validate_watch_globs
from ..fsutil import atomic_write_json, fsync_dir, temp_beside
from .script_conventions import dirs_from_args, dirs_from_source

if TYPE_CHECKING:
    from ..checkpoint_reader import TorchFile

POLL_INTERVAL_S = 2.0
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
MANIFEST_NAME = "script_checkpoints.json"
MANIFEST_VERSION = 1
SNAPSHOT_FOLDER = "script"
MAX_ENTRIES = 250_000  # folder entries one watched tree may track; beyond that it stops descending
MAX_DEPTH = 12
RACY_S = 2.0  # a folder modified this recently is listed again: its mtime may not move for a second change
NEW_SLACK_S = 2.0  # file times are coarse (ext4 ~4 ms, FAT 2 s): this much before the start still counts as new
MAX_CONFIG_CHARS = 16_384  # a config larger than this (as JSON) is left out of the event
TORN_SUFFIX = ".torn"

# Never looked into: version control, the session store, virtualenvs, caches, dependencies.
SKIP_DIRS = frozenset({
    ".git", ".hg", ".svn", ".trainctl", "__pycache__", "node_modules", ".venv", "venv",
    ".tox", ".nox", ".cache", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints",
    "site-packages", "dist-packages", ".eggs", "wandb", "mlruns",
})
_HF_FOLDER = re.compile(r"checkpoint-\d+")
_GLOB_MAGIC = re.compile(r"[*?\[]")

Event = dict[str, Any]


# --- where to look ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WatchRoot:
    """One place to watch and why; `pattern` (a glob's regex over the path below `path`)."""

    path: Path
    why: str
    pattern: re.Pattern[str] | None = None
    max_depth: int | None = None
    hidden: bool = True  # look into hidden folders (explicitly named places do; the default scan doesn't)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "why": self.why,
                "pattern": self.pattern.pattern if self.pattern else None}


def _part_regex(part: str) -> str:
    out, i = "", 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = part.index("]", i + 1)
            body = part[i + 1:end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out += "[" + body.replace("\\", "\\\\") + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return out


def glob_root(pattern: str, base: Path) -> WatchRoot:
    """A `[checkpoints] watch` glob as a root: the folder before its first wildcard, and a regex
    for the rest (`*`, `?`, `[...]` within one part; `**` any number of folders)."""
    validate_watch_globs([pattern])
    parts = Path(pattern).parts
    static: list[str] = []
    for part in parts:
        if _GLOB_MAGIC.search(part):
            break
        static.append(part)
    rest = parts[len(static):]
    folder = base.joinpath(*static) if static else base
    why = f"[checkpoints] watch {pattern!r}"
    if not rest:  # a plain path: that file (or Hugging Face folder) alone
        return WatchRoot(folder.parent, why, re.compile(re.escape(folder.name)), max_depth=1)
    regex = ""
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        if part == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
        else:
            regex += _part_regex(part) + ("" if last else "/")
    return WatchRoot(folder, why, re.compile(regex), max_depth=None if "**" in rest else len(rest))


def watch_roots(args: Sequence[str], *, cwd: Path, checkpoint_dir: Path | None = None,
                globs: Iterable[str] = (), glob_base: Path | None = None,
                source: str | None = None, default_scan: bool = True) -> list[WatchRoot]:
    """Every place to watch for one run, each with the reason it is watched."""
    cwd = Path(cwd)
    roots: list[WatchRoot] = []

    def folder(value: str) -> Path:
        path = (cwd / os.path.expanduser(value)).resolve()
        # `--save_path out/model.pt`: the file's folder
        return path.parent if path.suffix in CHECKPOINT_SUFFIXES and not path.is_dir() else path

    if checkpoint_dir is not None:
        roots.append(WatchRoot(Path(checkpoint_dir).resolve(), "the session's checkpoint dir"))
    for flag, value in dirs_from_args(args):
        roots.append(WatchRoot(folder(value), f"named by {flag}"))
    for name, value in dirs_from_source(source or ""):
        roots.append(WatchRoot(folder(value), f"{name} in the script"))
    for g in globs:
        roots.append(glob_root(g, (glob_base or cwd).resolve()))
    if default_scan:
        roots.append(WatchRoot(cwd.resolve(), "new files under the working directory", hidden=False))
    unique: dict[tuple[str, str | None], WatchRoot] = {}
    for r in roots:
        unique.setdefault((str(r.path), r.pattern.pattern if r.pattern else None), r)
    return list(unique.values())


# --- listing, incrementally ------------------------------------------------------------------

@dataclass
class _Listing:
    mtime_ns: int
    entries: int
    candidates: list[str]
    subdirs: list[str]


class _Tree:
    """The checkpoint candidates under one root. A folder is listed again only when its mtime
    moved (or moved within RACY_S): a poll costs one stat per folder plus the changed listings."""

    def __init__(self, root: WatchRoot, *, exclude: Iterable[Path] = (),
                 max_entries: int = MAX_ENTRIES) -> None:
        self.root = root
        self.base = str(root.path)
        self.exclude = {str(Path(p).resolve()) for p in exclude} - {self.base}
        self.max_entries = max_entries
        self.max_depth = root.max_depth if root.max_depth is not None else MAX_DEPTH
        self.listings: dict[str, _Listing] = {}
        self.truncated = False
        self.aborted = False
        self.stop: threading.Event | None = None

    def scan(self) -> list[str]:
        now = time.time()
        self.aborted = False
        listings: dict[str, _Listing] = {}
        candidates: list[str] = []
        entries = 0
        truncated = False
        stack = [(self.base, 0)]
        while stack:
            if self.stop is not None and self.stop.is_set():
                self.aborted = True  # stopped in the middle of a large first scan: keep the old listings
                return candidates
            folder, depth = stack.pop()
            try:
                st = os.stat(folder)
            except OSError:
                continue
            if not stat_mod.S_ISDIR(st.st_mode):
                continue
            listing = self.listings.get(folder)
            if listing is None or listing.mtime_ns != st.st_mtime_ns or now - st.st_mtime < RACY_S:
                try:
                    listing = self._list(folder, depth, st.st_mtime_ns)
                except OSError:
                    continue
            entries += listing.entries
            listings[folder] = listing
            candidates.extend(listing.candidates)
            if entries > self.max_entries:
                truncated = bool(listing.subdirs) or bool(stack)
                break
            stack.extend((s, depth + 1) for s in reversed(listing.subdirs))
        self.listings = listings
        self.truncated = truncated
        return candidates

    def _list(self, folder: str, depth: int, mtime_ns: int) -> _Listing:
        candidates: list[str] = []
        subdirs: list[str] = []
        pattern = self.root.pattern
        prefix = len(self.base) + 1
        count = 0
        environment = False
        # the loop runs once per entry of a 100k-file tree: paths are built only for what is kept
        with os.scandir(folder) as it:
            for entry in it:
                count += 1
                name = entry.name
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    path = entry.path
                    if pattern is not None and pattern.fullmatch(path[prefix:]):
                        candidates.append(path)  # a folder the glob names
                    elif pattern is None and _HF_FOLDER.fullmatch(name):
                        candidates.append(path)  # Hugging Face: the folder is the checkpoint
                    elif name == "conda-meta":
                        environment = True
                    elif (depth + 1 < self.max_depth and name not in SKIP_DIRS
                          and (self.root.hidden or name[0] != ".")
                          and not name.endswith(".egg-info") and path not in self.exclude):
                        subdirs.append(path)
                elif name == "pyvenv.cfg":
                    environment = True
                elif name[0] == ".":
                    continue  # dot files: temp files of saves in progress
                elif pattern is None:
                    if name.endswith(CHECKPOINT_SUFFIXES) and entry.is_file(follow_symlinks=False):
                        candidates.append(entry.path)
                elif pattern.fullmatch(entry.path[prefix:]) and entry.is_file(follow_symlinks=False):
                    candidates.append(entry.path)
        if environment:  # a virtualenv (pyvenv.cfg) or conda environment (conda-meta/), whatever its name
            return _Listing(mtime_ns, count, [], [])
        return _Listing(mtime_ns, count, candidates, subdirs)


# --- what a candidate holds ------------------------------------------------------------------

Signature = tuple[Any, ...]


def _signature(path: str) -> Signature | None:
    """(size, mtime_ns) of a file; for a folder, those of every file in it. None when gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat_mod.S_ISDIR(st.st_mode):
        return ("file", st.st_size, st.st_mtime_ns)
    rows = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                fst = os.stat(full)
            except OSError:
                continue
            rows.append((os.path.relpath(full, path), fst.st_size, fst.st_mtime_ns))
    return ("dir", st.st_mtime_ns, tuple(rows))


def _signature_time(sig: Signature) -> float:
    """When the newest byte of a candidate was written (seconds)."""
    if sig[0] == "file":
        return sig[2] / 1e9
    return max([sig[1], *(row[2] for row in sig[2])]) / 1e9


def _signature_bytes(sig: Signature) -> int:
    return sig[1] if sig[0] == "file" else sum(row[1] for row in sig[2])


@dataclass
class Facts:
    """What a candidate is: a whole checkpoint (with what the reader extracts), an incomplete
    one (being written, or torn by a kill during a save), or not a checkpoint at all."""

    status: str  # "checkpoint" | "incomplete" | "not-checkpoint" | "trainctl"
    problem: str = ""
    format: str = ""  # torch | torch-legacy | safetensors | huggingface
    style: str = ""  # what the reader recognised: dict, lightning, state_dict, huggingface, safetensors
    step: int | float | None = None
    step_name: str = "step"
    epoch: int | float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None


def read_facts(path: str | os.PathLike[str]) -> Facts:
    """Whether `path` is a whole checkpoint and what it holds; never raises, never loads tensors."""
    from .. import checkpoint_reader as reader

    path = Path(path)
    try:
        if path.is_dir():
            return _folder_facts(path)
        kind = reader.sniff(path)
    except OSError as e:
        return Facts("incomplete", f"unreadable ({e.strerror or e})")
    if kind == "empty":
        return Facts("incomplete", "an empty file (0 bytes)")
    if kind == "zip":
        return _zip_facts(path)
    if kind == "legacy":
        return _legacy_facts(path)
    if kind == "safetensors":
        try:
            facts = reader.read_safetensors(path)
        except reader.UnreadableCheckpoint as e:
            return Facts("incomplete", str(e))
        except OSError as e:
            return Facts("incomplete", f"unreadable ({e.strerror or e})")
        meta = facts.get("metadata") or {}
        return Facts("checkpoint", format="safetensors", style="safetensors",
                     step=_int_or_none(meta.get("step") or meta.get("global_step")),
                     epoch=_int_or_none(meta.get("epoch")))
    return Facts("not-checkpoint", reader.describe_non_checkpoint(path, kind))


def _int_or_none(value: Any) -> int | float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _zip_facts(path: Path) -> Facts:
    # the central directory is written last: a zip that opens is one the writer finished
    import zipfile

    from .. import checkpoint_reader as reader

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return Facts("incomplete", f"no complete zip central directory ({e})")
    if not any(n.endswith("data.pkl") for n in names):
        return Facts("not-checkpoint", "a zip file without data.pkl, not a torch checkpoint")
    try:
        walked = reader.read_torch_zip(path)
    except reader.UnreadableCheckpoint as e:
        return Facts("incomplete", str(e))
    except OSError as e:
        return Facts("incomplete", f"unreadable ({e.strerror or e})")
    return _classified(walked, "torch")


def _legacy_facts(path: Path) -> Facts:
    from .. import checkpoint_reader as reader

    try:
        walked = reader.read_torch_legacy(path)
        size = path.stat().st_size
    except reader.UnreadableCheckpoint as e:
        return Facts("incomplete", str(e))
    except OSError as e:
        return Facts("incomplete", f"unreadable ({e.strerror or e})")
    # the raw storages follow the pickles, each behind an 8-byte length
    needed = walked.storage_bytes + 8 * len(walked.storages)
    if size < needed:
        return Facts("incomplete", f"a truncated torch file ({size} bytes, its storages need {needed})")
    return _classified(walked, "torch-legacy")


def _classified(walked: TorchFile, fmt: str) -> Facts:
    from .. import checkpoint
    from .. import checkpoint_reader as reader

    facts = reader.classify(walked.obj, checkpoint.META_KEY)
    if facts["kind"] == "trainctl":
        return Facts("trainctl", format=fmt, style="trainctl")
    if facts["kind"] == "unknown":
        return Facts("not-checkpoint", f"a torch file holding {facts['summary'].get('type', 'an object')}")
    summary = facts["summary"]
    config = next((summary[k] for k in ("config", "args", "hparams", "hyper_parameters", "model_args")
                   if isinstance(summary.get(k), dict)), None)
    return Facts("checkpoint", format=fmt, style=facts["kind"], step=facts["step"],
                 step_name="iter" if summary.get("style") == "nanogpt" else "step",
                 epoch=facts["epoch"], metrics=dict(facts["metrics"]), config=config)


def _folder_facts(folder: Path) -> Facts:
    from .. import checkpoint_reader as reader

    if not (folder / "trainer_state.json").is_file():
        return Facts("incomplete", "no trainer_state.json (the Trainer writes it last)")
    try:
        facts = reader.read_hf_folder(folder)
    except reader.UnreadableCheckpoint as e:
        return Facts("incomplete", str(e))
    except OSError as e:
        return Facts("incomplete", f"unreadable ({e.strerror or e})")
    problem = _folder_problem(folder)
    if problem:
        return Facts("incomplete", problem)
    config = None
    try:
        text = (folder / "config.json").read_text(encoding="utf-8")
        if len(text) <= MAX_CONFIG_CHARS:
            loaded = json.loads(text)
            config = loaded if isinstance(loaded, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    return Facts("checkpoint", format="huggingface", style="huggingface", step=facts["step"],
                 epoch=facts["epoch"], metrics=dict(facts["metrics"]), config=config)


def _folder_problem(folder: Path) -> str | None:
    """The first weight/state file of a Hugging Face folder that is not whole, else None."""
    import zipfile

    from .. import checkpoint_reader as reader

    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            kind = reader.sniff(p)
            if p.suffix == ".safetensors":
                reader.read_safetensors(p)
            elif kind == "zip":
                with zipfile.ZipFile(p):
                    pass
            elif kind == "empty" and p.suffix in CHECKPOINT_SUFFIXES:
                return f"{p.name} is empty"
            elif p.suffix == ".json":
                json.loads(p.read_text(encoding="utf-8"))
        except (reader.UnreadableCheckpoint, zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            return f"{p.name} is not whole ({e})"
    return None


def digest(path: str | os.PathLike[str], fmt: str) -> str:
    """Identity of a registered version. A torch zip: the digest trainctl's own manifests use
    (sha256 of the central directory's names, CRC-32s and sizes: ~1 ms, no second pass over
    the bytes); other files: sha256 of the bytes; a folder: sha256 over its files' digests."""
    import hashlib

    path = Path(path)
    if fmt == "huggingface":
        rows = []
        for p in sorted(path.rglob("*")):
            if p.is_file():
                rows.append([str(p.relative_to(path)), p.stat().st_size, _file_digest(p)])
        return "folder:" + hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    return _file_digest(path)


def _file_digest(path: Path) -> str:
    import zipfile

    from .. import checkpoint
    from .. import checkpoint_reader as reader

    if reader.sniff(path) == "zip":
        try:
            return checkpoint._zip_digest(path)
        except (zipfile.BadZipFile, ValueError):
            pass
    return checkpoint.file_sha256(path)


# --- the watcher -----------------------------------------------------------------------------

@dataclass
class _Seen:
    sig: Signature
    verdict: str | None = None  # None: look again; registered, trainctl, ignored, incomplete, old
    problem: str = ""
    reported: bool = False


class Watcher:
    """Polls the roots of one session and registers the checkpoints the script writes.

    `poll()` is one pass (the engine's thread calls it every POLL_INTERVAL_S via `start`);
    `poll(final=True)` after the script has exited takes every file as settled, so a checkpoint
    finished just before a kill is registered and a torn one is reported.
    """

    def __init__(self, roots: Sequence[WatchRoot], *, manifest_path: Path,
                 on_event: Callable[[Event], None] | None = None, started_at: float | None = None,
                 cwd: Path | None = None, exclude: Iterable[Path] = (),
                 snapshot_dir: Path | None = None, retention: Any = None,
                 session_id: str | None = None, script: str | None = None, name: str | None = None,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.roots = list(roots)
        self.manifest_path = Path(manifest_path)
        self.on_event = on_event
        self.started_at = time.time() if started_at is None else started_at
        self.cwd = Path(cwd or Path.cwd()).resolve()
        self.snapshot_dir = Path(snapshot_dir).resolve() if snapshot_dir else None
        self.retention = retention
        self.session_id = session_id
        self.script = script
        self.name = name
        excluded = [Path(p) for p in exclude] + [self.manifest_path.parent]
        if self.snapshot_dir is not None:
            excluded.append(self.snapshot_dir)
        explicit = [r.path for r in self.roots if r.pattern is None and r.hidden]
        self._trees = [_Tree(r, exclude=excluded + ([] if r.hidden else explicit), max_entries=max_entries)
                       for r in self.roots]
        self._seen: dict[str, _Seen] = {}
        self._current: dict[str, dict[str, Any]] = {}
        self.entries: list[dict[str, Any]] = []
        self.problems: dict[str, str] = {}
        self._warned_truncated: set[str] = set()
        self._dirty = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for tree in self._trees:
            tree.stop = self._stop

    # ---------------------------------------------------------------- polling
    def poll(self, *, final: bool = False) -> list[Event]:
        """One pass over every root; returns the events it emitted (also given to on_event)."""
        events: list[Event] = []
        with self._lock:
            if final:
                self._stop.clear()
            present: set[str] = set()
            complete = True
            for tree in self._trees:
                for path in tree.scan():
                    if path in present:
                        continue
                    present.add(path)
                    try:
                        self._observe(path, final, events)
                    except OSError as e:  # vanished or unreadable between two calls: look next time
                        self._seen.pop(path, None)
                        if final:
                            self.problems[path] = f"unreadable ({e.strerror or e})"
                    except Exception as e:  # a watcher must never take the run down
                        seen = self._seen.setdefault(path, _Seen(("?",)))
                        seen.verdict = "ignored"
                        events.append({"kind": "warning", "source": "watch", "path": path, "message": (
                            f"could not register {self.display(path)}: {e.__class__.__name__}: {e}")})
                complete = complete and not tree.aborted
                key = str(tree.root.path)
                if tree.truncated and key not in self._warned_truncated:
                    self._warned_truncated.add(key)
                    events.append({"kind": "warning", "source": "watch", "message": (
                        f"{tree.root.path} ({tree.root.why}) holds more than {tree.max_entries:,} "
                        "entries: checkpoints deeper in it are not watched. Name where the script "
                        "saves in trainctl.toml: [checkpoints] watch = [\"out/*.pt\"]")})
            if complete:
                for path in [p for p in self._seen if p not in present]:
                    self._seen.pop(path)
            if events or self._dirty:
                self._save()
        for event in events:
            if self.on_event is not None:
                self.on_event(event)
        return events

    def _observe(self, path: str, final: bool, events: list[Event]) -> None:
        sig = _signature(path)
        if sig is None:
            return
        seen = self._seen.get(path)
        if seen is None:
            old = _signature_time(sig) < self.started_at - NEW_SLACK_S
            seen = self._seen[path] = _Seen(sig, verdict="old" if old else None)
            if old or not final:
                return  # first sight: a file counts once it is unchanged at the next poll
        elif seen.sig != sig:
            seen.sig, seen.verdict, seen.problem, seen.reported = sig, None, "", False
            if self.problems.pop(path, None) is not None:
                self._dirty = True
            if not final:
                return
        elif seen.verdict is not None:
            if final and seen.verdict == "incomplete" and not seen.reported:
                self._report_torn(path, seen, events)
            return
        self._examine(path, seen, final, events)

    def _examine(self, path: str, seen: _Seen, final: bool, events: list[Event]) -> None:
        from .. import checkpoint

        if os.path.isfile(path) and checkpoint.read_manifest(path) is not None:
            seen.verdict = "trainctl"  # trainctl's own (run.save_checkpoint, the Lightning callback)
            return
        facts = read_facts(path)
        if facts.status in ("not-checkpoint", "trainctl"):
            seen.verdict = "ignored" if facts.status == "not-checkpoint" else "trainctl"
            return
        if facts.status == "incomplete":
            seen.verdict, seen.problem = "incomplete", facts.problem
            if final:
                self._report_torn(path, seen, events)
            return
        version_digest = digest(path, facts.format)
        if _signature(path) != seen.sig:  # written to while being read: look again next poll
            seen.verdict = None
            return
        seen.verdict = "registered"
        current = self._current.get(path)
        if current is not None and current["digest"] == version_digest:
            current.update(_stat_fields(seen.sig))  # the same bytes again (copied back, touched)
            self._dirty = True
            return
        entry = self._entry(path, facts, seen.sig, version_digest,
                            version=current["version"] + 1 if current else 1)
        if self.snapshot_dir is not None and facts.format != "huggingface":
            entry["snapshot"] = self._snapshot(path, entry, events)
        self.entries.append(entry)
        self._current[path] = entry
        events.append(checkpoint_event(entry))

    def _report_torn(self, path: str, seen: _Seen, events: list[Event]) -> None:
        seen.reported = True
        self.problems[path] = seen.problem
        events.append({"kind": "warning", "source": "watch", "path": path, "message": (
            f"{self.display(path)} is incomplete ({seen.problem}): the script stopped while writing "
            "it; it will not be resumed from.")})

    def _entry(self, path: str, facts: Facts, sig: Signature, version_digest: str,
               *, version: int) -> dict[str, Any]:
        config = facts.config
        if config is not None and len(json.dumps(config, default=str)) > MAX_CONFIG_CHARS:
            config = {"...": "left out: larger than 16 KB"}
        return {
            "path": path, "display": self.display(path), "version": version,
            "format": facts.format, "style": facts.style, "step": facts.step,
            "step_name": facts.step_name, "epoch": facts.epoch, "metrics": facts.metrics,
            "config": config, "bytes": _signature_bytes(sig), "digest": version_digest,
            "written_at": _signature_time(sig), "registered_at": time.time(),
            "snapshot": None, **_stat_fields(sig),
        }

    def display(self, path: str | os.PathLike[str]) -> str:
        """The path as the user thinks of it: relative to the working directory when inside."""
        try:
            return str(Path(path).relative_to(self.cwd))
        except ValueError:
            return str(path)

    # ---------------------------------------------------------------- snapshots
    def _snapshot(self, path: str, entry: dict[str, Any], events: list[Event]) -> str | None:
        """Copy one registered version into the session's checkpoint dir, with a trainctl
        manifest, so a later in-place overwrite can't lose it. None when it changed mid-copy."""
        import shutil

        from .. import checkpoint

        assert self.snapshot_dir is not None
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        src = Path(path)
        label = (f"{entry['step_name']}{int(entry['step']):08d}" if isinstance(entry["step"], (int, float))
                 else f"v{entry['version']}")
        dest = self.snapshot_dir / f"{src.stem}-{label}{src.suffix}"
        n = 2
        while dest.exists() or checkpoint.manifest_path(dest).exists():
            dest = self.snapshot_dir / f"{src.stem}-{label}-{n}{src.suffix}"
            n += 1
        try:
            with temp_beside(dest) as tmp:
                shutil.copyfile(src, tmp)
                _fsync(tmp)
                copied = _file_digest(tmp)
                if _signature(path) != _signature_of(entry) or copied != entry["digest"]:
                    raise _ChangedWhileCopying
                os.replace(tmp, dest)
        except _ChangedWhileCopying:
            events.append({"kind": "warning", "source": "watch", "path": path, "message": (
                f"no snapshot of {entry['display']} v{entry['version']}: the script overwrote it "
                "while it was being copied.")})
            return None
        except OSError as e:
            events.append({"kind": "warning", "source": "watch", "path": path, "message": (
                f"no snapshot of {entry['display']}: {e.strerror or e} (free space in "
                f"{self.snapshot_dir}?)")})
            return None
        fsync_dir(self.snapshot_dir)
        meta = {"saved_at": entry["written_at"], "session_id": self.session_id, "script": self.script,
                "step": entry["step"], "epoch": entry["epoch"], "metrics": entry["metrics"],
                "source": "script", "original": path, "original_version": entry["version"],
                "config": entry["config"]}
        checkpoint.register(dest, meta, digest=copied)
        if self.retention is not None:
            for removed in checkpoint.apply_retention(self.snapshot_dir, self.retention, protected=[dest]):
                for e in self.entries:
                    if e.get("snapshot") == str(removed):
                        e["snapshot"] = None
        return str(dest)

    # ---------------------------------------------------------------- state
    def _save(self) -> None:
        self._dirty = False
        atomic_write_json(self.manifest_path, {
            "format_version": MANIFEST_VERSION, "session_id": self.session_id, "script": self.script,
            "name": self.name,
            "cwd": str(self.cwd), "started_at": self.started_at,
            "poll_interval_s": POLL_INTERVAL_S, "roots": [r.to_dict() for r in self.roots],
            "checkpoints": self.entries,
            "problems": [{"path": p, "problem": why} for p, why in self.problems.items()],
        }, sync_dir=False)

    def start(self, interval_s: float = POLL_INTERVAL_S) -> None:
        """Poll in a daemon thread every `interval_s` until `stop()`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.poll()
                except Exception as e:  # a watcher must never take the run down
                    if self.on_event is not None:
                        self.on_event({"kind": "warning", "source": "watch",
                                       "message": f"checkpoint watch failed once: {e.__class__.__name__}: {e}"})

        self._thread = threading.Thread(target=loop, daemon=True, name="trainctl-watch")
        self._thread.start()

    def stop(self) -> None:
        """End the polling thread (a scan in progress stops between folders)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def choose_resume(self, *, own_dir: Path | None = None, takes_path: bool = True) -> ResumeChoice:
        with self._lock:
            return choose_resume(self.entries, own_dir=own_dir, takes_path=takes_path)

    def summary(self) -> dict[str, Any]:
        return summarize(self.entries)


class _ChangedWhileCopying(Exception):
    pass


def _stat_fields(sig: Signature) -> dict[str, Any]:
    if sig[0] == "file":
        return {"size": sig[1], "mtime_ns": sig[2]}
    return {"size": _signature_bytes(sig), "mtime_ns": int(_signature_time(sig) * 1e9)}


def _signature_of(entry: dict[str, Any]) -> Signature:
    return ("file", entry["size"], entry["mtime_ns"])


def _fsync(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def checkpoint_event(entry: dict[str, Any]) -> Event:
    """The `checkpoint` event of one registered version (the events log's record of it)."""
    return {"kind": "checkpoint", "source": "script", "path": entry["path"],
            "display": entry["display"], "version": entry["version"], "format": entry["format"],
            "step": entry["step"], "step_name": entry["step_name"], "epoch": entry["epoch"],
            "metrics": entry["metrics"], "config": entry["config"], "bytes": entry["bytes"],
            "digest": entry["digest"], "written_at": entry["written_at"], "snapshot": entry["snapshot"]}


def read_manifest(session_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A session's record of the checkpoints its script wrote, or None (none watched, unreadable)."""
    try:
        data = json.loads((Path(session_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        return None
    data["checkpoints"] = [e for e in data["checkpoints"] if isinstance(e, dict) and "path" in e]
    return data


def recorded_entries(sessions_dir: str | os.PathLike[str], *, script: str | None = None,
                     name: str | None = None, skip_sessions: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The script-written checkpoints every session recorded, for `--resume auto` across
    sessions: of the run `name` when given, else of `script` (same path, or the same file name
    run from elsewhere)."""
    skip = set(skip_sessions)
    found: list[dict[str, Any]] = []
    try:
        folders = sorted(p for p in Path(sessions_dir).iterdir() if p.is_dir() and p.name not in skip)
    except OSError:
        return []
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        recorded = manifest.get("script")
        if name is not None:
            if manifest.get("name") != name:
                continue
        elif script is not None and not (isinstance(recorded, str) and (
                recorded == script or Path(recorded).name == Path(script).name)):
            continue
        found.extend({**e, "session_id": manifest.get("session_id") or folder.name}
                     for e in manifest["checkpoints"])
    return found


def latest_versions(entries: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The newest registered version of each path, newest first, with what is there now, from
    a stat alone: 'as registered', 'changed since' (overwritten, maybe torn) or 'gone'."""
    latest: dict[str, dict[str, Any]] = {}
    for e in entries:
        latest[e["path"]] = e
    out = []
    for e in sorted(latest.values(), key=lambda e: e.get("written_at") or 0, reverse=True):
        sig = _signature(e["path"])
        if sig is None:
            state = "gone"
        elif e.get("format") == "huggingface":
            state = "as registered" if _stat_fields(sig)["size"] == e.get("size") else "changed since"
        else:
            state = "as registered" if (sig[1], sig[2]) == (e.get("size"), e.get("mtime_ns")) else "changed since"
        out.append((e, state))
    return out


def describe(entry: dict[str, Any]) -> str:
    """'out/ckpt.pt iter 100' / 'out/checkpoint-20 step 20, epoch 2'."""
    text = entry.get("display") or entry.get("path") or "?"
    parts = []
    if entry.get("step") is not None:
        parts.append(f"{entry.get('step_name') or 'step'} {_number(entry['step'])}")
    if entry.get("epoch") is not None:
        parts.append(f"epoch {_number(entry['epoch'])}")
    return f"{text} {', '.join(parts)}" if parts else text


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def summarize(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{'written', 'newest', 'text'}: '3 written by the script, newest out/ckpt.pt iter 100'."""
    if not entries:
        return {"written": 0, "newest": None, "text": "none written by the script"}
    newest = max(entries, key=lambda e: (e.get("written_at") or 0, e.get("registered_at") or 0))
    keys = ("path", "display", "step", "step_name", "epoch", "metrics", "written_at", "snapshot")
    return {"written": len(entries), "newest": {k: newest.get(k) for k in keys},
            "text": f"{len(entries)} written by the script, newest {describe(newest)}"}


# --- verification and the choice of a resume point ------------------------------------------

def verify_entry(entry: dict[str, Any]) -> tuple[bool, str]:
    """Is the recorded version still there, whole and unchanged? (ok, why not)."""
    from .. import checkpoint

    path = Path(entry["path"])
    sig = _signature(str(path))
    if sig is None:
        return False, "it no longer exists (removed by the script's own rotation?)"
    if entry.get("format") == "huggingface":
        try:
            now = digest(path, "huggingface")
        except OSError as e:
            return False, f"unreadable ({e.strerror or e})"
        if now != entry["digest"]:
            facts = read_facts(path)
            return False, (f"it is incomplete ({facts.problem})" if facts.status != "checkpoint"
                           else "its files changed since it was registered")
        result = checkpoint.verify(path)
        return (True, "") if result.ok else (False, result.reason)
    if (sig[1], sig[2]) != (entry.get("size"), entry.get("mtime_ns")):
        facts = read_facts(path)
        if facts.status == "incomplete":
            return False, (f"it was overwritten and the new version is torn ({facts.problem}): "
                           "the script was stopped during its save")
        return False, "it was overwritten since (a newer version, not verified)"
    result = checkpoint.verify(path)  # every zip member against its CRC-32, or the header's extent
    if not result.ok:
        return False, result.reason
    try:
        if _file_digest(path) != entry["digest"]:
            return False, "its contents differ from the registered version's digest"
    except OSError as e:
        return False, f"unreadable ({e.strerror or e})"
    return True, ""


@dataclass
class ResumeChoice:
    """What to resume from, and what was passed over (path shown to the user, why)."""

    path: Path | None = None
    source: str | None = None  # "script", "snapshot" (of a script's file) or "trainctl"
    label: str = ""
    restore_to: Path | None = None  # a script that reads its own file: put the snapshot back there first
    entry: dict[str, Any] | None = None
    written_at: float | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        if self.path is None:
            return "no verified checkpoint"
        if self.source == "snapshot":
            return f"{self.label} (its snapshot {self.path})"
        return self.label


def choose_resume(entries: Sequence[dict[str, Any]], *, own_dir: Path | None = None,
                  takes_path: bool = True, script: str | None = None,
                  skip_sessions: Iterable[str] = ()) -> ResumeChoice:
    """The newest checkpoint that verifies, of either kind: the script's own (registered by the
    watcher, or a snapshot of a version since overwritten) or trainctl's (under `own_dir`; of
    `script` when given, by file name, and of no session in `skip_sessions`).

    `takes_path=False` (a flag like `--init_from=resume`): the script reads its own file, so a
    snapshot chosen for a path that now holds something else comes with `restore_to`.
    """
    from .. import checkpoint

    skip = set(skip_sessions)
    candidates: list[tuple[float, str, Any]] = []
    for entry in entries:
        candidates.append((float(entry.get("written_at") or 0), "script", entry))
    if own_dir is not None and Path(own_dir).is_dir():
        for info in checkpoint.scan(own_dir):
            if info.kind != "trainctl" or info.meta.get("source") == "script" \
                    or info.meta.get("session_id") in skip:
                continue  # snapshots of the script's files come with their entries
            recorded = info.meta.get("script")
            if script is not None and not (isinstance(recorded, str) and Path(recorded).name == Path(script).name):
                continue
            candidates.append((info.time, "trainctl", info))
    candidates.sort(key=lambda c: c[0], reverse=True)
    skipped: list[tuple[str, str]] = []
    failed_paths: set[str] = set()
    for written_at, kind, item in candidates:
        if kind == "trainctl":
            result = checkpoint.verify(item.path)
            if result.ok:
                label = str(item.path) + (f" step {item.step}" if item.step is not None else "")
                return ResumeChoice(Path(item.path), "trainctl", label, written_at=written_at,
                                    skipped=skipped)
            skipped.append((str(item.path), result.reason))
            continue
        entry = item
        ok, why = verify_entry(entry)
        if ok:
            return ResumeChoice(Path(entry["path"]), "script", describe(entry), entry=entry,
                                written_at=written_at, skipped=skipped)
        snapshot = entry.get("snapshot")
        if snapshot and Path(snapshot).exists():
            result = checkpoint.verify(snapshot)
            if result.ok:
                if entry["path"] not in failed_paths:
                    skipped.append((entry["display"], why))
                return ResumeChoice(Path(snapshot), "snapshot", describe(entry),
                                    restore_to=None if takes_path else Path(entry["path"]),
                                    entry=entry, written_at=written_at, skipped=skipped)
            why += f"; its snapshot failed too ({result.reason})"
        if entry["path"] not in failed_paths:  # older versions of the same file: said once
            failed_paths.add(entry["path"])
            skipped.append((entry["display"], why))
    return ResumeChoice(skipped=skipped)


def restore_snapshot(snapshot: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path | None:
    """Put a verified snapshot back where a script that resumes from its own file reads it
    (nanoGPT: `out/ckpt.pt`). Whatever is there (a torn file) is kept beside it as
    `<name>.torn`, never deleted; returns that path, or None when nothing was there."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    moved = None
    with temp_beside(target) as tmp:
        shutil.copyfile(snapshot, tmp)
        _fsync(tmp)
        if target.exists():
            moved = target.with_name(target.name + TORN_SUFFIX)
            n = 2
            while moved.exists():
                moved = target.with_name(f"{target.name}{TORN_SUFFIX}.{n}")
                n += 1
            os.replace(target, moved)
        os.replace(tmp, target)
    fsync_dir(target.parent)
    return moved


# --- a folder at a glance (`trainctl monitor --checkpoint DIR`) -----------------------------

@dataclass
class FolderRow:
    path: str
    display: str
    status: str  # "ok" | "incomplete" | "trainctl"
    step: int | float | None
    step_name: str
    epoch: int | float | None
    metrics: dict[str, Any]
    bytes: int
    written_at: float
    age_s: float
    problem: str = ""


@dataclass
class FolderReport:
    folder: str
    rows: list[FolderRow]  # newest first
    torn: str | None = None  # the newest file is incomplete, and has been for a while
    overdue: str | None = None  # the newest whole one is older than overdue_s
    truncated: bool = False

    @property
    def warnings(self) -> list[str]:
        empty = None if self.rows else f"no checkpoints in {self.folder} yet"
        return [w for w in (empty, self.torn, self.overdue) if w]


def describe_folder(folder: str | os.PathLike[str], *, now: float | None = None,
                    overdue_s: float = 3600.0, settling_s: float = 2 * POLL_INTERVAL_S,
                    cwd: Path | None = None, cache: dict[str, Any] | None = None) -> FolderReport:
    """The checkpoints in `folder` (any kind: trainctl's, the script's, Hugging Face folders)
    with step, metrics and age, and what is wrong: the newest is torn, or overdue. `cache`
    (kept by the caller between refreshes) saves re-reading files that did not change."""
    folder = Path(folder).resolve()
    now = time.time() if now is None else now
    base = Path(cwd or Path.cwd()).resolve()
    tree = _Tree(WatchRoot(folder, "monitor"))
    cache = {} if cache is None else cache
    rows: list[FolderRow] = []
    for path in tree.scan():
        sig = _signature(path)
        if sig is None:
            continue
        try:
            display = str(Path(path).relative_to(base))
        except ValueError:
            display = path
        written = _signature_time(sig)
        common = {"path": path, "display": display, "bytes": _signature_bytes(sig),
                  "written_at": written, "age_s": max(0.0, now - written)}
        known = cache.get(path)
        if known is None or known[0] != sig:
            known = cache[path] = (sig, _folder_row_facts(path))
        facts = known[1]
        if facts is not None:
            rows.append(FolderRow(**facts, **common))
    rows.sort(key=lambda r: r.written_at, reverse=True)
    report = FolderReport(str(folder), rows, truncated=tree.truncated)
    good = [r for r in rows if r.status != "incomplete"]
    if rows and rows[0].status == "incomplete" and rows[0].age_s >= settling_s:
        fallback = f"; the newest whole one is {_row_label(good[0])}" if good else "; no whole one is left"
        report.torn = (f"{rows[0].display} is incomplete ({rows[0].problem}): torn by a kill during "
                       f"its save?{fallback}")
    if good and overdue_s > 0 and good[0].age_s > overdue_s:
        report.overdue = (f"newest checkpoint {_row_label(good[0])} is {good[0].age_s / 60:.0f} min old "
                          f"(expected one every {overdue_s / 60:.0f} min); a crash now would lose that much work")
    return report


def _folder_row_facts(path: str) -> dict[str, Any] | None:
    """status, step, step_name, epoch, metrics, problem of one candidate; None: not a checkpoint."""
    from .. import checkpoint

    if os.path.isfile(path) and checkpoint.read_manifest(path) is not None:
        info = checkpoint.inspect(path)
        return {"status": "trainctl" if info.status == "valid" else "incomplete", "step": info.step,
                "step_name": "step", "epoch": info.epoch, "metrics": info.metrics, "problem": info.error or ""}
    facts = read_facts(path)
    if facts.status == "not-checkpoint":
        return None
    status = {"checkpoint": "ok", "trainctl": "trainctl"}.get(facts.status, "incomplete")
    return {"status": status, "step": facts.step, "step_name": facts.step_name, "epoch": facts.epoch,
            "metrics": facts.metrics, "problem": facts.problem}


def _row_label(row: FolderRow) -> str:
    return describe({"display": row.display, "step": row.step, "step_name": row.step_name,
                     "epoch": row.epoch})
