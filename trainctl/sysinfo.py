"""Facts about where a run happens: git state, host, versions, GPUs. Cheap; no heavy imports."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any


def git_info(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """{'commit', 'dirty', 'branch'} of the repository holding `cwd`, or None outside one."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):  # no git installed, or it hung
        return None
    if out.returncode != 0:
        return None
    commit = branch = None
    dirty = False
    for line in out.stdout.splitlines():
        if line.startswith("# branch.oid "):
            commit = line.split()[-1]
        elif line.startswith("# branch.head "):
            branch = line.split()[-1]
        elif line and not line.startswith("#"):
            dirty = True
    if commit in (None, "(initial)"):
        commit = None
    return {"commit": commit, "dirty": dirty, "branch": branch}


def host() -> str:
    return platform.node()


def python_version() -> str:
    return platform.python_version()


@lru_cache(maxsize=1)
def torch_version() -> str | None:
    """torch's version without importing it."""
    mod = sys.modules.get("torch")
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)  # torch's TorchVersion is a str subclass weights_only refuses
    # the dist-info folder name carries the version: a directory listing, not importlib.metadata's
    # ~20 ms import and scan (this runs in the launcher, on every start)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith("torch-") and name.endswith(".dist-info"):
                return name[len("torch-"):-len(".dist-info")]
    return None


def gpu_description() -> list[dict[str, Any]]:
    """Visible GPUs. Uses torch only when the process already imported it; else nvidia-smi."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                gpus = []
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    gpus.append({"index": i, "name": p.name,
                                 "memory_gb": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}",
                                 "cuda": str(torch.version.cuda)})
                return gpus
            return []
        except Exception:  # a broken driver must not break a checkpoint
            return []
    return _nvidia_smi()


@lru_cache(maxsize=1)
def _nvidia_smi() -> list[dict[str, Any]]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            try:
                gpus.append({"index": int(parts[0]), "name": parts[1],
                             "memory_gb": round(float(parts[2]) / 1024, 1), "driver": parts[3]})
            except ValueError:
                continue
    return gpus


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell a live pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start_ticks is not None:
        now = process_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False
        if now is None and Path("/proc").is_dir():
            return False
    # a zombie child is not alive for our purposes
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    except (OSError, IndexError):
        pass
    return True
