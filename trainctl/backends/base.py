"""The one interface every place-to-run implements; the CLI and the supervisor speak only to it."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UsageError

# name -> "module:Class", imported on first use so the CLI stays fast (torchx-style registry)
BACKENDS: dict[str, str] = {
    "local": "trainctl.backends.local:LocalBackend",
}


@dataclass
class RestartPolicy:
    max_restarts: int = 0
    restart_on: tuple[str, ...] = ("preempted", "failed")
    restart_delay_s: float = 2.0
    grace_period_s: float = 30.0


@dataclass
class RunSpec:
    """Everything needed to run a script once; a restart is the same spec with another resume."""

    script: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)  # nproc_per_node, gpus, ...
    resume: str | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    name: str | None = None
    quiet: bool = False

    @property
    def nproc_per_node(self) -> int:
        return int(self.resources.get("nproc_per_node", 1))


@dataclass
class Outcome:
    """How one attempt ended."""

    status: str  # completed | failed | preempted | killed
    exit_code: int | None
    signal: str | None = None
    output_tail: list[str] = field(default_factory=list)
    stopped_by_user: bool = False


class Handle:
    """What `launch` returns: enough to wait for, stop or inspect one attempt."""

    def __init__(self, backend: Backend, ref: Any) -> None:
        self.backend = backend
        self.ref = ref


class Backend(ABC):
    """A place to run a script: this machine, an EC2 instance, a RunPod pod."""

    name: ClassVar[str]

    @abstractmethod
    def launch(self, spec: RunSpec, env: dict[str, str], attempt: int) -> Handle:
        """Start one attempt of `spec` with `env` (TRAIN_OPS_* included); return at once."""

    @abstractmethod
    def wait(self, handle: Handle) -> Outcome:
        """Block until the attempt ends, streaming its output."""

    @abstractmethod
    def status(self, handle: Handle) -> str:
        """running, or how it ended."""

    @abstractmethod
    def stop(self, handle: Handle, grace_period_s: float) -> None:
        """Ask the attempt to stop (signal), killing it after the grace period."""

    @abstractmethod
    def terminate(self, handle: Handle) -> None:
        """Kill the attempt now and release what it holds."""

    def logs(self, handle: Handle, follow: bool = False) -> list[str]:
        """The attempt's recent output lines."""
        return []

    def list(self) -> list[dict[str, Any]]:
        """Resources this backend runs for trainctl sessions (cloud backends: tagged instances)."""
        return []


def get_backend(name: str, **options: Any) -> Backend:
    target = BACKENDS.get(name)
    if target is None:
        raise UsageError(f"Unknown backend '{name}'. Valid: {', '.join(BACKENDS)}.",
                         "Run a script here with: trainctl local SCRIPT")
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)(**options)
