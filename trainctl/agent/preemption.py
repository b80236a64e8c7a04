"""Notices that the machine is going away, behind one small interface.

A `PreemptionWatch` puts `Notice`s on a queue the agent reads (`queue.SimpleQueue`, whose `put`
is safe in a signal handler). Two kinds:

- "interruption": the machine goes away at `deadline_t` (AWS spot `instance-action`, two minutes
  ahead; a SIGTERM, about 5 s ahead on a RunPod interruptible pod): emergency checkpoint,
  upload it if it fits, move latest.json, record `preempted`;
- "rebalance": the risk went up (AWS `events/recommendations/rebalance`): checkpoint now and
  keep training.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

IMDS_DEFAULT = "http://169.254.169.254"
IMDS_ENDPOINT_VARIABLE = "AWS_EC2_METADATA_SERVICE_ENDPOINT"  # the variable botocore honours
TOKEN_TTL_S = 21600
POLL_INTERVAL_S = 5.0
SIGNAL_GRACE_S = 5.0  # RunPod: SIGKILL follows SIGTERM after about 5 s
INTERRUPTION = "interruption"
REBALANCE = "rebalance"
STOP = "stop"


@dataclass(frozen=True)
class Notice:
    """The platform said the machine is at risk: `kind` interruption or rebalance, the platform's
    `action` (terminate, stop, hibernate, SIGTERM, rebalance), the absolute `deadline_t` (unix
    time; None for a rebalance), where it came from and when it arrived."""

    kind: str
    action: str
    deadline_t: float | None
    source: str
    received_t: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def seconds_left(self, now: float | None = None) -> float | None:
        return None if self.deadline_t is None else self.deadline_t - (time.time() if now is None else now)


class PreemptionWatch(ABC):
    """Watches for notices and puts them on `notices`; `start` returns at once."""

    name: str = ""

    @abstractmethod
    def start(self, notices: queue.SimpleQueue[Notice]) -> None: ...

    @abstractmethod
    def stop(self) -> None:
        """Stop watching (idempotent)."""


class SignalWatch(PreemptionWatch):
    """SIGTERM and SIGINT as a notice `grace_s` ahead, of `kind` "interruption" (RunPod: the
    platform stops the pod about 5 s later) or "stop" (EC2, where the platform's notices come
    from IMDS and a SIGTERM is `trainctl aws stop`: checkpoint, sync, end the machine).
    Installs its handlers from the main thread."""

    name = "signal"

    def __init__(self, grace_s: float = SIGNAL_GRACE_S, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                 *, kind: str = INTERRUPTION) -> None:
        self.grace_s = grace_s
        self.signals = signals
        self.kind = kind
        self._previous: dict[int, Any] = {}
        self._notices: queue.SimpleQueue[Notice] | None = None

    def start(self, notices: queue.SimpleQueue[Notice]) -> None:
        self._notices = notices
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):  # not the main thread
                pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        # SimpleQueue.put is reentrant: the one thing a handler may do here
        now = time.time()
        assert self._notices is not None
        self._notices.put(Notice(self.kind, signal.Signals(signum).name, now + self.grace_s, self.name, now))

    def stop(self) -> None:
        for signum, handler in self._previous.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, OSError):
                pass
        self._previous.clear()


def _parse_time(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


class ImdsWatch(PreemptionWatch):
    """AWS: polls IMDSv2 `spot/instance-action` and `events/recommendations/rebalance` every
    `interval_s` (both 404 until there is a notice). Each distinct notice is put once."""

    name = "aws-imds"

    def __init__(self, endpoint: str | None = None, *, interval_s: float = POLL_INTERVAL_S,
                 timeout_s: float = 2.0) -> None:
        self.endpoint = (endpoint or os.environ.get(IMDS_ENDPOINT_VARIABLE) or IMDS_DEFAULT).rstrip("/")
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._token_expires = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: set[str] = set()
        self.errors = 0
        self.last_error: str | None = None
        # bypass any HTTP proxy: IMDS is link-local and a proxy would answer for the wrong machine
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- IMDSv2 -------------------------------------------------------------------------------
    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        request = urllib.request.Request(self.endpoint + path, method=method, headers=headers,
                                         data=b"" if method == "PUT" else None)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.status, response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, ""

    def _get(self, path: str) -> tuple[int, str]:
        now = time.monotonic()
        if self._token is None or now >= self._token_expires:
            status, token = self._request("PUT", "/latest/api/token",
                                          {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            if status != 200 or not token:
                raise ConnectionError(f"IMDS token request answered {status}")
            self._token, self._token_expires = token, now + TOKEN_TTL_S - 60
        status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._token})
        if status == 401:  # the token expired early (a restored snapshot, a clock jump)
            self._token = None
            return self._get(path)
        return status, body

    def poll(self) -> list[Notice]:
        """One look at both paths; the notices not seen before."""
        found = []
        now = time.time()
        status, body = self._get("/latest/meta-data/spot/instance-action")
        if status == 200 and body not in self._seen:
            self._seen.add(body)
            try:
                data = json.loads(body)
            except ValueError:
                data = {}
            action = str(data.get("action") or "terminate")
            deadline = _parse_time(str(data.get("time"))) or now + 120.0
            found.append(Notice(INTERRUPTION, action, deadline, self.name, now))
        status, body = self._get("/latest/meta-data/events/recommendations/rebalance")
        if status == 200 and ("rebalance:" + body) not in self._seen:
            self._seen.add("rebalance:" + body)
            found.append(Notice(REBALANCE, "rebalance", None, self.name, now))
        return found

    def start(self, notices: queue.SimpleQueue[Notice]) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    for notice in self.poll():
                        notices.put(notice)
                except (OSError, ValueError) as e:  # IMDS unreachable for a moment: keep polling
                    self.errors += 1
                    self.last_error = str(e)
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="trainctl-imds-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s * 3)


def open_watches(kind: str, *, interval_s: float = POLL_INTERVAL_S, signal_grace_s: float = SIGNAL_GRACE_S,
                 stop_grace_s: float = 30.0) -> list[PreemptionWatch]:
    """The watches for `kind`: "aws" (IMDS notices; a signal is a stop request), "signal"
    (a signal is an interruption), "none"."""
    from ..errors import UsageError

    if kind == "none":
        return []
    if kind == "signal":
        return [SignalWatch(signal_grace_s)]
    if kind == "aws":
        return [ImdsWatch(interval_s=interval_s), SignalWatch(stop_grace_s, kind=STOP)]
    raise UsageError(f"Unknown preemption watch {kind!r}. Valid: aws, signal, none.",
                     "Use --watch aws on EC2, --watch signal elsewhere.")
