"""trainctl's pods: launch from a plan, watch provisioning, list (with leaks), stop, terminate,
replace. Nothing here prints; each function returns data or raises a typed error.

trainctl knows its pods by the ``TRAIN_OPS_SESSION_ID`` entry of the pod's environment (the
session id, exact, set when the pod is created); the ``trainctl-`` name prefix is for people
reading RunPod's console, and a pod that has the prefix but no marker is listed as unknown.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from ...metrics import format_duration
from .api import RunPodClient, check_pod_id
from .catalog import text_table
from .errors import (
    AmbiguousCreateError,
    GpuUnavailableError,
    ImagePullError,
    PodNotFoundError,
    ProvisioningTimeoutError,
    RunPodApiError,
)
from .plan import ATTEMPT_MARKER, NAME_PREFIX, SESSION_MARKER, PodPlan

DEFAULT_PROVISION_TIMEOUT_S = 20 * 60  # a cold pull of a ~10 GB image, with margin
ENDED_STATUSES = frozenset({"completed", "failed", "killed", "stopped", "preempted", "crashed"})
_PULL_FAILURE = re.compile(
    r"(pull|image).{0,80}(error|fail|denied|not found|manifest unknown|unauthorized)|"
    r"(error|fail).{0,40}pull", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class SessionView:
    """What the session store says of a pod's session (passed in: this layer reads no store)."""

    status: str
    pod_id: str | None = None  # the pod of the session's current attempt, when recorded


@dataclass(frozen=True)
class PodInfo:
    id: str
    name: str
    state: str  # provisioning, running, stopped, terminated
    desired_status: str | None
    session_id: str | None
    attempt: int | None
    gpu: str | None
    gpu_count: int
    cost_per_hr_usd: float | None
    uptime_s: float | None
    image: str | None
    status_message: str | None  # RunPod's lastStatusChange
    ssh_host: str | None
    ssh_port: int | None
    leak: str | None = None  # why this pod may be billing for nothing

    @property
    def cost_so_far_usd(self) -> float | None:
        """Compute since the pod last started (a stopped pod's volume is billed apart)."""
        if self.cost_per_hr_usd is None or self.uptime_s is None:
            return None
        return self.cost_per_hr_usd * self.uptime_s / 3600

    @property
    def end_command(self) -> str:
        return f"trainctl runpod terminate {self.id}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost_so_far_usd"] = self.cost_so_far_usd
        data["end_command"] = self.end_command if self.leak else None
        return data


@dataclass(frozen=True)
class LaunchedPod:
    """A created pod as plain data (the RunPod backend keeps it in its Handle)."""

    pod_id: str
    name: str
    session_id: str
    attempt: int
    gpu: str
    gpu_count: int
    cloud: str
    market: str
    price_hr_usd: float
    created_at: str  # ISO UTC
    deadline_utc: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LaunchedPod:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ActionResult:
    """What stop/terminate did, in words a user can read."""

    pod_id: str
    action: str  # "stop" or "terminate"
    changed: bool  # False: nothing to do (already stopped / already gone)
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pod_env(raw: Mapping[str, Any]) -> dict[str, str]:
    """A pod's env as a dict (RunPod lists it as "KEY=value" strings)."""
    out: dict[str, str] = {}
    for item in raw.get("env") or []:
        if isinstance(item, str) and "=" in item:
            key, _, value = item.partition("=")
            out[key] = value
        elif isinstance(item, Mapping) and "key" in item:
            out[str(item["key"])] = str(item.get("value", ""))
    return out


def pod_state(raw: Mapping[str, Any] | None) -> str:
    if not raw:
        return "terminated"
    desired = str(raw.get("desiredStatus") or "").upper()
    if desired == "RUNNING":
        return "running" if raw.get("runtime") else "provisioning"
    if desired == "EXITED":
        return "stopped"
    if desired == "TERMINATED":
        return "terminated"
    return "provisioning" if desired in ("CREATED", "") else desired.lower()


def is_trainctl_pod(raw: Mapping[str, Any]) -> bool:
    return SESSION_MARKER in pod_env(raw) or str(raw.get("name") or "").startswith(NAME_PREFIX)


