"""Plan a pod before paying for it: pure, from a request and facts read from RunPod.

``plan(request, facts)`` chooses nothing at random and reads no clock: the same inputs give the
same plan, byte for byte (``--dry-run`` prints it, and the payload it holds is exactly what
``pods.launch_pod`` sends).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from ...metrics import format_duration
from ...redact import is_secret_name
from . import startscript
from .catalog import CLOUDS, GpuOffer, alternatives, check_choice, find_gpu, parse_gpu_types
from .errors import (
    BudgetExceededError,
    GpuUnavailableError,
    InsufficientBalanceError,
    InvalidPodRequestError,
    UnsafeEnvironmentError,
)

# RunPod's own PyTorch image (the "RunPod PyTorch" template): torch in the system python3, which
# is where the agent runs; sshd and /start.sh for `trainctl runpod ssh`; often cached on hosts.
# CUDA 12.8 is the first that runs on every GPU RunPod rents, Blackwell (sm_100/sm_120) included.
DEFAULT_IMAGE = "runpod/pytorch:2.8.0-py3.11-cuda12.8.1-cudnn-devel-ubuntu22.04"
# Host CUDA versions RunPod filters on (allowedCudaVersions): a host qualifies when its driver
# supports at least the image's CUDA.
CUDA_VERSIONS = ("11.8", "12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.7", "12.8",
                 "12.9", "13.0")
NAME_PREFIX = "trainctl-"
SESSION_MARKER = "TRAIN_OPS_SESSION_ID"  # in every pod's env: how trainctl knows its pods
ATTEMPT_MARKER = "TRAIN_OPS_ATTEMPT"
DEADLINE_VARIABLE = "TRAINCTL_DEADLINE_UTC"
MAX_ENV = 50  # RunPod's limit of environment variables per pod
SSH_PORT = "22/tcp"
VOLUME_MOUNT = "/workspace"
# Past the container's own deadline: RunPod's terminateAfter is a backstop if it is ever enforced.
TERMINATE_AFTER_MARGIN = timedelta(minutes=5)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]{0,190}$")
_SECRET_REF = re.compile(r"^\{\{ RUNPOD_SECRET_[A-Za-z_][A-Za-z0-9_.\-/]*\ }}$")
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:@+-]*$", re.IGNORECASE)
_IMAGE_CUDA = (re.compile(r"cuda[-_]?(\d{2})\.(\d)", re.IGNORECASE),
               re.compile(r"(?<![a-z])cu(\d{2})(\d)(?!\d)", re.IGNORECASE))


def secret_reference(secret_name: str) -> str:
    """How a pod's env names a RunPod secret; RunPod substitutes the value when the pod boots."""
    return "{{ RUNPOD_SECRET_" + secret_name + " }}"


def image_cuda(image: str) -> str | None:
    """'12.8' for runpod/pytorch:...-cuda12.8.1-... or pytorch/pytorch:...-cu128..., else None."""
    for pattern in _IMAGE_CUDA:
        match = pattern.search(image.rpartition(":")[2] or image)
        if match:
            return f"{int(match.group(1))}.{match.group(2)}"
    return None


def allowed_cuda_versions(cuda: str | None) -> list[str] | None:
    if cuda is None:
        return None
    floor = tuple(int(p) for p in cuda.split("."))
    return [v for v in CUDA_VERSIONS if tuple(int(p) for p in v.split(".")) >= floor]


