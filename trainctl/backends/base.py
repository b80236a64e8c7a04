"""The one interface every place-to-run implements, and the plain data that crosses it.

The engine (`trainctl.launcher`) calls nothing on a backend outside `Backend`: `plan` builds a
`LaunchPlan` without side effects (what `--dry-run` shows), `launch` starts one attempt and
returns a `Handle` at once, and every later call takes that handle, which is plain data kept in
session.json so that any process can reattach to the attempt (torchx's `Scheduler`, submitit's
`Job(folder, job_id)`). Backends are found by name in `BACKENDS` and imported on first use.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import NotFoundError, TrainctlError, UsageError
from ..redact import redact_args, redact_mapping
from ..session import State

# name -> "module:Class", imported on first use so the CLI stays fast (torchx-style registry)
BACKENDS: dict[str, str] = {
    "local": "trainctl.backends.local:LocalBackend",
    "aws": "trainctl.backends.aws:AwsBackend",
    "runpod": "trainctl.backends.runpod:RunPodBackend",
}


@dataclass(frozen=True)
class RunSpec:
    """Everything needed to run a script once; a restart is the same spec with another resume.

    `args` are the script's arguments as this attempt gets them (the engine adds the resume
    flag); `session_id`, `session_dir` and `checkpoint_location` say where the attempt records.
    """

    script: Path
    args: tuple[str, ...] = ()
    resources: dict[str, Any] = field(default_factory=dict)  # nproc_per_node, gpus, ...
    resume: str | None = None
    name: str | None = None
    session_id: str = ""
    session_dir: Path | None = None
    checkpoint_location: str | None = None
    config_path: Path | None = None
    cwd: Path | None = None

    @property
    def nproc_per_node(self) -> int:
        return int(self.resources.get("nproc_per_node", 1))


@dataclass(frozen=True)
class LaunchPlan:
    """What `launch` will do, decided without doing anything: the dry run is this object."""

    backend: str
    command: tuple[str, ...]
    env: dict[str, str]  # what the script gets on top of the backend's own environment
    cwd: str
    resources: dict[str, Any] = field(default_factory=dict)
    output: str = ""  # where the script's output is kept
    checkpoint_location: str | None = None
    cost_per_hour: float | None = None  # estimated, in USD; None where there is no price
    details: dict[str, Any] = field(default_factory=dict)

    def display(self) -> dict[str, Any]:
        """The plan as plain data for people and --dry-run: secrets in the command and the
        environment are redacted."""
        data = asdict(self)
        data["command"] = redact_args(list(self.command))
        data["env"] = redact_mapping(dict(self.env))
        return data


@dataclass(frozen=True)
class Handle:
    """One attempt, as plain data: the backend's name and its ids (pid and start ticks here,
    instance id and region on a cloud). Saved to JSON; any process can reattach with it."""

    backend: str
    ids: dict[str, Any]
    attempt: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "ids": dict(self.ids), "attempt": self.attempt}

    @classmethod
    def from_json(cls, data: Any) -> Handle:
        if not isinstance(data, dict) or not isinstance(data.get("backend"), str) \
                or not isinstance(data.get("ids"), dict):
            raise ValueError(f"not a recorded handle: {data!r}")
        return cls(backend=data["backend"], ids=dict(data["ids"]), attempt=int(data.get("attempt") or 0))


@dataclass(frozen=True)
class Description:
    """Where an attempt stands now: RUNNING until it ends; then COMPLETED (exit code 0), FAILED
    (another code) or KILLED (a signal), or, seen from a process that did not start it, the end
    the session store recorded (CRASHED when none was). `details` may hold "processes": the
    attempt's processes on this machine ({pid, start_ticks, role}), for liveness checks."""

    state: State
    exit_code: int | None = None
    signal: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state in (State.PENDING, State.RUNNING)


@dataclass(frozen=True)
class LogChunk:
    """A piece of an attempt's output. `offset` counts bytes from the attempt's first byte;
    `stream` is "stdout" or "stderr" where the backend can tell them apart, else "output"."""

    offset: int
    data: bytes
    stream: str = "output"


