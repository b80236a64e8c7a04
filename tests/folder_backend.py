"""A second Backend for the contract suite, unlike LocalBackend in every way that matters.

Each attempt lives in a folder of its own (as a submitit job does): a detached `sh` runs the
command with its output in `output`, writes the exit status to `status` when it ends, and a
stop's kill deadline is a file too. No state is kept in memory, so any process that has the
handle (the folder's path) sees and controls the attempt exactly as the one that started it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from trainctl import env as env_mod
from trainctl import sysinfo
from trainctl.backends.base import Backend, Description, Handle, LaunchPlan, LogChunk, RunSpec
from trainctl.session import State

ROOT_VARIABLE = "TRAINCTL_FOLDER_BACKEND_ROOT"
# runs the command, records its pid and, when it ends, its exit status; it outlives stop signals
# itself (handlers, not SIG_IGN, so the command still gets the default actions)
WRAPPER = """
import os, signal, subprocess, sys
folder, command = sys.argv[1], sys.argv[2:]
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda *_: None)
def publish(name, text):
    with open(os.path.join(folder, name + ".tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
with open(os.path.join(folder, "output"), "ab") as out:
    child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    publish("child", str(child.pid))
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:
            continue
publish("status", str(code))
"""


class FolderBackend(Backend):
    name = "folder"

    def __init__(self, root: str | None = None) -> None:
        self.root = Path(root or os.environ.get(ROOT_VARIABLE) or Path(tempfile.gettempdir()) / "trainctl-folder-backend")
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # only to reap them

    def plan(self, spec: RunSpec) -> LaunchPlan:
        env = env_mod.LaunchEnv(session_id=spec.session_id or None,
                                session_dir=str(spec.session_dir) if spec.session_dir else None,
                                checkpoint_dir=spec.checkpoint_location, resume=spec.resume,
                                backend="local", config=str(spec.config_path) if spec.config_path else None,
                                ).to_environ()
        return LaunchPlan(backend=self.name, command=(sys.executable, str(spec.script), *spec.args), env=env,
                          cwd=str(spec.cwd or Path.cwd()), resources=dict(spec.resources),
                          output=str(self.root / "<attempt>" / "output"),
                          checkpoint_location=spec.checkpoint_location, details={"root": str(self.root)})

    def launch(self, plan: LaunchPlan, attempt: int) -> Handle:
        folder = Path(tempfile.mkdtemp(prefix=f"attempt{attempt}-", dir=_mkdir(self.root)))
        env = {**os.environ, **plan.env, "TRAIN_OPS_ATTEMPT": str(attempt), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(folder), *plan.command], cwd=plan.cwd,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        handle = Handle(self.name, {"folder": str(folder), "pid": proc.pid,
                                    "start_ticks": sysinfo.process_start_ticks(proc.pid)}, attempt)
        (folder / "handle.json").write_text(json.dumps(handle.to_json()))
        self._children[str(folder)] = proc
        return handle

    def describe(self, handle: Handle) -> Description:
        folder = Path(handle.ids["folder"])
        child = self._children.get(str(folder))
        if child is not None:
            child.poll()  # reap: a zombie counts as gone
        status = _read(folder / "status")
        if status is not None:
            code = int(status)
            if code < 0:
                return Description(State.KILLED, code, signal.Signals(-code).name)
            return Description(State.COMPLETED if code == 0 else State.FAILED, code)
        if sysinfo.pid_alive(handle.ids["pid"], handle.ids.get("start_ticks")):
            kill_at = _read(folder / "kill_at")
            if kill_at is not None and time.time() >= float(kill_at):
                _signal(handle, signal.SIGKILL)
            return Description(State.RUNNING)
        return Description(State.CRASHED)

    def log_iter(self, handle: Handle, since: int = 0, follow: bool = False) -> Iterator[LogChunk]:
        path = Path(handle.ids["folder"]) / "output"
        offset = max(0, since)
        while True:
            ended = not self.describe(handle).running
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                yield LogChunk(offset, data, "output")
                offset += len(data)
                continue
            if ended or not follow:
                return
            time.sleep(0.02)

    def stop(self, handle: Handle, grace_period_s: float, *, signal_name: str = "SIGTERM") -> None:
        if not self.describe(handle).running:
            return
        if grace_period_s <= 0:
            _signal(handle, signal.SIGKILL)
            return
        _signal(handle, getattr(signal, signal_name))
        deadline = Path(handle.ids["folder"]) / "kill_at"
        if not deadline.exists():
            deadline.write_text(str(time.time() + grace_period_s))

    def release(self, handle: Handle) -> None:
        folder = Path(handle.ids["folder"])
        if folder.exists() and self.describe(handle).running:
            _signal(handle, signal.SIGKILL)
            while self.describe(handle).running:
                time.sleep(0.02)
        child = self._children.pop(str(folder), None)
        if child is not None:
            child.wait()
        shutil.rmtree(folder, ignore_errors=True)

    def list(self) -> list[Handle]:
        found = []
        for path in sorted(self.root.glob("*/handle.json")):
            handle = Handle.from_json(json.loads(path.read_text()))
            if self.describe(handle).running:
                found.append(handle)
        return found


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _signal(handle: Handle, signum: int) -> None:
    """Signal the command (not the wrapper, which must live to record how it ended)."""
    child = Path(handle.ids["folder"]) / "child"
    for _ in range(500):  # the wrapper writes it right after starting the command
        if child.exists():
            break
        time.sleep(0.01)
    pid = _read(child)
    if pid is None:
        return
    try:
        os.kill(int(pid), signum)
    except (ProcessLookupError, PermissionError):
        pass