@dataclass(frozen=True)
class PodRequest:
    """What a launch asks for; the values a user gives (CLI flags, trainctl.toml)."""

    session_id: str
    agent_command: tuple[str, ...]
    gpu: str
    gpu_count: int = 1
    cloud: str = "secure"
    interruptible: bool = False
    bid_per_gpu: float | None = None
    image: str = DEFAULT_IMAGE
    image_cuda: str | None = None  # when the image's tag does not say
    container_disk_gb: int = 50
    volume_gb: int = 0
    network_volume_id: str | None = None
    max_hours: float = 24.0
    deadline_utc: datetime | None = None  # absolute end kept from an earlier attempt (resume)
    budget_usd: float | None = None
    spent_usd: float = 0.0  # what earlier attempts of this session cost (resume)
    attempt: int = 0
    name: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # plain values the agent needs
    secrets: Mapping[str, str] = field(default_factory=dict)  # env name -> RunPod secret name
    keep_on_failure: bool = False
    grace_period_s: int = 120  # SIGTERM to the agent at the deadline, then end the pod
    notes: tuple[tuple[str, str], ...] = ()  # more plan lines: storage, bundle, resume checkpoint
    agent_display: str | None = None  # how plans show agent_command when it embeds a bootstrap

    @property
    def market(self) -> str:
        return "interruptible" if self.interruptible else "on-demand"


@dataclass(frozen=True)
class Facts:
    """What the plan needs from RunPod, and when it was read."""

    offers: tuple[GpuOffer, ...]
    read_at: datetime
    balance_usd: float | None = None
    spend_per_hr_usd: float = 0.0  # what the account's running pods cost now
    network_volumes: Mapping[str, str] = field(default_factory=dict)  # id -> datacenter


def gather_facts(client: Any, gpu_count: int = 1, *, network_volume_id: str | None = None,
                 now: datetime | None = None) -> Facts:
    """Read GPU offers and the balance (and the network volume's datacenter when one is used)."""
    offers = tuple(parse_gpu_types(client.gpu_types(gpu_count)))
    me = client.account()
    volumes = client.network_volumes() if network_volume_id else {}

    def money(value: Any) -> float | None:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    return Facts(offers=offers, read_at=now or datetime.now(timezone.utc),
                 balance_usd=money(me.get("clientBalance")),
                 spend_per_hr_usd=money(me.get("currentSpendPerHr")) or 0.0,
                 network_volumes=volumes)


