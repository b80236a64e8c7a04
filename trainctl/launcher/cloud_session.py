"""A session that runs on a rented machine, seen from this one: its local record, its attempts,
and an attached launcher that follows it and recovers it.

The machine runs the engine itself (the agent); here the session is a record (session.json with
the backend's handle, the attempts and their cost) whose output and events the backend mirrors
from storage. An attached launcher shows the output, and within `max_restarts` replaces an
interrupted machine with a new one that resumes from the newest checkpoint in storage. It calls
nothing on a backend outside the Backend interface and prints nothing: what a person should see
goes to the `CloudEvents` it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends.base import Backend, Description, Handle, LaunchPlan, LogChunk, RunSpec
from ..errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, TrainctlError
from ..redact import redact_args
from ..session import TERMINAL, Session, SessionStore, State

LOOK_EVERY_S = 2.0  # between two looks at a machine whose output has stopped


class CloudEvents:
    """What the attached launcher tells whoever watches; every method does nothing here."""

    def message(self, text: str) -> None:
        """A status line ("pod abc provisioning", "restart 1/2: a new pod")."""

    def output(self, chunk: LogChunk) -> None:
        """A piece of the script's output, as storage holds it."""

    def state(self, description: Description) -> None:
        """The machine's state changed (provisioning, running, ...)."""


@dataclass
class CloudEnd:
    """How following a session ended."""

    state: State
    description: Description
    restarts: int
    exit_code: int


def exit_code_for(state: State, exit_code: int | None) -> int:
    """What `trainctl local` would have exited with for the same end."""
    if state is State.COMPLETED:
        return 0
    if state is State.PREEMPTED:
        return EXIT_PREEMPTED
    if state in (State.STOPPED, State.KILLED):
        return EXIT_INTERRUPTED
    return exit_code if isinstance(exit_code, int) and 0 < exit_code < 256 else 1


def create_session(store: SessionStore, spec: RunSpec, plan: LaunchPlan, *, command: list[str],
                   config: dict[str, Any], max_restarts: int, grace_period_s: float) -> Session:
    """The local record of a new cloud session (before anything is launched)."""
    return store.create(
        session_id=spec.session_id, status=State.PENDING, name=spec.name, backend=plan.backend,
        script=str(Path(spec.script).resolve()), args=redact_args(list(spec.args)),
        command=redact_args(command), cwd=str(spec.cwd or Path.cwd()), started_at=time.time(),
        trainctl_config=config, attempts=[], resources=_recordable(spec.resources),
        checkpoint_location=plan.checkpoint_location, storage=plan.details.get("storage"),
        deadline_utc=plan.details.get("deadline_utc"), restart={"max_restarts": max_restarts, "grace_period_s": grace_period_s},
        host=plan.backend, processes=[])


def _recordable(resources: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resources.items() if k not in ("bundle", "attempt", "spent_usd")}


def launch_attempt(backend: Backend, session: Session, plan: LaunchPlan, attempt: int, *,
                   resume: str | None = None) -> Handle:
    """Launch attempt `attempt` and record it (handle, attempt entry) in session.json. A launch
    that fails is recorded as the session's end, then raised."""
    data = session.read()
    attempts = [a for a in data.get("attempts") or [] if isinstance(a, dict)]
    try:
        handle = backend.launch(plan, attempt)
    except Exception as e:
        if not attempts:
            session.update(status=State.FAILED.value, ended_at=time.time(),
                           error=f"launch failed: {getattr(e, 'message', None) or e}")
            session.event("status", status=State.FAILED.value, source="launcher",
                          error=f"launch failed: {e}")
        raise
    attempts.append({"attempt": attempt, "started_at": time.time(), "resume_from": resume,
                     "handle": handle.to_json(), "cost_per_hour_usd": plan.cost_per_hour})
    session.update(status=State.PENDING.value, attempts=attempts, handle=handle.to_json(),
                   resume_from=resume, ended_at=None, exit_code=None, signal=None,
                   stop_request=None, end_reason=None)
    session.event("launch", attempt=attempt, backend=plan.backend, ids=_public_ids(handle))
    return handle


def _public_ids(handle: Handle) -> dict[str, Any]:
    return {k: v for k, v in handle.ids.items() if isinstance(v, (str, int, float)) or v is None}


def close_attempt(session: Session, description: Description) -> None:
    """Keep the ended attempt's cost with it (the next attempt's record starts at zero)."""
    data = session.read()
    attempts = [a for a in data.get("attempts") or [] if isinstance(a, dict)]
    if attempts:
        attempts[-1].setdefault("ended_at", time.time())
        attempts[-1]["status"] = description.state.value
        attempts[-1]["cost_usd"] = description.details.get("cost_usd")
        session.update(attempts=attempts)


