"""The watch over the other machines of a multi-node job (the head's, and the head's machine for the others).

A lost machine (crashed, terminated, stopped) makes the collectives fail on every other node,
but torchrun only gives up after its rendezvous timeout, minutes later. The head's agent asks
the platform about the job's machines instead, and when one is gone it stops the job everywhere
at once: the script's emergency checkpoint where the ranks can still agree on it, the session
recorded failed with the lost node named, and the other nodes stop on seeing the session end.
The other nodes watch the head's machine the same way: a lost head records nothing, so they
stop their part and end their own machines.

When the platform replaces a lost node (spot nodes, one EC2 Fleet of type maintain each), the
job runs in rounds instead: the session stays running, the head waits for the replacement to
check in, and the next round resumes from the newest checkpoint in storage. Each round's watch
knows the machine of each rank it runs on: another machine in its place means it is gone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping

from .preemption import Notice, PreemptionWatch

NODE_LOST = "node_lost"
GONE_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})

# node rank -> (machine id, state), as the platform reports them; raises OSError when it can't be asked
NodeLook = Callable[[], Mapping[int, tuple[str, str]]]


class NodesWatch(PreemptionWatch):
    """Asks `look` every `interval_s` for the job's machines; puts one NODE_LOST notice for the
    first of `ranks` (the head watches nodes 1..nnodes-1, the others watch the head) that is gone
    or missing. A failed look is counted, not acted on."""

    name = "nodes"

    def __init__(self, look: NodeLook, nnodes: int, *, ranks: tuple[int, ...] | None = None,
                 interval_s: float = 15.0, expected: Mapping[int, str] | None = None) -> None:
        self.look = look
        # rank -> the machine this round runs on: another machine in its place (its fleet's
        # replacement) means the one of this round is gone
        self.expected = dict(expected or {})
        self.nnodes = nnodes
        self.ranks = tuple(range(1, nnodes)) if ranks is None else ranks
        self.interval_s = interval_s
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent = False

    def poll(self) -> Notice | None:
        machines = self.look()
        for rank in self.ranks:
            machine_id, state = machines.get(rank, ("?", "missing"))
            expected = self.expected.get(rank)
            if expected and machine_id not in (expected, "?"):
                return Notice(NODE_LOST, f"node {rank} of {self.nnodes} ({expected}) is gone, replaced by {machine_id}",
                              None, self.name, time.time())
            if state in GONE_STATES or state == "missing":
                return Notice(NODE_LOST, f"node {rank} of {self.nnodes} ({machine_id}) is {state}", None, self.name,
                              time.time())
        return None

    def start(self, notices: queue.SimpleQueue[Notice]) -> None:
        def loop() -> None:
            while not self._stop.is_set() and not self._sent:
                try:
                    notice = self.poll()
                except Exception as e:  # the platform's API unreachable for a moment: keep looking
                    self.errors += 1
                    self.last_error = str(e)
                    notice = None
                if notice is not None:
                    self._sent = True
                    notices.put(notice)
                    return
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="trainctl-nodes-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