@dataclass(frozen=True)
class PodPlan:
    """Everything a launch will do and cost, and the exact request it sends."""

    request: PodRequest
    offer: GpuOffer
    price_per_gpu_hr: float
    price_read_at: datetime
    deadline_utc: datetime
    hours: float
    projected_usd: float
    balance_usd: float | None
    spend_per_hr_usd: float
    image_cuda: str | None
    allowed_cuda_versions: list[str] | None
    pod_name: str
    env: dict[str, str]
    mutation: str
    pod_input: dict[str, Any]
    start_script: str
    data_center: str | None
    warnings: tuple[str, ...]
    alternatives: tuple[str, ...]  # shown when the GPU turns out to be unavailable at launch

    @property
    def price_hr(self) -> float:
        return self.price_per_gpu_hr * self.request.gpu_count

    @property
    def market(self) -> str:
        return self.request.market

    def to_json(self) -> dict[str, Any]:
        r = self.request
        return {
            "session_id": r.session_id, "attempt": r.attempt, "pod_name": self.pod_name,
            "gpu": {"id": self.offer.id, "memory_gb": self.offer.memory_gb, "count": r.gpu_count},
            "cloud": r.cloud, "market": self.market,
            "price": {"per_gpu_usd_hr": self.price_per_gpu_hr, "usd_hr": round(self.price_hr, 6),
                      "read_at": _iso(self.price_read_at),
                      "bid_per_gpu_usd_hr": self.pod_input.get("bidPerGpu")},
            "max_hours": round(self.hours, 4), "deadline_utc": _iso(self.deadline_utc),
            "projected_usd": round(self.projected_usd, 4), "budget_usd": r.budget_usd,
            "spent_usd": r.spent_usd,
            "balance": {"usd": self.balance_usd, "running_spend_usd_hr": self.spend_per_hr_usd},
            "image": {"name": r.image, "cuda": self.image_cuda,
                      "allowed_cuda_versions": self.allowed_cuda_versions},
            "disk": {"container_gb": r.container_disk_gb, "volume_gb": r.volume_gb,
                     "network_volume_id": r.network_volume_id, "data_center": self.data_center},
            "env": display_env(self.env),
            "injected_by_runpod": ["RUNPOD_POD_ID", "RUNPOD_API_KEY (pod-scoped)"],
            "agent_command": list(r.agent_command),
            "start_script": self.start_script,
            "request": {"operation": self.mutation,
                        "variables": {"input": self.pod_input}},
            "notes": [list(n) for n in r.notes],
            "warnings": list(self.warnings),
        }

    def render_text(self) -> str:
        r = self.request
        gpu = f"{r.gpu_count} x {self.offer.id} ({self.offer.memory_gb} GB)"
        per_gpu = f"${self.price_per_gpu_hr:.3f}/h per GPU, " if r.gpu_count > 1 else ""
        bid = f", bid ${self.pod_input['bidPerGpu']:.3f}/GPU" if r.interruptible else ""
        lines = [
            ("pod", f"{self.pod_name} (session {r.session_id}, attempt {r.attempt})"),
            ("GPU", f"{gpu}, {r.cloud} cloud, {self.market}"),
            ("price", f"{per_gpu}${self.price_hr:.3f}/h{bid} (read from RunPod "
                      f"{_when(self.price_read_at)})"),
            ("max hours", f"{self.hours:.2f} h: the pod ends by {_when(self.deadline_utc)} "
                          "(watchdog in the container; RunPod's terminateAfter is requested too, "
                          "but RunPod does not enforce it today)"),
            ("projected", f"${self.projected_usd:.2f} for {self.hours:.2f} h" + _budget_line(self)),
            ("balance", _balance_line(self)),
            ("image", f"{r.image}" + (f" (CUDA {self.image_cuda}: hosts with "
                                      f"{', '.join(self.allowed_cuda_versions or [])})"
                                      if self.image_cuda else " (CUDA unknown: any host)")),
            ("disk", f"container {r.container_disk_gb} GB, " + (
                f"volume {r.volume_gb} GB at {VOLUME_MOUNT}" if r.volume_gb else "no volume")
             + (f", network volume {r.network_volume_id} (datacenter {self.data_center})"
                if r.network_volume_id else "")),
            *r.notes,
            *[("env" if i == 0 else "", f"{k}={v}")
              for i, (k, v) in enumerate(display_env(self.env).items())],
            ("from RunPod", "RUNPOD_POD_ID, RUNPOD_API_KEY (pod-scoped: your own key never "
                            "reaches the pod)"),
            ("runs", f"{r.agent_display or shlex.join(r.agent_command)}; the pod is terminated "
                     "when it exits"
                     + (" (kept until the deadline if it fails)" if r.keep_on_failure else "")),
            ("recovery", "an interruption gives ~5 s before SIGKILL: a new pod resumes from the "
                         "newest checkpoint in storage, work lost <= the checkpoint interval"
             if r.interruptible else "a new pod resumes from the newest checkpoint in storage"),
            ("request", f"{self.mutation} with GraphQL variables (--json shows it whole)"),
        ]
        width = max(len(k) for k, _ in lines)
        out = [f"RunPod launch plan for session {r.session_id}"]
        out += [f"  {k.ljust(width)}  {v}" for k, v in lines]
        out += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(out)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _budget_line(p: PodPlan) -> str:
    budget = p.request.budget_usd
    if budget is None:
        return " (no budget_usd set)"
    spent = f" + ${p.request.spent_usd:.2f} spent" if p.request.spent_usd else ""
    return f"{spent}, within budget_usd ${budget:.2f}"


