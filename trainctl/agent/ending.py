"""How a machine ends: one small hook the agent calls once its session is over for this machine.

`end_machine(reason)` ends this machine and whatever would bring a replacement up in its place
(AWS: delete the session's fleet without terminating, then terminate this instance; RunPod:
`podTerminate` with the pod-scoped key). Terminate, never stop: a stopped machine still bills
for its disk. The interface (`MachineEnd`, `EndFailedError`) lives with the backends, each of
which provides its hook (`aws`: trainctl.backends.aws, `runpod`: trainctl.backends.runpod); the
agent calls nothing else.

    END_HOOKS     name -> "module:Class", imported on first use
    open_end_hook("command", command="runpodctl remove pod $RUNPOD_POD_ID")
    open_end_hook("my.module:MyEnd")
"""

from __future__ import annotations

import importlib
import os
import subprocess
import time
from typing import Any

from ..backends.base import EndFailedError, MachineEnd
from ..errors import UsageError

END_HOOKS: dict[str, str] = {
    "none": "trainctl.agent.ending:NoEnd",
    "poweroff": "trainctl.agent.ending:PowerOff",
    "command": "trainctl.agent.ending:CommandEnd",
    "aws": "trainctl.backends.aws:AwsMachineEnd",
    "runpod": "trainctl.backends.runpod:RunPodMachineEnd",
}
REASON_VARIABLE = "TRAINCTL_END_REASON"
ATTEMPTS = 3


class NoEnd(MachineEnd):
    """Nothing to end: a run on a machine someone else owns (a laptop, a shared server)."""

    name = "none"

    def end_machine(self, reason: str) -> None:
        return None

    def describe(self) -> str:
        return "none (the machine keeps running)"


class CommandEnd(MachineEnd):
    """Runs a shell command (`TRAINCTL_END_REASON` in its environment), up to three times."""

    name = "command"

    def __init__(self, command: str | None = None, *, timeout_s: float = 120.0, retry_delay_s: float = 1.0) -> None:
        if not command or not command.strip():
            raise UsageError("The 'command' end hook needs a command.",
                             "Pass --end-command 'CMD', e.g. --end-command 'runpodctl remove pod $RUNPOD_POD_ID'.")
        self.command = command
        self.timeout_s = timeout_s
        self.retry_delay_s = retry_delay_s

    def end_machine(self, reason: str) -> None:
        env = {**os.environ, REASON_VARIABLE: reason}
        last = ""
        for attempt in range(ATTEMPTS):
            try:
                done = subprocess.run(["/bin/sh", "-c", self.command], env=env, capture_output=True,
                                      text=True, timeout=self.timeout_s)
            except (OSError, subprocess.TimeoutExpired) as e:
                last = str(e)
            else:
                if done.returncode == 0:
                    return
                last = f"exit code {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
            if attempt + 1 < ATTEMPTS:
                time.sleep(self.retry_delay_s * 2 ** attempt)
        raise EndFailedError(f"The end command failed {ATTEMPTS} times ({last}).",
                             "The boot script powers the machine off and the platform's deadline ends it; "
                             "check the command.")

    def describe(self) -> str:
        return f"command: {self.command}"


class PowerOff(CommandEnd):
    """Powers the machine off (a VM whose shutdown behaviour is terminate)."""

    name = "poweroff"

    def __init__(self, command: str | None = None, **kw: Any) -> None:
        super().__init__(command or "systemctl poweroff || shutdown -h now", **kw)


def register_end_hook(name: str, target: str) -> None:
    """Make an end hook known by `name`: target is "module:Class" (a MachineEnd), imported on use."""
    if ":" not in target:
        raise ValueError(f"end hook target must be 'module:Class', not {target!r}")
    END_HOOKS[name] = target


def open_end_hook(spec: str, *, command: str | None = None) -> MachineEnd:
    """The hook a name (`none`, `poweroff`, `command`, a registered one) or "module:Class" names."""
    target = END_HOOKS.get(spec, spec if ":" in spec else None)
    if target is None:
        raise UsageError(f"Unknown end hook {spec!r}. Valid: {', '.join(END_HOOKS)}, or module:Class.",
                         "Example: --end command --end-command 'sudo shutdown -h now'")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"End hook {target!r} cannot be imported ({e}).",
                         "Name a MachineEnd class as module:Class, importable on this machine.") from e
    if not (isinstance(cls, type) and issubclass(cls, MachineEnd)):
        raise UsageError(f"End hook {target!r} is not a MachineEnd.", "Subclass trainctl.agent.ending.MachineEnd.")
    if issubclass(cls, CommandEnd):
        return cls(command)
    if command:
        raise UsageError(f"--end-command is only for the command hook, not {spec!r}.",
                         "Drop --end-command, or use --end command.")
    return cls()
