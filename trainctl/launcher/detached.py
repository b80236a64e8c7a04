"""A run that does not need its terminal: the engine in a background process of its own.

`start()` is called once the session exists (the resume resolved, the pre-flight checks passed,
in the foreground where their errors can be seen). It starts `python -m trainctl.launcher.detached`
as a session leader with no terminal, its stdout and stderr appended to the session's
output.log, and hands it the spec through a pipe (never a file: the arguments may hold
secrets). That process runs the same engine as `trainctl local`; status lines go to output.log,
progress to the session's events, and it records the end in session.json. With `sync` (`local
--sync URI --detach`) it mirrors the session to storage as the foreground run does, under the
lease the foreground took (`claim_sync`), so a storage that can't be written fails at the prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import config as config_mod
from .. import sysinfo
from ..backends.base import LogChunk, RunSpec
from ..session import Session
from .supervisor import EngineEvents, RestartPolicy, Supervisor


class LogEvents(EngineEvents):
    """A detached engine's status lines, appended to the session's output.log."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def message(self, text: str) -> None:
        fd = os.open(self.session.output_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"[trainctl] {text}\n".encode())
        finally:
            os.close(fd)

    def output(self, chunk: LogChunk) -> None:
        pass  # the backend already keeps the output in output.log


def start(supervisor: Supervisor, *, sync: dict[str, Any] | None = None) -> int:
    """Start the engine for `supervisor`'s prepared session in the background; its pid. `sync`:
    {"storage", "project", "lease_term"} to mirror the session to storage while it runs."""
    session = supervisor.session
    assert session is not None, "prepare() the supervisor first"
    spec = supervisor.spec
    payload = {
        "session_dir": str(session.dir), "backend": supervisor.backend_name,
        "backend_options": supervisor.backend_options, "parent": supervisor.parent,
        "policy": asdict(supervisor.policy),
        "spec": {"script": str(spec.script), "args": list(spec.args), "resources": spec.resources,
                 "resume": spec.resume, "name": spec.name, "cwd": str(spec.cwd or Path.cwd())},
        "sync": sync,
    }
    with open(session.output_log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "trainctl.launcher.detached"], stdin=subprocess.PIPE,
                                stdout=log, stderr=log, start_new_session=True, cwd=os.getcwd(),
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(payload).encode())
    proc.stdin.close()
    # recorded now, so the session never looks crashed between this process's exit and the
    # background engine's start
    session.update(detached=True, processes=[
        {"pid": proc.pid, "start_ticks": sysinfo.process_start_ticks(proc.pid), "role": "launcher"}])
    return proc.pid


def main() -> int:
    payload: dict[str, Any] = json.loads(sys.stdin.buffer.read() or b"{}")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    session = Session(Path(payload["session_dir"]))
    cfg = config_mod.Config.from_resolved(session.config_path)
    raw = payload["spec"]
    spec = RunSpec(script=Path(raw["script"]), args=tuple(raw["args"]), resources=dict(raw["resources"]),
                   resume=raw.get("resume"), name=raw.get("name"), cwd=Path(raw["cwd"]))
    policy = RestartPolicy(**{**payload["policy"], "restart_on": tuple(payload["policy"]["restart_on"])})
    supervisor = Supervisor(spec, policy, cfg, backend=payload["backend"],
                            backend_options=payload.get("backend_options") or {},
                            events=LogEvents(session), parent=payload.get("parent"))
    supervisor.session = session
    sync = payload.get("sync")
    if not sync:
        return supervisor.run().exit_code
    return _run_synced(supervisor, session, cfg, sync)


def _run_synced(supervisor: Supervisor, session: Session, cfg: Any, sync: dict[str, Any]) -> int:
    """The run mirrored to storage, as `trainctl local --sync` does in the foreground."""
    from ..agent.sync import synced

    events = LogEvents(session)
    with synced(session, sync["storage"], project=sync["project"], cfg=cfg,
                lease_term=int(sync["lease_term"])) as loop:
        events.message(f"syncing to {loop.remote.uri}")
        result = supervisor.run()
    events.message(f"synced: {len(loop.uploaded)} checkpoint(s) uploaded"
                   + (f", latest {loop.uploaded[-1]['file']}" if loop.uploaded else "") + f" ({loop.remote.uri})")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