def _balance_line(p: PodPlan) -> str:
    if p.balance_usd is None:
        return "unknown"
    per_hr = p.price_hr + p.spend_per_hr_usd
    running = f" with your running pods' ${p.spend_per_hr_usd:.2f}/h" if p.spend_per_hr_usd else ""
    return (f"${p.balance_usd:.2f}: covers {format_duration(p.balance_usd / per_hr * 3600)} "
            f"of this pod{running} (RunPod needs 1 h to start one)")


def display_env(env: Mapping[str, str]) -> dict[str, str]:
    """The pod's env as plans show it: secrets are references by construction; anything
    credential-looking that is not one is hidden anyway."""
    return {k: (v if not is_secret_name(k) or _SECRET_REF.match(v) else "***")
            for k, v in env.items()}


def _check_request(r: PodRequest) -> None:
    def bad(message: str, hint: str) -> InvalidPodRequestError:
        return InvalidPodRequestError(message, hint)

    if not r.session_id or not r.session_id.strip():
        raise bad("The pod needs a session id.", "Launch through trainctl runpod launch")
    if not r.agent_command or not all(isinstance(a, str) for a in r.agent_command):
        raise bad("No agent command for the pod to run.", "Pass the agent's argv")
    if not isinstance(r.gpu_count, int) or not 1 <= r.gpu_count <= 16:
        raise bad(f"--gpu-count {r.gpu_count!r} is out of range.", "Use 1 to 16")
    check_choice(r.cloud, CLOUDS, "--cloud")
    if not r.max_hours or not 0 < r.max_hours <= 24 * 30:
        raise bad(f"--max-hours {r.max_hours!r} is out of range.",
                  "Use a number of hours above 0 and at most 720")
    if not 10 <= r.container_disk_gb <= 2000:
        raise bad(f"--container-disk-gb {r.container_disk_gb!r} is out of range.",
                  "Use 10 to 2000 (the image, the code and local checkpoints live there)")
    if not 0 <= r.volume_gb <= 10000:
        raise bad(f"--volume-gb {r.volume_gb!r} is out of range.", "Use 0 to 10000")
    if not _IMAGE.match(r.image or ""):
        raise bad(f"--image {r.image!r} is not an image reference.",
                  "Use a name like runpod/pytorch:TAG or registry/repo@sha256:...")
    if r.image_cuda is not None and r.image_cuda not in CUDA_VERSIONS:
        raise bad(f"Unknown CUDA version {r.image_cuda!r}.",
                  f"Valid: {', '.join(CUDA_VERSIONS)}")
    if r.bid_per_gpu is not None and (not r.interruptible or r.bid_per_gpu <= 0):
        raise bad(f"--bid-per-gpu {r.bid_per_gpu!r} needs --interruptible and a price above 0.",
                  "Add --interruptible, or drop --bid-per-gpu")
    if r.budget_usd is not None and r.budget_usd <= 0:
        raise bad(f"budget_usd {r.budget_usd!r} must be above 0.",
                  "Set [cloud] budget_usd in trainctl.toml to a positive amount, or remove it")
    if r.grace_period_s < 0 or r.attempt < 0 or r.spent_usd < 0:
        raise bad("grace_period_s, attempt and spent_usd can't be negative.", "Fix the request")


