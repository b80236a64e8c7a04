"""The training on the machine: the engine `trainctl local` runs, in a thread of the agent.

The same `Supervisor` over the same `LocalBackend` (pre-flight, restarts with resume,
TRAIN_OPS_*, diagnosis), with two differences a rented machine needs: the script runs on the
prepared interpreter (the image's torch), and forwarded secrets reach its environment alone.
The engine's events come to `AgentEvents`, the seam the sync loop is attached through; the
engine records the session (session.json, events.jsonl, output.log) that the loop mirrors.

The engine runs in a worker thread, so the agent's main thread keeps the signals (a SIGTERM
is a preemption notice for the agent, not a stop for the engine). Stopping goes through the
session store like `trainctl sessions stop`: a stop request, then SIGTERM to the script (its
emergency checkpoint), SIGKILL after the grace period.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..backends.base import LogChunk, RunSpec
from ..launcher.supervisor import EngineEvents, RunResult, Supervisor, restart_policy
from ..session import Session, State


class AgentEvents(EngineEvents):
    """What the engine says, on the machine: status lines to the agent's log (and the session's
    output in storage), the script's output passed through to the boot log, and the sync loop
    attached to the session as soon as an attempt runs."""

    def __init__(self, say: Callable[[str], None], on_attempt: Callable[[Session, int], None],
                 on_end: Callable[[], None]) -> None:
        self.say = say
        self.on_attempt = on_attempt
        self.on_end = on_end

    def message(self, text: str) -> None:
        self.say(text)

    def preflight(self, report: Any) -> None:
        if report.ok and all(r.status == "pass" for r in report.results):
            self.say(f"pre-flight: {len(report.results)} checks passed")
            return
        for line in report.lines():
            self.say(line)

    def attempt_started(self, session: Session, attempt: int) -> None:
        self.on_attempt(session, attempt)

    def output(self, chunk: LogChunk) -> None:
        stream = sys.stderr if chunk.stream == "stderr" else sys.stdout
        try:
            stream.buffer.write(chunk.data)
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def attempts_ended(self, status: State) -> None:
        self.on_end()


class EngineRun:
    """One session of the engine on this machine, started by `start` and watched by `poll`."""

    def __init__(self, python: str, project_dir: Path, script: str, args: Sequence[str], *, events: AgentEvents,
                 resume: str | None = None, env: Mapping[str, str] | None = None, name: str | None = None,
                 nproc_per_node: int | None = None, max_restarts: int | None = None, restart_on: str | None = None,
                 grace_period_s: float = 30.0, preflight: bool = True,
                 node: Mapping[str, Any] | None = None) -> None:
        from .. import config as config_mod

        self.python = python
        self.project_dir = Path(project_dir)
        self.cfg = config_mod.load(self.project_dir)
        self.policy = restart_policy(self.cfg, max_restarts=max_restarts, restart_on=restart_on,
                                     restart_delay_s=None, grace_period_s=grace_period_s)
        resources: dict[str, Any] = {"nproc_per_node": nproc_per_node or 1, **(node or {})}
        self.spec = RunSpec(script=self.project_dir / script, args=tuple(args), resources=resources, resume=resume,
                            name=name, cwd=self.project_dir)
        self.supervisor = Supervisor(self.spec, self.policy, self.cfg, backend="local",
                                     backend_options={"use_pty": False, "python": python, "env": dict(env or {})},
                                     events=events)
        self.preflight = preflight
        self.session: Session | None = None
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def command(self) -> list[str]:
        return [self.python, str(self.spec.script), *self.spec.args]

    def prepare(self) -> Session:
        """Resolve the resume, run the pre-flight checks, create the session (may raise)."""
        self.session = self.supervisor.prepare(preflight=self.preflight)
        return self.session

    def start(self) -> None:
        def run() -> None:
            try:
                self.result = self.supervisor.run()
            except BaseException as e:  # the agent reports it and ends the machine
                self.error = e

        self._thread = threading.Thread(target=run, name="trainctl-engine", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.done()

    def _record(self) -> dict[str, Any]:
        if self.session is None:
            return {}
        try:
            return self.session.read()
        except Exception:
            return {}

    def script_pgid(self) -> int | None:
        """The script's process group (the engine starts each attempt as its leader)."""
        handle = self._record().get("handle")
        pid = (handle or {}).get("ids", {}).get("pid") if isinstance(handle, dict) else None
        return pid if isinstance(pid, int) and pid > 0 else None

    def request_checkpoint(self, signal_name: str) -> bool:
        """`signal_name` to the script, only where its runtime said it takes it as a checkpoint
        request (anything else would die of it). False when not sent."""
        runtime = self._record().get("runtime")
        if not isinstance(runtime, dict) or signal_name not in (runtime.get("checkpoint_signals") or []):
            return False
        pgid = self.script_pgid()
        if pgid is None or self.done():
            return False
        try:
            os.killpg(pgid, getattr(signal, signal_name))
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self, *, now: bool = False, grace_period_s: float | None = None) -> None:
        """Stop like `trainctl sessions stop`: a stop request (no restart), SIGTERM to the script
        (its emergency checkpoint), SIGKILL after the grace period (at once with `now`).
        Returns once the script has ended."""
        from ..launcher.control import stop

        if self.session is None or self.done():
            return
        try:
            stop(self.session, now=now, grace_period_s=self.policy.grace_period_s if grace_period_s is None
                 else grace_period_s, settle_s=1.0)
        except Exception:  # not started yet (no handle): the engine sees the request before launching
            self.session.update(stop_request={"now": now})

    def outcome(self) -> dict[str, Any]:
        """How the engine says the session ended: status, exit code, signal, diagnosis."""
        if self.error is not None:
            return {"status": State.FAILED.value, "exit_code": None, "signal": None,
                    "diagnosis": {"summary": f"the engine failed: {type(self.error).__name__}: {self.error}"}}
        data = self._record()
        if self.result is not None:
            return {"status": str(self.result.outcome.status), "exit_code": self.result.outcome.exit_code,
                    "signal": self.result.outcome.signal, "diagnosis": self.result.diagnosis}
        return {"status": str(data.get("status") or State.FAILED.value), "exit_code": data.get("exit_code"),
                "signal": data.get("signal"), "diagnosis": data.get("diagnosis")}

