"""The code a cloud machine runs: the project's files as a deterministic tar.gz with a sha256
digest, a wheel of trainctl itself, and an extraction that verifies and refuses unsafe paths.

Which files: in a git work tree, what git would commit (`git ls-files --cached --others
--exclude-standard`: tracked files plus untracked ones not ignored). Elsewhere, the folder minus
`.git`, `.trainctl/`, checkpoint folders, virtual environments (any folder with `pyvenv.cfg`),
caches (`__pycache__`, `.pytest_cache`, ...) and experiment logs (`wandb/`, `mlruns/`,
`lightning_logs/`). Either way `.trainctlignore` (gitignore syntax: globs, `**`, a trailing `/`
for folders, a leading `/` to anchor, `!` to re-include) removes more, and an untracked file
over `max_file_mb` (data, weights) is left out unless a `!` line or `include` names it; the
summary lists what was left out and why.

Same files, same bytes: entries sorted, times zeroed, owners and permissions normalised (0644,
0755 when executable), the gzip header without a name or time.

The wheel is built with the standard library from the trainctl package being run (a zip with
METADATA, WHEEL, RECORD, entry points): no build backend, no index, ~50 ms; `pip install` takes
it on the machine (the machine has no trainctl, and PyPI is not where it comes from).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import re
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..fsutil import fsync_dir, temp_beside
from .base import check_digest, sha256_file
from .errors import IntegrityError, UnsafeBundleError

IGNORE_FILE = ".trainctlignore"
MAX_FILE_MB = 50.0
EXCLUDED_DIRS = frozenset({
    ".git", ".hg", ".svn", ".trainctl", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".ipynb_checkpoints", ".tox", ".nox", ".cache", "node_modules", ".venv", "venv", "checkpoints",
    "wandb", "mlruns", "lightning_logs",
})
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
EXCLUDED_NAMES = frozenset({".DS_Store"})
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


# --- .trainctlignore ------------------------------------------------------------------------------

def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    anchored: bool

    def matches(self, rel: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        return bool(self.regex.fullmatch(rel if self.anchored else rel.rsplit("/", 1)[-1]))


class IgnoreRules:
    """gitignore-style rules; a path is ignored when the last rule matching it (or a folder
    above it, which no later rule can undo) ignores it."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self.rules: list[_Rule] = []
        for raw in lines:
            line = raw.rstrip("\n").rstrip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line[1:] if negate else line
            line = line[1:] if line.startswith("\\") else line
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            anchored = "/" in line
            line = line.lstrip("/")
            if line:
                self.rules.append(_Rule(re.compile(_glob_regex(line)), negate, dir_only, anchored))

    @classmethod
    def read(cls, root: Path) -> IgnoreRules:
        try:
            return cls((root / IGNORE_FILE).read_text(encoding="utf-8").splitlines())
        except FileNotFoundError:
            return cls()

    def _decide(self, rel: str, is_dir: bool) -> bool | None:
        decision = None
        for rule in self.rules:
            if rule.matches(rel, is_dir):
                decision = not rule.negate
        return decision

    def ignored(self, rel: str) -> bool:
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            if self._decide("/".join(parts[:depth]), True):
                return True
        return bool(self._decide(rel, False))

    def listed(self, rel: str) -> bool:
        """Named by a `!` rule: included even over the size limit."""
        return self._decide(rel, False) is False


# --- choosing the files ---------------------------------------------------------------------------

def _git_files(root: Path) -> tuple[list[str], set[str]] | None:
    """(every file git would commit under `root`, the untracked ones), or None outside git."""
    def ls(*args: str) -> list[str] | None:
        try:
            out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return [p for p in out.stdout.decode("utf-8", "surrogateescape").split("\0") if p] if out.returncode == 0 else None

    tracked = ls("--cached")
    untracked = ls("--others", "--exclude-standard")
    if tracked is None or untracked is None:
        return None
    return sorted(set(tracked) | set(untracked)), set(untracked)


def _walk_files(root: Path, excluded: set[str]) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and prefix + d not in excluded
                         and not (Path(folder) / d / "pyvenv.cfg").exists())
        found += [prefix + f for f in files]
    return sorted(found)