def pod_environment(r: PodRequest, deadline: datetime) -> dict[str, str]:
    """TRAIN_OPS_* and what the agent needs; secrets only as RunPod secret references."""
    env = {
        SESSION_MARKER: r.session_id,
        "TRAIN_OPS_BACKEND": "runpod",
        ATTEMPT_MARKER: str(r.attempt),
        DEADLINE_VARIABLE: _iso(deadline),
        "PYTHONUNBUFFERED": "1",
    }
    given = [(name, value, False) for name, value in r.env.items()] + \
            [(name, secret, True) for name, secret in r.secrets.items()]
    for name, value, is_secret in given:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise UnsafeEnvironmentError(str(name), f"{name!r} is not an environment variable "
                                         "name.", "Use letters, digits and _, not starting "
                                                  "with a digit")
        if name.upper().startswith("RUNPOD_"):
            why = ("RunPod injects a pod-scoped RUNPOD_API_KEY itself: your own key never goes "
                   "to a pod" if name.upper() == "RUNPOD_API_KEY"
                   else "RUNPOD_* variables are RunPod's own")
            raise UnsafeEnvironmentError(name, f"{name} can't be sent to the pod: {why}.",
                                         f"Remove {name} from the pod's environment")
        if name in env:
            raise UnsafeEnvironmentError(name, f"{name} is set by trainctl itself.",
                                         f"Remove {name} from the pod's environment")
        if not isinstance(value, str):
            raise UnsafeEnvironmentError(name, f"The value of {name} is not a string.",
                                         "Pass environment values as strings")
        if is_secret:
            if not _SECRET_NAME.match(value) or value.lower().startswith("runpod"):
                raise UnsafeEnvironmentError(
                    name, f"{value!r} is not a RunPod secret name (for {name}).",
                    "Secret names start with a letter or _, then letters, digits, _ . - /; "
                    "not RUNPOD...")
            value = secret_reference(value)
        elif is_secret_name(name) and not _SECRET_REF.match(value):
            raise UnsafeEnvironmentError(
                name, f"{name} looks like a credential and would reach the pod in clear.",
                f"Store it as a RunPod secret (console.runpod.io/user/secrets) and pass it by "
                f"name: --secret {name}=SECRET_NAME")
        env[name] = value
    if len(env) > MAX_ENV:
        raise InvalidPodRequestError(f"{len(env)} environment variables; RunPod takes at most "
                                     f"{MAX_ENV}.", "Send fewer variables")
    return env