def pod_info(raw: Mapping[str, Any], leak: str | None = None) -> PodInfo:
    env = pod_env(raw)
    try:
        attempt = int(env[ATTEMPT_MARKER]) if ATTEMPT_MARKER in env else None
    except ValueError:
        attempt = None
    ssh_host = ssh_port = None
    for port in (raw.get("runtime") or {}).get("ports") or []:
        if isinstance(port, Mapping) and port.get("privatePort") == 22 and port.get("isIpPublic"):
            ssh_host, ssh_port = port.get("ip"), port.get("publicPort")
    machine = raw.get("machine") or {}

    def number(value: Any) -> float | None:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    return PodInfo(
        id=str(raw.get("id")), name=str(raw.get("name") or ""), state=pod_state(raw),
        desired_status=raw.get("desiredStatus"), session_id=env.get(SESSION_MARKER),
        attempt=attempt, gpu=machine.get("gpuDisplayName") if isinstance(machine, Mapping) else None,
        gpu_count=int(raw.get("gpuCount") or 0), cost_per_hr_usd=number(raw.get("costPerHr")),
        uptime_s=number(raw.get("uptimeSeconds")), image=raw.get("imageName"),
        status_message=raw.get("lastStatusChange"), ssh_host=ssh_host,
        ssh_port=int(ssh_port) if ssh_port else None, leak=leak)


def leak_reason(info: PodInfo, view: SessionView | None) -> str | None:
    """Why a live pod may be billing for nothing, or None when its session still needs it."""
    if info.state == "terminated":
        return None
    if info.session_id is None:
        return "no trainctl session marker in its environment"
    if view is None:
        return f"session {info.session_id} is not in this project"
    if view.pod_id and view.pod_id != info.id:
        return f"session {info.session_id} moved on to pod {view.pod_id}"
    if view.status in ENDED_STATUSES:
        return f"session {info.session_id} ended ({view.status})"
    return None


def list_pods(client: RunPodClient,
              session: Callable[[str], SessionView | None] | None = None) -> list[PodInfo]:
    """trainctl's pods on the account, each flagged when it may be a leak.

    ``session`` looks a session id up in the store; without it no pod is judged."""
    out = []
    for raw in client.list_pods():
        if not is_trainctl_pod(raw):
            continue
        info = pod_info(raw)
        if session is not None:
            view = session(info.session_id) if info.session_id else None
            info = pod_info(raw, leak_reason(info, view))
        out.append(info)
    return sorted(out, key=lambda p: (p.session_id or "", p.attempt or 0, p.id))


def render_pod_table(pods: Sequence[PodInfo]) -> str:
    """`trainctl runpod list`: one line a pod, then each possible leak with its fix."""
    if not pods:
        return "No trainctl pods on this RunPod account."
    header = ("POD", "SESSION", "STATE", "GPU", "UPTIME", "$/H", "COST", "")
    rows = [(p.id, p.session_id or "?", p.state,
             f"{p.gpu_count} x {p.gpu}" if p.gpu else "-",
             format_duration(p.uptime_s) if p.uptime_s is not None else "-",
             f"${p.cost_per_hr_usd:.2f}" if p.cost_per_hr_usd is not None else "-",
             f"${p.cost_so_far_usd:.2f}" if p.cost_so_far_usd is not None else "-",
             "possible leak" if p.leak else "") for p in pods]
    lines = text_table(header, rows)
    for p in pods:
        if p.leak:
            rate = f", ${p.cost_per_hr_usd:.2f}/h" if p.cost_per_hr_usd else ""
            lines.append(f"possible leak: pod {p.id} ({p.state}{rate}): {p.leak}. "
                         f"End it with: {p.end_command}")
    return "\n".join(lines)


def pod_status(client: RunPodClient, pod_id: str) -> PodInfo:
    raw = client.get_pod(pod_id)
    if raw is None:
        raise PodNotFoundError(pod_id)
    return pod_info(raw)


def stop_pod(client: RunPodClient, pod_id: str) -> ActionResult:
    """Stop (SIGTERM to the container; the volume stays and keeps billing)."""
    raw = client.get_pod(pod_id)
    if raw is None:
        raise PodNotFoundError(pod_id)
    if pod_state(raw) == "stopped":
        return ActionResult(pod_id, "stop", False, f"pod {pod_id} was already stopped")
    client.stop_pod(pod_id)
    return ActionResult(pod_id, "stop", True,
                        f"pod {pod_id} stopped; its volume keeps billing until: "
                        f"trainctl runpod terminate {pod_id}")


def terminate_pod(client: RunPodClient, pod_id: str) -> ActionResult:
    """End a pod for good. Idempotent: a pod already gone is reported, not an error."""
    check_pod_id(pod_id)
    if client.terminate_pod(pod_id):
        return ActionResult(pod_id, "terminate", True,
                            f"pod {pod_id} terminated: nothing of it bills any more")
    return ActionResult(pod_id, "terminate", False, f"pod {pod_id} was already terminated")


def _own_pods(client: RunPodClient, session_id: str, attempt: int) -> list[dict[str, Any]]:
    return [raw for raw in client.list_pods()
            if pod_env(raw).get(SESSION_MARKER) == session_id
            and pod_env(raw).get(ATTEMPT_MARKER) == str(attempt)]


