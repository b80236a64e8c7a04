"""Child processes that leave no orphan: started in a process group of their own, told when
their launcher dies, and reaped with the group. The local backend starts the script this way,
the network check of a multi-node job its torchrun."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

REAP_GRACE_S = 2.0  # what is left of a child's process group gets this long after SIGTERM
_PR_SET_PDEATHSIG = 1


def reap_group(pgid: int) -> None:
    """Leave no orphan: anything still in the child's process group is stopped, then killed."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + REAP_GRACE_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when the thread that starts it dies.

    The kernel sends the signal when the *thread* that forked exits, so launch() is called from
    a thread that lives as long as the launcher (the engine's main thread). torchrun, which gets
    it here, passes SIGTERM on to its workers itself.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the line above: act as if after
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