def plan(request: PodRequest, facts: Facts) -> PodPlan:
    """The launch plan, or the typed error that stops it (bad input, no GPU, budget, balance)."""
    r = request
    _check_request(r)
    offer = find_gpu(facts.offers, r.gpu)
    market = r.market
    if not offer.available(r.cloud, market, r.gpu_count):
        raise GpuUnavailableError(
            f"{r.gpu_count} x {offer.id} on {r.cloud} cloud ({market})",
            alternatives(facts.offers, offer, r.cloud, market, r.gpu_count))
    cloud = offer.cloud(r.cloud)
    price = cloud.price_per_gpu(market)
    assert price is not None  # available() checked it
    if r.interruptible and r.bid_per_gpu is not None:
        if cloud.min_bid_hr is not None and r.bid_per_gpu < cloud.min_bid_hr:
            raise InvalidPodRequestError(
                f"--bid-per-gpu ${r.bid_per_gpu:.3f} is below RunPod's current minimum "
                f"${cloud.min_bid_hr:.3f} for {offer.id} on {r.cloud} cloud.",
                f"Bid at least {cloud.min_bid_hr:.3f}, or drop --bid-per-gpu")
        price = r.bid_per_gpu
    price_hr = price * r.gpu_count

    read_at = facts.read_at.astimezone(timezone.utc)
    if r.deadline_utc is not None:
        deadline = r.deadline_utc.astimezone(timezone.utc)
        if deadline <= read_at:
            raise InvalidPodRequestError(
                f"The session's deadline {_when(deadline)} has passed.",
                "Start a new session, or pass a larger --max-hours to resume past it")
    else:
        deadline = read_at + timedelta(hours=r.max_hours)
    deadline = deadline.replace(microsecond=0)
    hours = (deadline - read_at).total_seconds() / 3600
    projected = price_hr * hours

    if r.budget_usd is not None and r.spent_usd + projected > r.budget_usd + 1e-9:
        fit = max(0.0, (r.budget_usd - r.spent_usd) / price_hr)
        raise BudgetExceededError(projected, r.budget_usd, r.spent_usd, fit, price_hr, hours)
    if facts.balance_usd is not None:
        needed = price_hr + facts.spend_per_hr_usd
        if facts.balance_usd < needed:
            detail = f"this pod ${price_hr:.2f}/h" + (
                f" + running pods ${facts.spend_per_hr_usd:.2f}/h"
                if facts.spend_per_hr_usd else "")
            raise InsufficientBalanceError.below_one_hour(facts.balance_usd, needed, detail)

    data_center = None
    if r.network_volume_id:
        if r.network_volume_id not in facts.network_volumes:
            raise InvalidPodRequestError(
                f"No network volume {r.network_volume_id!r} on this RunPod account.",
                "List them at https://console.runpod.io/user/storage")
        data_center = facts.network_volumes[r.network_volume_id] or None

    cuda = r.image_cuda or image_cuda(r.image)
    allowed = allowed_cuda_versions(cuda)
    env = pod_environment(r, deadline)
    script = startscript.render(session_id=r.session_id, attempt=r.attempt,
                                agent_command=r.agent_command, deadline=deadline,
                                grace_period_s=r.grace_period_s,
                                keep_on_failure=r.keep_on_failure)
    name = f"{NAME_PREFIX}{r.name or r.session_id}-a{r.attempt}"

    pod_input: dict[str, Any] = {
        "name": name,
        "imageName": r.image,
        "gpuTypeId": offer.id,
        "gpuCount": r.gpu_count,
        "cloudType": r.cloud.upper(),
        "containerDiskInGb": r.container_disk_gb,
        "volumeInGb": r.volume_gb,
        "minVcpuCount": 1,
        "minMemoryInGb": 1,
        "dockerArgs": startscript.docker_args(script),
        "env": [{"key": k, "value": v} for k, v in env.items()],
        "ports": SSH_PORT,
        "startSsh": True,
        "supportPublicIp": True,
        "terminateAfter": _iso(deadline + timedelta(seconds=r.grace_period_s)
                               + TERMINATE_AFTER_MARGIN),
    }
    if r.volume_gb or r.network_volume_id:
        pod_input["volumeMountPath"] = VOLUME_MOUNT
    if r.network_volume_id:
        pod_input["networkVolumeId"] = r.network_volume_id
        if data_center:
            pod_input["dataCenterId"] = data_center
    if allowed:
        pod_input["allowedCudaVersions"] = allowed
    if r.interruptible:
        pod_input["bidPerGpu"] = round(price, 6)

    warnings = _warnings(r, cuda, facts, price_hr, projected)
    return PodPlan(
        request=r, offer=offer, price_per_gpu_hr=price, price_read_at=read_at,
        deadline_utc=deadline, hours=hours, projected_usd=projected,
        balance_usd=facts.balance_usd, spend_per_hr_usd=facts.spend_per_hr_usd,
        image_cuda=cuda, allowed_cuda_versions=allowed, pod_name=name, env=env,
        mutation="podRentInterruptable" if r.interruptible else "podFindAndDeployOnDemand",
        pod_input=pod_input, start_script=script, data_center=data_center,
        warnings=tuple(warnings),
        alternatives=tuple(alternatives(facts.offers, offer, r.cloud, market, r.gpu_count)))


def _warnings(r: PodRequest, cuda: str | None, facts: Facts, price_hr: float,
              projected: float) -> Sequence[str]:
    out = []
    if cuda is None:
        out.append(f"the CUDA version of {r.image} is unknown, so any host is accepted; a host "
                   "with an older driver may fail to run it (set the image's CUDA to filter)")
    if facts.balance_usd is not None and facts.balance_usd < projected + \
            facts.spend_per_hr_usd * (projected / price_hr):
        out.append(f"the balance ${facts.balance_usd:.2f} runs out before the deadline at this "
                   "spend; RunPod then stops every pod on the account")
    if r.volume_gb:
        out.append(f"a stopped pod keeps billing its {r.volume_gb} GB volume until terminated")
    if r.network_volume_id:
        out.append("a network volume pins the pod to its datacenter: fewer GPUs to choose from")
    return out