def stop_requested(session: Session) -> bool:
    try:
        return bool(session.read().get("stop_request"))
    except Exception:
        return False


def follow(backend: Backend, session: Session, handle: Handle, events: CloudEvents, *,
           max_restarts: int, restart: Callable[[int], Handle], since: int = 0) -> CloudEnd:
    """Show the session's output until its machine ends; an interrupted machine is released
    and `restart(attempt)` launches the next one (within `max_restarts`). KeyboardInterrupt
    leaves the machine running (the caller says how to reattach)."""
    offset = since
    restarts = 0
    seen: tuple[State, str | None] | None = None
    while True:
        try:
            for chunk in backend.log_iter(handle, since=offset, follow=False):
                offset = chunk.offset + len(chunk.data)
                events.output(chunk)
            described = backend.describe(handle)
        except TrainctlError as e:  # storage or the provider API unreachable for a while
            events.message(f"could not look at attempt {handle.attempt}: {e}; trying again")
            time.sleep(LOOK_EVERY_S)
            continue
        now = (described.state, (described.details.get("pod") or {}).get("state"))
        if now != seen:
            seen = now
            events.state(described)
        if described.running:
            time.sleep(LOOK_EVERY_S)
            continue
        for chunk in backend.log_iter(handle, since=offset, follow=False):  # the last sync
            offset = chunk.offset + len(chunk.data)
            events.output(chunk)
        close_attempt(session, described)
        if described.state is State.PREEMPTED and not stop_requested(session) and restarts < max_restarts:
            restarts += 1
            events.message(f"attempt {handle.attempt} ended: {described.details.get('why')}; "
                           f"restart {restarts}/{max_restarts}: releasing it and starting a new "
                           "machine that resumes from the newest checkpoint in storage")
            backend.release(handle)
            session.event("restart", attempt=handle.attempt + 1, reason=str(described.details.get("why")))
            handle = restart(handle.attempt + 1)
            seen = None
            continue
        if described.state in TERMINAL or described.state is State.CRASHED:
            backend.release(handle)  # nothing of an ended session keeps billing
        if described.state is State.PREEMPTED and max_restarts:
            events.message(f"giving up after {max_restarts} restart(s)")
        data = session.read()
        state = State(data.get("status")) if data.get("status") in [s.value for s in State] else described.state
        return CloudEnd(state, described, restarts, exit_code_for(state, data.get("exit_code")))


def terminate(backend: Backend, session: Session, handle: Handle) -> bool:
    """End the session's machine now (no emergency checkpoint); the session ends `killed` if it
    had not ended. Returns whether the session was still running."""
    backend.release(handle)
    data = session.read()
    if data.get("status") in [s.value for s in TERMINAL]:
        return False
    session.update(status=State.KILLED.value, ended_at=time.time(),
                   end_reason="terminated by trainctl (no emergency checkpoint)")
    session.event("status", status=State.KILLED.value, source="launcher", why="terminated")
    return True


def launched_here(store: SessionStore, ref: str) -> Session | None:
    """The session `ref` names when it was launched from this project onto a cloud machine
    (its record has the machine's handle and the session's storage URI), else None."""
    from ..errors import NotFoundError

    if "/" in ref or "://" in ref:
        return None
    try:
        session = store.get(ref)
        data = session.read()
    except NotFoundError:
        return None
    handle = data.get("handle") if isinstance(data.get("handle"), dict) else {}
    if data.get("pulled_at") or not data.get("storage") or handle.get("backend") in (None, "local"):
        return None
    return session


def pull_launched(session: Session, remote: Any, *, checkpoint_dir: Path | None) -> list[str]:
    """`sessions pull` of a session launched from here: its backend brings the record, output
    and events up to date; with `checkpoint_dir`, the newest checkpoint in storage (as
    latest.json names it, verified) is downloaded into `<checkpoint_dir>/<session id>/`."""
    from .control import refresh

    refresh(session)
    data = session.read()
    lines = [f"Session {session.id} ({data.get('status')}) was launched from here: its record, output and "
             f"events are up to date from {data.get('storage')}."]
    if checkpoint_dir is not None:
        latest = remote.latest_checkpoint()
        if latest is None:
            lines.append("No checkpoint is in storage yet.")
        else:
            path = remote.fetch_checkpoint(Path(checkpoint_dir) / session.id, latest)
            lines.append(f"Newest checkpoint (step {latest.get('step')}) downloaded and verified: {path}")
    return lines
