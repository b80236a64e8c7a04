"""The boot script a machine runs as EC2 user data: deadline, environment, the agent, the end.

User data is readable by anyone who can call DescribeInstanceAttribute or reach IMDS on the
machine, so it holds no secrets: they are read from SSM with the instance role.

How the script ends the machine (its shutdown behaviour is ``terminate``):
- an absolute UTC deadline, scheduled with a systemd timer and ``shutdown`` as a second
  layer, so a replacement machine booting late gets less time, never a fresh clock;
- agent exit 0: the agent finished the job (and ended its fleet); the script powers off;
- agent exit 75 (preempted): the platform is reclaiming the machine; the script leaves it to
  the platform (AWS does not bill a spot machine it interrupts in its first hour);
- any other exit, or a failed preparation step: abnormal; the script powers off.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ...errors import UsageError
from ...redact import is_secret_name

EXIT_PREEMPTED = 75
LOG_PATH = "/var/log/trainctl-boot.log"
AGENT_PID_FILE = "agent.pid"  # in the work folder
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class BootSpec:
    session_id: str
    deadline: datetime  # absolute, UTC
    agent_command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    prepare: Sequence[str] = ()  # shell lines run first (fetch and install the agent); any failure powers off
    workdir: str = "/opt/trainctl"
    log_path: str = LOG_PATH


def check_env(env: Mapping[str, str]) -> None:
    for name in env:
        if not _ENV_NAME.match(name):
            raise UsageError(f"'{name}' is not a valid environment variable name for the boot script.",
                             "Use letters, digits and underscores, not starting with a digit.")
        if is_secret_name(name):
            raise UsageError(f"{name} looks like a secret, and user data is readable on the machine and "
                             "through the EC2 API.",
                             f"Forward it with --secret {name}: it travels through SSM SecureString.")


def render_boot_script(spec: BootSpec) -> str:
    """The bash script, deterministic for a given spec (tested against a golden file)."""
    if not spec.agent_command:
        raise UsageError("The boot script needs the agent's command.", "Pass the command that starts the agent.")
    check_env(spec.env)
    if any(line.strip() == "TRAINCTL_PREPARE" for line in spec.prepare):
        raise UsageError("A preparation line may not be 'TRAINCTL_PREPARE' (it ends the block).")
    deadline = spec.deadline.astimezone(timezone.utc).replace(microsecond=0)
    epoch = int(deadline.timestamp())
    calendar = deadline.strftime("%Y-%m-%d %H:%M:%S UTC")
    exports = "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in sorted(
        {"TRAINCTL_SESSION_ID": spec.session_id,
         "TRAINCTL_DEADLINE": deadline.strftime("%Y-%m-%dT%H:%M:%SZ"),
         **spec.env}.items()))
    prepare = "\n".join(spec.prepare) if spec.prepare else "true"
    agent = shlex.join(list(spec.agent_command))
    return f"""#!/bin/bash
# trainctl boot script, session {spec.session_id}. It holds no secrets: they are read from SSM
# with the instance role. Log: {spec.log_path}
set -u
exec >>{shlex.quote(spec.log_path)} 2>&1
echo "trainctl boot at $(date -u +%FT%TZ)"

power_off() {{
  echo "powering off: $1"
  sync
  systemctl poweroff || shutdown -h now
  exit 0
}}

# Absolute deadline ({deadline.strftime("%Y-%m-%dT%H:%M:%SZ")}): a machine booting later gets less time, never a new clock.
DEADLINE_EPOCH={epoch}
now=$(date -u +%s)
[ "$now" -lt "$DEADLINE_EPOCH" ] || power_off "deadline passed before boot"
systemd-run --unit=trainctl-deadline --on-calendar={shlex.quote(calendar)} /bin/systemctl poweroff \\
  || echo "systemd-run failed; shutdown alone enforces the deadline"
shutdown -h "+$(( (DEADLINE_EPOCH - now + 59) / 60 ))" "trainctl deadline"

{exports}
mkdir -p {shlex.quote(spec.workdir)} && cd {shlex.quote(spec.workdir)} || power_off "no work folder"

bash -eu <<'TRAINCTL_PREPARE' || power_off "preparation failed"
{prepare}
TRAINCTL_PREPARE

# The agent's pid, for a stop request (SIGTERM: emergency checkpoint, final sync, exit).
{agent} &
echo "$!" > {shlex.quote(spec.workdir + "/" + AGENT_PID_FILE)}
wait "$!"
rc=$?
echo "agent exited with $rc at $(date -u +%FT%TZ)"
if [ "$rc" -eq {EXIT_PREEMPTED} ]; then
  echo "preempted: the platform reclaims this machine; the deadline still holds"
  exit 0
fi
[ "$rc" -eq 0 ] && power_off "the agent finished" || power_off "the agent failed (exit $rc)"
"""


def boot_script_size(script: str) -> int:
    return len(script.encode())