@dataclass
class Bundle:
    """A built bundle: the archive, its digest, what it holds and what was left out."""

    path: Path
    sha256: str
    files: list[tuple[str, int]]  # (path inside the project, bytes), in archive order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    git: bool = False

    @property
    def file_count(self) -> int:
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def compressed_bytes(self) -> int:
        return self.path.stat().st_size

    def largest(self, n: int = 5) -> list[tuple[str, int]]:
        return sorted(self.files, key=lambda f: (-f[1], f[0]))[:n]

    def summary(self, largest: int = 5) -> dict[str, Any]:
        """What a launch plan shows: file count, sizes, the largest files, what was left out."""
        return {"files": self.file_count, "bytes": self.total_bytes, "compressed_bytes": self.compressed_bytes,
                "sha256": self.sha256, "source": "git" if self.git else "folder",
                "largest": [{"path": p, "bytes": s} for p, s in self.largest(largest)],
                "skipped": [{"path": p, "why": w} for p, w in self.skipped]}


def select_files(root: str | os.PathLike[str], *, max_file_mb: float = MAX_FILE_MB,
                 exclude: Iterable[str] = (), include: Iterable[str] = ()) -> tuple[list[tuple[str, int]], list[tuple[str, str]], bool]:
    """(files with sizes, files left out with why, whether git chose them) for a project at
    `root`. `exclude`: folders relative to root to leave out as well (the state and checkpoint
    folders from trainctl.toml); `include`: files to keep even over `max_file_mb`."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise UsageError(f"Project folder {root} does not exist.", "Run from the project, or pass its path.")
    rules = IgnoreRules.read(root)
    excluded = {e.strip("/") for e in exclude if e.strip("/")}
    included = set(include)
    limit = max_file_mb * (1 << 20)
    listed = _git_files(root)
    git = listed is not None
    candidates, untracked = listed if listed is not None else (_walk_files(root, excluded), None)
    files, skipped = [], []
    for rel in candidates:
        parts = rel.split("/")
        if any(p in (".git", ".trainctl") for p in parts[:-1]) or any(rel == e or rel.startswith(e + "/") for e in excluded):
            continue
        if parts[-1] in EXCLUDED_NAMES or parts[-1].endswith(EXCLUDED_SUFFIXES):
            continue
        if rules.ignored(rel):
            skipped.append((rel, IGNORE_FILE))
            continue
        try:
            st = os.lstat(root / rel)
        except FileNotFoundError:
            continue  # deleted, still in git's index
        if stat.S_ISLNK(st.st_mode):
            target = (root / rel).parent / os.readlink(root / rel)
            if os.path.isabs(os.readlink(root / rel)) or not _inside(root, target):
                skipped.append((rel, "symlink out of the project"))
                continue
        elif not stat.S_ISREG(st.st_mode):
            continue  # a submodule's folder, a socket, a fifo
        over = st.st_size > limit and not (rel in included or rules.listed(rel))
        if over and (untracked is None or rel in untracked):
            skipped.append((rel, f"over {max_file_mb:g} MB (name it with !{rel} in {IGNORE_FILE} to include it)"))
            continue
        files.append((rel, 0 if stat.S_ISLNK(st.st_mode) else st.st_size))
    return files, skipped, git


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def build_bundle(root: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                 max_file_mb: float = MAX_FILE_MB, exclude: Iterable[str] = (),
                 include: Iterable[str] = ()) -> Bundle:
    """Write the project at `root` as a deterministic tar.gz at `out_path` (atomically)."""
    root = Path(root).resolve()
    files, skipped, git = select_files(root, max_file_mb=max_file_mb, exclude=exclude, include=include)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with temp_beside(out) as tmp:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
                    tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel, _size in files:
                    path = root / rel
                    st = os.lstat(path)
                    info = tarfile.TarInfo(rel)
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    if stat.S_ISLNK(st.st_mode):
                        info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
                        tar.addfile(info)
                        continue
                    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                    info.size = st.st_size
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    fsync_dir(out.parent)
    return Bundle(out, sha256_file(out)[0], files, skipped, git)


# --- extraction -----------------------------------------------------------------------------------

def _refuse(archive: Path, name: str, why: str) -> UnsafeBundleError:
    return UnsafeBundleError(f"Bundle {archive} holds {name!r}, which {why}.",
                             "Nothing outside the target folder was written; rebuild the bundle from the project.",
                             uri=str(archive))


def extract_bundle(archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, sha256: str) -> list[str]:
    """Verify the archive against `sha256`, then extract it into `dest`. Refuses (before
    writing anything) absolute paths, '..', links, devices, and symlinks that point or lead
    out of `dest`. Returns the paths extracted."""
    check_digest(sha256)
    archive = Path(archive)
    actual = sha256_file(archive)[0]
    if actual != sha256:
        raise IntegrityError(f"Bundle {archive} does not match its digest ({actual[:19]}... != {sha256[:19]}...).",
                             "It was damaged in transfer or replaced; upload the bundle again.", uri=str(archive))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    real_dest = os.path.realpath(dest)
    with tarfile.open(archive, mode="r:gz") as tar:
        members = tar.getmembers()
        links: dict[str, str] = {}
        for m in members:
            name = m.name
            parts = name.split("/")
            if (not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts
                    or "\\" in name or "\x00" in name):
                raise _refuse(archive, name, "is not a relative path inside the project")
            if not (m.isreg() or m.isdir() or m.issym()):
                raise _refuse(archive, name, "is a hard link, device or fifo")
            for depth in range(1, len(parts)):
                if "/".join(parts[:depth]) in links:
                    raise _refuse(archive, name, "is written through a symlink")
            if m.issym():
                target = os.path.normpath(os.path.join(real_dest, os.path.dirname(name), m.linkname))
                if os.path.isabs(m.linkname) or not (target == real_dest or target.startswith(real_dest + os.sep)):
                    raise _refuse(archive, name, f"is a symlink out of the folder ({m.linkname})")
                links[name] = m.linkname
        extracted = []
        for m in members:
            target = dest / m.name
            if not _inside(dest, target.parent if m.issym() else target):
                raise _refuse(archive, m.name, "would land outside the folder")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            if m.issym():
                os.symlink(m.linkname, target)
            else:
                source = tar.extractfile(m)
                assert source is not None
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                             0o755 if m.mode & 0o111 else 0o644)
                with os.fdopen(fd, "wb") as out, source:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
            extracted.append(m.name)
    return extracted


# --- a wheel of trainctl ----------------------------------------------------------------------------

def _project_metadata(package_dir: Path) -> tuple[list[str], dict[str, str], str]:
    """(core requirements, console scripts, requires-python) from the source tree's
    pyproject.toml, else from the installed distribution's metadata."""
    pyproject = package_dir.parent / "pyproject.toml"
    if pyproject.is_file():
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        data = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        if data.get("name") == "trainctl":
            return (list(data.get("dependencies", [])), dict(data.get("scripts", {})),
                    data.get("requires-python", ""))
    from importlib import metadata

    dist = metadata.distribution("trainctl")
    requires = [r for r in dist.requires or [] if "extra ==" not in r]
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    return requires, scripts, dist.metadata.get("Requires-Python", "")