class Backend(ABC):
    """A place to run a script: this machine, an EC2 instance, a RunPod pod."""

    name: ClassVar[str]

    @abstractmethod
    def plan(self, spec: RunSpec) -> LaunchPlan:
        """The command, environment, resources and places of one attempt; no side effects."""

    @abstractmethod
    def launch(self, plan: LaunchPlan, attempt: int) -> Handle:
        """Start attempt number `attempt` of `plan` and return at once."""

    @abstractmethod
    def describe(self, handle: Handle) -> Description:
        """The attempt's state now, without waiting."""

    @abstractmethod
    def log_iter(self, handle: Handle, since: int = 0, follow: bool = False) -> Iterator[LogChunk]:
        """The attempt's output from byte `since`; with `follow`, until the attempt ends."""

    @abstractmethod
    def stop(self, handle: Handle, grace_period_s: float, *, signal_name: str = "SIGTERM") -> None:
        """Ask the attempt to stop, preemption-style (SIGTERM: the script writes its emergency
        checkpoint); kill it once `grace_period_s` has passed, at once when it is 0. Returns at
        once; the deadline is kept by `describe` calls in this process."""

    @abstractmethod
    def release(self, handle: Handle) -> None:
        """Free what the attempt holds once it has ended; calling it again does nothing."""

    @abstractmethod
    def list(self) -> list[Handle]:
        """Attempts this backend runs for trainctl right now (to find leaks)."""


class EndFailedError(TrainctlError, OSError):
    """A machine could not end itself through its platform's API; the boot script's power-off
    and the platform's own deadline still hold."""


class MachineEnd(ABC):
    """How a rented machine ends itself for good, and whatever would start a replacement in its
    place: the hook the agent calls once its session is over for this machine. Each cloud
    backend provides one; terminate, never stop (a stopped machine still bills for its disk)."""

    name: ClassVar[str]

    @abstractmethod
    def end_machine(self, reason: str) -> None:
        """End this machine (and its launch), saying why; raises EndFailedError when it can't."""

    def describe(self) -> str:
        return self.name


_SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SecretNotFoundError(NotFoundError):
    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"Secret {name} is not in {where}.",
                         f"Store it before launching (the launcher does it for --secret {name}), or drop --secret {name}.")
        self.name = name


def check_secret_name(name: str) -> str:
    """A secret is forwarded as an environment variable: its name must be one."""
    if not isinstance(name, str) or not _SECRET_NAME.match(name):
        raise UsageError(f"Secret name {name!r} is not an environment variable name.",
                         "Use letters, digits and underscores, not starting with a digit, e.g. --secret HF_TOKEN.")
    if name.startswith(("TRAIN_OPS_", "TRAINCTL_")):
        raise UsageError(f"Secret name {name!r} is one of trainctl's own variables.", "Name the script's variable.")
    return name


class SecretStore(ABC):
    """Where forwarded secrets live between the launcher and the machine: the agent reads them
    into the script's environment alone. Each cloud backend provides its platform's store
    (registered by name in trainctl.agent.secrets), as it provides its MachineEnd."""

    name: ClassVar[str]

    @abstractmethod
    def put(self, name: str, value: str) -> None:
        """Store (or replace) one secret."""

    @abstractmethod
    def get(self, name: str) -> str:
        """One secret's value; SecretNotFoundError when it is not there."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove one secret; a missing one is not an error."""

    @abstractmethod
    def names(self) -> list[str]:
        """The names stored, sorted."""


def register(name: str, target: str) -> None:
    """Make a backend known by `name`: target is "module:Class", imported on first use."""
    if ":" not in target:
        raise ValueError(f"backend target must be 'module:Class', not {target!r}")
    BACKENDS[name] = target


def get_backend(name: str, **options: Any) -> Backend:
    """A backend by name (`local`, ...), its module imported now."""
    target = BACKENDS.get(name)
    if target is None:
        raise UsageError(f"Unknown backend '{name}'. Valid: {', '.join(BACKENDS)}.",
                         "Run a script here with: trainctl local SCRIPT")
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)(**options)
