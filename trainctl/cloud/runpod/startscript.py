"""The pod's start command: run the agent, and end the pod when it exits or at the deadline.

A container has no ``shutdown``: the pod is ended through RunPod's API with the pod-scoped
``RUNPOD_API_KEY`` RunPod injects (``runpodctl remove pod`` where the image has it). The script
travels base64-encoded inside ``dockerArgs`` so no quoting layer (GraphQL, RunPod's argument
splitting, bash) can alter it.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Sequence
from datetime import datetime

SCRIPT_PATH = "/tmp/trainctl-start.sh"

_TEMPLATE = r"""#!/bin/bash
# trainctl start script: session @SESSION@, attempt @ATTEMPT@.
# Runs the agent. Ends this pod (terminate, not stop) when the agent exits, and at the absolute
# deadline @DEADLINE@ even if the agent hangs or died. SIGTERM (an interruption) is passed on to
# the agent and does not end the pod: RunPod stops it, and recovery starts a new one.
set -u
DEADLINE_EPOCH=@EPOCH@
GRACE_S=@GRACE@
KEEP_ON_FAILURE=@KEEP@
ENDED="/tmp/trainctl-ended.$$"  # $$ is this script's pid in the watchdog subshell too
DEADLINE_REACHED="/tmp/trainctl-deadline.$$"
trap 'rm -f "$ENDED" "$DEADLINE_REACHED"' EXIT

end_pod() {
  [ -e "$ENDED" ] && return 0  # a terminated pod's own key is refused: end it once
  echo "trainctl: ending pod ${RUNPOD_POD_ID:-?}: $1" >&2
  if [ -z "${RUNPOD_API_BASE_URL:-}" ] && command -v runpodctl >/dev/null 2>&1 \
      && runpodctl remove pod "${RUNPOD_POD_ID:-}"; then
    : >"$ENDED"
    return 0
  fi
  python3 - <<'PY'
import json, os, sys, time, urllib.error, urllib.request
url = os.environ.get("RUNPOD_API_BASE_URL", "https://api.runpod.io").rstrip("/") + "/graphql"
query = "mutation TrainctlTerminatePod($input: PodTerminateInput!) { podTerminate(input: $input) }"
body = json.dumps({"query": query,
                   "variables": {"input": {"podId": os.environ["RUNPOD_POD_ID"]}}}).encode()
request = urllib.request.Request(url, data=body, method="POST", headers={
    "Content-Type": "application/json",
    "Authorization": "Bearer " + os.environ["RUNPOD_API_KEY"]})
for delay in (1, 2, 4, 8, 16, 32, 0):
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            errors = json.load(response).get("errors") or []
        if not errors or "not found" in str(errors[0].get("message", "")).lower():
            sys.exit(0)
        print("trainctl: terminate refused:", errors[0].get("message"), file=sys.stderr)
    except urllib.error.HTTPError as e:
        print("trainctl: terminate failed:", e, file=sys.stderr)
        if e.code in (401, 403):
            sys.exit(1)  # a refused key stays refused
    except Exception as e:
        print("trainctl: terminate failed:", e, file=sys.stderr)
    time.sleep(delay)
sys.exit(1)
PY
  if [ $? -eq 0 ]; then
    : >"$ENDED"
  else
    echo "trainctl: could not end this pod; trainctl runpod list flags it" >&2
  fi
}

# The image's own start-up (sshd for `trainctl runpod ssh`), when it has one.
if [ -x /start.sh ]; then /start.sh >/tmp/runpod-start.log 2>&1 & fi

@AGENT@ &
AGENT_PID=$!
trap 'kill -TERM "$AGENT_PID" 2>/dev/null; kill "${WATCHDOG_PID:-}" 2>/dev/null
      wait "$AGENT_PID"; exit 143' TERM INT
(
  while :; do
    left=$((DEADLINE_EPOCH - $(date +%s)))
    [ "$left" -le 0 ] && break
    sleep $((left < 60 ? left : 60)) >/dev/null 2>&1  # holds no pipe if left behind
  done
  : >"$DEADLINE_REACHED"
  echo "trainctl: max-hours deadline @DEADLINE@ reached; stopping the agent" >&2
  kill -TERM "$AGENT_PID" 2>/dev/null
  waited=0
  while kill -0 "$AGENT_PID" 2>/dev/null && [ "$waited" -lt "$GRACE_S" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  end_pod "max-hours deadline"
) &
WATCHDOG_PID=$!
wait "$AGENT_PID"
rc=$?
if [ "$rc" -ne 0 ] && [ "$KEEP_ON_FAILURE" = 1 ]; then
  echo "trainctl: agent failed ($rc); pod kept for debugging until @DEADLINE@" >&2
  wait "$WATCHDOG_PID"
fi
if [ -e "$DEADLINE_REACHED" ]; then
  wait "$WATCHDOG_PID"  # it is ending the pod
else
  kill "$WATCHDOG_PID" 2>/dev/null
fi
end_pod "agent exited with status $rc"
exit "$rc"
"""


def render(*, session_id: str, attempt: int, agent_command: Sequence[str], deadline: datetime,
           grace_period_s: int, keep_on_failure: bool) -> str:
    """The bash script the pod runs (readable: the plan shows it)."""
    if not agent_command:
        raise ValueError("agent_command is empty")
    values = {
        # comments must stay one line whatever the session id holds
        "@SESSION@": re.sub(r"[^\x20-\x7e]", "?", session_id),
        "@ATTEMPT@": str(int(attempt)),
        "@DEADLINE@": deadline.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "@EPOCH@": str(int(deadline.timestamp())),
        "@GRACE@": str(int(grace_period_s)),
        "@KEEP@": "1" if keep_on_failure else "0",
        "@AGENT@": shlex.join(agent_command),
    }
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m.group(0)], _TEMPLATE)


def docker_args(script: str) -> str:
    """The pod's ``dockerArgs``: decode the script and run it (only base64 characters inside)."""
    encoded = base64.b64encode(script.encode("utf-8")).decode("ascii")
    return (f"bash -c 'echo {encoded} | base64 -d > {SCRIPT_PATH} && "
            f"exec bash {SCRIPT_PATH}'")


def script_from_docker_args(args: str) -> str:
    """Inverse of docker_args (for `trainctl runpod status` and tests)."""
    match = re.search(r"echo ([A-Za-z0-9+/=]+) \| base64 -d", args or "")
    if not match:
        raise ValueError("not a trainctl start command")
    return base64.b64decode(match.group(1)).decode("utf-8")