def build_wheel(out_dir: str | os.PathLike[str]) -> tuple[Path, str]:
    """A py3-none-any wheel of the trainctl package this process imports; returns (path, sha256).
    Deterministic: the same sources give the same bytes."""
    import trainctl

    package_dir = Path(trainctl.__file__).resolve().parent
    version = trainctl.__version__
    requires, scripts, requires_python = _project_metadata(package_dir)
    dist_info = f"trainctl-{version}.dist-info"
    entries: list[tuple[str, bytes]] = []
    for path in sorted(package_dir.rglob("*")):
        rel = path.relative_to(package_dir.parent).as_posix()
        if path.is_file() and "__pycache__" not in path.parts and (path.suffix == ".py" or path.name == "py.typed"):
            entries.append((rel, path.read_bytes()))
    metadata_lines = ["Metadata-Version: 2.1", "Name: trainctl", f"Version: {version}",
                      "Summary: Run PyTorch training scripts safely anywhere."]
    if requires_python:
        metadata_lines.append(f"Requires-Python: {requires_python}")
    metadata_lines += [f"Requires-Dist: {r}" for r in requires]
    entries.append((f"{dist_info}/METADATA", ("\n".join(metadata_lines) + "\n").encode()))
    entries.append((f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: trainctl\nRoot-Is-Purelib: true\n"
                                          b"Tag: py3-none-any\n"))
    if scripts:
        body = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(scripts.items()))
        entries.append((f"{dist_info}/entry_points.txt", body.encode()))
    record = io.StringIO()
    for name, data in entries:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{name},sha256={digest},{len(data)}\n")
    record.write(f"{dist_info}/RECORD,,\n")
    entries.append((f"{dist_info}/RECORD", record.getvalue().encode()))
    out = Path(out_dir) / f"trainctl-{version}-py3-none-any.whl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with temp_beside(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
        os.replace(tmp, out)
    return out, sha256_file(out)[0]
