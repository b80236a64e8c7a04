"""The training on the machine: `trainctl local` itself, on the prepared interpreter.

The agent runs the same engine as on a laptop (pre-flight, restarts with resume, TRAIN_OPS_*,
diagnosis), as a child in its own process group, in the extracted project. What the engine
records (its session: session.json, events.jsonl, output.log) is what the sync loop mirrors;
`find_session` finds it by the child's pid in the session's `processes`.

Stopping: SIGTERM to the engine, which forwards it to the script (emergency checkpoint) and
kills after its grace period; a request for a checkpoint without stopping is the runtime's
checkpoint signal, sent to the script's process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import EXIT_PREEMPTED


class EngineProcess:
    """`<python> -m trainctl local [OPTIONS] SCRIPT ARGS` in `project_dir`."""

    def __init__(self, python: str, project_dir: Path, script: str, args: Sequence[str], *,
                 resume: str | None = None, engine_options: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, state_dir: Path | None = None) -> None:
        self.python = python
        self.project_dir = Path(project_dir)
        self.script = script
        self.args = list(args)
        self.resume = resume
        self.engine_options = list(engine_options)
        self.env = dict(os.environ if env is None else env)
        self.state_dir = state_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.session_dir: Path | None = None
        self.started_t: float | None = None

    @property
    def command(self) -> list[str]:
        command = [self.python, "-m", "trainctl", "local", *self.engine_options]
        if self.resume:
            command += ["--resume", self.resume]
        return [*command, self.script, *self.args]

    def start(self) -> None:
        self.started_t = time.time()
        self.proc = subprocess.Popen(self.command, cwd=self.project_dir, env={**self.env, "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def find_session(self) -> Path | None:
        """The engine's session directory, once it has made one (None until then)."""
        if self.session_dir is not None or self.state_dir is None or self.proc is None:
            return self.session_dir
        sessions = self.state_dir / "sessions"
        try:
            candidates = sorted((p for p in sessions.iterdir() if p.is_dir()), reverse=True)
        except FileNotFoundError:
            return None
        for folder in candidates:
            try:
                data = json.loads((folder / "session.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (data.get("created_at") or 0) < (self.started_t or 0) - 1:
                break  # sorted newest first: the rest are older than this run
            if any(isinstance(p, dict) and p.get("pid") == self.proc.pid for p in data.get("processes") or []):
                self.session_dir = folder
                return folder
        return None

    def script_pids(self) -> list[int]:
        """The script's processes as the engine recorded them."""
        if self.session_dir is None:
            return []
        try:
            data = json.loads((self.session_dir / "session.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [p["pid"] for p in data.get("processes") or []
                if isinstance(p, dict) and p.get("role") == "script" and isinstance(p.get("pid"), int)]

    def signal_script(self, signum: int) -> bool:
        """Send `signum` to the script's process group (a checkpoint request); False when there
        is no script running."""
        sent = False
        for pid in self.script_pids():
            try:
                os.killpg(os.getpgid(pid), signum)
                sent = True
            except (ProcessLookupError, PermissionError):
                continue
        return sent

    def stop(self) -> None:
        """SIGTERM to the engine: it forwards it to the script, which writes its emergency
        checkpoint; the engine kills after its grace period."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL to the engine and the script's process groups (nothing left running)."""
        pids = self.script_pids()
        if self.proc is not None:
            pids.append(self.proc.pid)
        for pid in pids:
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def wait(self, timeout_s: float | None = None) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def outcome(self) -> dict[str, Any]:
        """How the engine says the session ended: status, exit code, signal, diagnosis."""
        data: dict[str, Any] = {}
        if self.session_dir is not None:
            try:
                data = json.loads((self.session_dir / "session.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
        code = self.poll()
        status = data.get("status")
        if status in (None, "running", "pending"):
            status = "completed" if code == 0 else "preempted" if code == EXIT_PREEMPTED else "failed"
        return {"status": status, "exit_code": data.get("exit_code", code), "engine_exit_code": code,
                "signal": data.get("signal"), "diagnosis": data.get("diagnosis")}