def launch_pod(client: RunPodClient, plan: PodPlan, *, now: datetime | None = None) -> LaunchedPod:
    """Create the pod the plan describes and return at once (it is still provisioning).

    When the create request got no answer, the pod may exist anyway: it is looked up by its
    session marker and terminated, so a failed launch leaves nothing half-created."""
    r = plan.request
    try:
        pod = client.create_pod(plan.mutation, plan.pod_input)
    except AmbiguousCreateError as e:
        try:
            ended = []
            for raw in _own_pods(client, r.session_id, r.attempt):
                client.terminate_pod(raw["id"])
                ended.append(str(raw["id"]))
        except RunPodApiError as lookup:
            raise RunPodApiError(
                f"{e.message} Checking for a half-created pod failed too ({lookup.message}).",
                "Run `trainctl runpod list` and terminate any pod of session "
                f"{r.session_id}", operation=e.operation) from e
        what = (f"terminated the pod it had created ({', '.join(ended)})" if ended
                else "no pod was created")
        raise RunPodApiError(f"{e.message} Checked: {what}.",
                             "Retry the launch; nothing is left billing",
                             operation=e.operation) from e
    except GpuUnavailableError as e:
        raise GpuUnavailableError(
            f"{r.gpu_count} x {plan.offer.id} on {r.cloud} cloud ({plan.market})",
            plan.alternatives, detail=e.detail) from e
    created = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return LaunchedPod(pod_id=str(pod["id"]), name=plan.pod_name, session_id=r.session_id,
                       attempt=r.attempt, gpu=plan.offer.id, gpu_count=r.gpu_count,
                       cloud=r.cloud, market=plan.market, price_hr_usd=plan.price_hr,
                       created_at=created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       deadline_utc=plan.deadline_utc.strftime("%Y-%m-%dT%H:%M:%SZ"))


def _ended_for(client: RunPodClient, pod_id: str) -> bool:
    try:
        client.terminate_pod(pod_id)
    except RunPodApiError:
        return False
    return True


def check_provisioning(client: RunPodClient, pod: LaunchedPod, *,
                       timeout_s: float = DEFAULT_PROVISION_TIMEOUT_S,
                       now: float | None = None) -> PodInfo:
    """One non-blocking look at a new pod. Returns its info while it provisions or once it runs;
    a pod that cannot pull its image, or is still provisioning past ``timeout_s``, is
    terminated and raises (ImagePullError, ProvisioningTimeoutError)."""
    raw = client.get_pod(pod.pod_id)
    if raw is None:
        raise PodNotFoundError(pod.pod_id)
    info = pod_info(raw)
    if info.state != "provisioning":
        return info
    message = info.status_message or ""
    if _PULL_FAILURE.search(message):
        image = str(raw.get("imageName") or "?")
        raise ImagePullError(pod.pod_id, image, message.strip(), _ended_for(client, pod.pod_id))
    created = datetime.strptime(pod.created_at, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc).timestamp()
    waited = (time.time() if now is None else now) - created
    if waited >= timeout_s:
        raise ProvisioningTimeoutError(pod.pod_id, waited, _ended_for(client, pod.pod_id),
                                       message.strip())
    return info


def wait_until_running(client: RunPodClient, pod: LaunchedPod, *,
                       timeout_s: float = DEFAULT_PROVISION_TIMEOUT_S, poll_s: float = 5.0,
                       on_poll: Callable[[PodInfo], None] | None = None) -> PodInfo:
    """Poll until the pod runs (or stops); the errors of check_provisioning end the wait."""
    while True:
        info = check_provisioning(client, pod, timeout_s=timeout_s)
        if on_poll is not None:
            on_poll(info)
        if info.state != "provisioning":
            return info
        time.sleep(poll_s)


def replace_pod(client: RunPodClient, old_pod_id: str | None, plan: PodPlan,
                *, now: datetime | None = None) -> tuple[ActionResult | None, LaunchedPod]:
    """Resume on a new pod: terminate the old one (a stopped pod restarted on its host risks
    having zero GPUs there), then launch the plan, which may name another GPU type or cloud."""
    ended = terminate_pod(client, old_pod_id) if old_pod_id else None
    return ended, launch_pod(client, plan, now=now)


def ssh_command(info: PodInfo) -> str | None:
    """The pod's public SSH endpoint as a command, once it runs and has one."""
    if not (info.ssh_host and info.ssh_port):
        return None
    return f"ssh root@{info.ssh_host} -p {info.ssh_port}"


def leaks(pods: Iterable[PodInfo]) -> list[PodInfo]:
    return [p for p in pods if p.leak]
