"""One writer per session: numbered leases in storage, taken with a create-only write.

A writer (an agent, or a local run synced to storage) owns the session while the newest lease
`leases/<term>.json` is its own. To take over, a newcomer creates lease `term + 1` with
`If-None-Match: *`, so of two newcomers exactly one gets it; it may do so only once the current
holder is gone: its heartbeat (`heartbeat.json` naming the term) was released, or is older than
`ttl_s`. A holder that finds a newer lease than its own has lost the session and must stop
writing; `latest.json` moves with `If-Match` besides, so a writer that missed the news still
cannot move it behind the new owner's back.

Clocks: freshness compares the heartbeat's own time with this machine's clock; keep `ttl_s` well
above any clock skew between machines (NTP keeps cloud machines within a second).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..errors import TrainctlError
from ..storage import ConditionalWriteError, ObjectNotFoundError
from ..storage.remote import RemoteSession

LEASE_TTL_S = 120.0  # a holder that has not beaten for this long is gone (heartbeats: every 30 s)


class LeaseLostError(TrainctlError):
    """Another writer holds this session (or took it over): this one must stop writing."""

    def __init__(self, message: str, hint: str | None = None, *, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint or "Only one machine may write a session; this one stops and ends itself.")
        self.holder = holder


class Lease:
    """This writer's claim on one session."""

    def __init__(self, remote: RemoteSession, *, ttl_s: float = LEASE_TTL_S,
                 clock: Callable[[], float] = time.time, **owner: Any) -> None:
        self.remote = remote
        self.ttl_s = ttl_s
        self.clock = clock
        self.owner = owner
        self.term: int | None = None
        self.lost = False

    # --- who holds it -------------------------------------------------------------------------
    def holder(self) -> tuple[int, dict[str, Any]] | None:
        """The newest lease: (term, record)."""
        record = self.remote.current_lease()
        if not isinstance(record, dict) or not isinstance(record.get("attempt"), int):
            return None
        return record["attempt"], record

    def holder_alive(self, term: int, record: dict[str, Any]) -> bool:
        """The holder of `term` still counts: not released, and beaten (or leased) within ttl_s."""
        beat = self.remote.read_heartbeat()
        if isinstance(beat, dict) and beat.get("term") == term:
            if beat.get("released"):
                return False
            last = beat.get("t")
        else:
            last = record.get("t")
        return isinstance(last, (int, float)) and self.clock() - last < self.ttl_s

    # --- taking and keeping it ------------------------------------------------------------------
    def acquire(self, *, wait_s: float = 0.0, poll_s: float = 2.0) -> int:
        """Take the session; wait up to `wait_s` for a live holder to go (a machine still
        flushing after a preemption notice). LeaseLostError when it does not go."""
        deadline = self.clock() + wait_s
        while True:
            current = self.holder()
            if current is None:
                term = 0
            else:
                held, record = current
                if self.holder_alive(held, record):
                    if self.clock() >= deadline:
                        raise LeaseLostError(
                            f"Session {self.remote.uri} is written by another machine "
                            f"({record.get('host')}, lease {held}, alive within {self.ttl_s:g} s).",
                            holder=record)
                    time.sleep(min(poll_s, max(0.05, deadline - self.clock())))
                    continue
                term = held + 1
            try:
                self.remote.acquire_lease(term, **self.owner)
            except ConditionalWriteError:
                continue  # another newcomer took this term first: it is the holder now
            self.term = term
            return term

    def check(self) -> bool:
        """Still ours: no newer lease was taken. Sets `lost` when one was."""
        if self.term is None or self.lost:
            return False
        try:
            current = self.holder()
        except ObjectNotFoundError:
            return True
        if current is not None and current[0] > self.term:
            self.lost = True
        return not self.lost

    def beat(self, **fields: Any) -> None:
        """Write heartbeat.json for this term (the agent is alive, where training stands)."""
        if self.term is None:
            return
        self.remote.heartbeat(term=self.term, **{"attempt": 0, **fields})

    def release(self, **fields: Any) -> None:
        """A last heartbeat saying this writer is done: a newcomer need not wait out the ttl."""
        if self.term is None or self.lost:
            return
        self.remote.heartbeat(term=self.term, released=True, **{"attempt": 0, **fields})
