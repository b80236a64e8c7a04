"""Talking to RunPod: the API key, and one GraphQL transport that sends values as variables.

runpod 1.12's SDK pastes values into the GraphQL text unescaped (a quote or a newline in a pod
name or an environment value breaks or alters the request) and cannot create interruptible pods,
so every mutation here is sent as GraphQL with variables to the endpoint the SDK uses
(``{RUNPOD_API_BASE_URL}/graphql``). Reads go the same way, asking for the fields the SDK's
``get_pods``/``get_pod`` ask for: importing the SDK costs 1.3-3 s (`trainctl runpod list` took
3.1 s through it, 0.3 s without) and it sets the root logger to INFO on import, which put
botocore's credential lines into trainctl's output.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ... import __version__
from .errors import (
    AmbiguousCreateError,
    ApiKeyRejectedError,
    GpuUnavailableError,
    InsufficientBalanceError,
    InvalidPodRequestError,
    NoApiKeyError,
    RunPodApiError,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_BASE_URL = "https://api.runpod.io"
BASE_URL_VARIABLE = "RUNPOD_API_BASE_URL"  # the SDK reads the same variable
API_KEY_VARIABLE = "RUNPOD_API_KEY"
CONFIG_FILE = Path(".runpod") / "config.toml"  # under $HOME; written by `runpod config`

POD_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")

T = TypeVar("T")

# --- the exact operations trainctl sends (tests compare them as golden text) ----------------

CREATE_ON_DEMAND = """\
mutation TrainctlCreatePod($input: PodFindAndDeployOnDemandInput!) {
  podFindAndDeployOnDemand(input: $input) { id name desiredStatus imageName costPerHr machineId }
}"""

CREATE_INTERRUPTIBLE = """\
mutation TrainctlCreateInterruptiblePod($input: PodRentInterruptableInput!) {
  podRentInterruptable(input: $input) { id name desiredStatus imageName costPerHr machineId }
}"""

STOP_POD = """\
mutation TrainctlStopPod($input: PodStopInput!) {
  podStop(input: $input) { id desiredStatus }
}"""

TERMINATE_POD = """\
mutation TrainctlTerminatePod($input: PodTerminateInput!) {
  podTerminate(input: $input)
}"""

_PRICE_FIELDS = "minimumBidPrice uninterruptablePrice stockStatus maxUnreservedGpuCount"
GPU_TYPES = f"""\
query TrainctlGpuTypes($secure: GpuLowestPriceInput, $community: GpuLowestPriceInput) {{
  gpuTypes {{
    id displayName memoryInGb maxGpuCount secureCloud communityCloud
    securePrice communityPrice secureSpotPrice communitySpotPrice
    secure: lowestPrice(input: $secure) {{ {_PRICE_FIELDS} }}
    community: lowestPrice(input: $community) {{ {_PRICE_FIELDS} }}
  }}
}}"""

ACCOUNT = """\
query TrainctlAccount {
  myself { id clientBalance currentSpendPerHr }
}"""

# what the SDK's get_pods/get_pod ask for
POD_FIELDS = """\
id name desiredStatus lastStatusChange imageName env gpuCount costPerHr uptimeSeconds
    containerDiskInGb volumeInGb volumeMountPath memoryInGb vcpuCount podType dockerArgs machineId
    runtime { ports { ip isIpPublic privatePort publicPort type } }
    machine { gpuDisplayName }"""

LIST_PODS = f"""\
query TrainctlPods {{
  myself {{ pods {{
    {POD_FIELDS}
  }} }}
}}"""

GET_POD = f"""\
query TrainctlPod($input: PodFilter!) {{
  pod(input: $input) {{
    {POD_FIELDS}
  }}
}}"""

NETWORK_VOLUMES = """\
query TrainctlNetworkVolumes {
  myself { networkVolumes { id name size dataCenterId } }
}"""

MUTATIONS = {"podFindAndDeployOnDemand": CREATE_ON_DEMAND,
             "podRentInterruptable": CREATE_INTERRUPTIBLE}

# Fragments of RunPod's own error messages, matched case-insensitively.
_NO_CAPACITY = ("no longer any instances available", "not enough free gpus",
                "no instances available", "does not have the resources")
_NO_FUNDS = ("insufficient balance", "not enough funds", "insufficient funds",
             "balance is too low", "add funds")
_NOT_FOUND = ("not found",)


@dataclass(frozen=True)
class ApiKey:
    """The user's RunPod key and where it came from (never printed)."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"ApiKey(source={self.source!r})"


def resolve_api_key(environ: Mapping[str, str] | None = None,
                    home: Path | None = None) -> ApiKey:
    """RUNPOD_API_KEY, else ``[default] api_key`` of ~/.runpod/config.toml (read now, not cached)."""
    env = os.environ if environ is None else environ
    value = (env.get(API_KEY_VARIABLE) or "").strip()
    if value:
        return ApiKey(value, API_KEY_VARIABLE)
    path = (home if home is not None else Path.home()) / CONFIG_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        data = {}
    profile = data.get("default")
    value = profile.get("api_key") if isinstance(profile, dict) else None
    if isinstance(value, str) and value.strip():
        return ApiKey(value.strip(), "~/" + CONFIG_FILE.as_posix())
    raise NoApiKeyError()


def api_base_url(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return (env.get(BASE_URL_VARIABLE) or DEFAULT_BASE_URL).rstrip("/")


def check_pod_id(pod_id: str) -> str:
    """Pod ids are short alphanumerics; anything else is refused before a request is built."""
    if not isinstance(pod_id, str) or not POD_ID.match(pod_id):
        raise InvalidPodRequestError(f"Not a RunPod pod id: {pod_id!r}.",
                                     "Pod ids are letters and digits; see: trainctl runpod list")
    return pod_id


def _classify(message: str, operation: str) -> Exception:
    low = message.lower()
    if any(s in low for s in _NO_CAPACITY):
        return GpuUnavailableError("capacity for this request", [], detail=message)
    if any(s in low for s in _NO_FUNDS):
        return InsufficientBalanceError(f"RunPod refused {operation}: {message}")
    return RunPodApiError(f"RunPod API error in {operation}: {message}", operation=operation)


class RunPodClient:
    """One account's API. Reads retry on network errors and 5xx; creates never retry blindly."""

    def __init__(self, api_key: ApiKey, *, timeout_s: float = 30.0,
                 retry_delays_s: Sequence[float] = (1.0, 4.0),
                 environ: Mapping[str, str] | None = None) -> None:
        self.api_key = api_key
        self.base_url = api_base_url(environ)
        self.timeout_s = timeout_s
        self.retry_delays_s = tuple(retry_delays_s)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None,
                         home: Path | None = None, **kwargs: Any) -> RunPodClient:
        return cls(resolve_api_key(environ, home), environ=environ, **kwargs)

    @property
    def graphql_url(self) -> str:
        return f"{self.base_url}/graphql"

    # --- transport --------------------------------------------------------------------------

    def graphql(self, query: str, variables: Mapping[str, Any] | None, *, operation: str,
                retry: bool = True) -> dict[str, Any]:
        """POST one operation with its variables; return ``data`` or raise a typed error."""
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(self.graphql_url, data=body, method="POST", headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self.api_key.value}",
            "User-Agent": f"trainctl/{__version__}",
        })

        def send() -> dict[str, Any]:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    raise ApiKeyRejectedError(self.api_key.source) from e
                payload = e.read() or b""
                errors = _errors_in(payload)
                if errors:
                    raise _classify(errors, operation) from e
                if not retry and e.code >= 500:
                    raise AmbiguousCreateError(
                        f"RunPod answered HTTP {e.code} to {operation}: the pod may exist.",
                        operation=operation) from e
                raise RunPodApiError(f"RunPod API answered HTTP {e.code} to {operation}.",
                                     operation=operation, retryable=e.code >= 500) from e
            except (TimeoutError, urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                if not retry and _maybe_sent(e):
                    raise AmbiguousCreateError(
                        f"No answer from RunPod to {operation} ({reason}): the pod may exist.",
                        operation=operation) from e
                raise RunPodApiError(f"Could not reach RunPod at {self.graphql_url} ({reason}).",
                                     operation=operation, retryable=True) from e
            try:
                decoded = json.loads(payload)
            except ValueError as e:
                raise RunPodApiError(f"RunPod answered {operation} with something that is not "
                                     "JSON.", operation=operation) from e
            errors = _errors_in(payload, decoded)
            if errors:
                raise _classify(errors, operation)
            data = decoded.get("data") if isinstance(decoded, dict) else None
            if not isinstance(data, dict):
                raise RunPodApiError(f"RunPod answered {operation} without data.",
                                     operation=operation)
            return data

        return self._retrying(send, retry)

    def _retrying(self, call: Callable[[], T], retry: bool) -> T:
        delays = self.retry_delays_s if retry else ()
        for delay in (*delays, None):
            try:
                return call()
            except RunPodApiError as e:
                if delay is None or not e.retryable:
                    raise
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- reads ------------------------------------------------------------------------------

    def list_pods(self) -> list[dict[str, Any]]:
        """Every pod on the account."""
        me = self.graphql(LIST_PODS, None, operation="myself").get("myself")
        pods = me.get("pods") if isinstance(me, dict) else None
        return [p for p in pods or [] if isinstance(p, dict)]

    def get_pod(self, pod_id: str) -> dict[str, Any] | None:
        """One pod, or None once it is terminated."""
        data = self.graphql(GET_POD, {"input": {"podId": check_pod_id(pod_id)}}, operation="pod")
        pod = data.get("pod")
        return pod if isinstance(pod, dict) else None

    def network_volumes(self) -> dict[str, str]:
        """Network volume id -> its datacenter."""
        me = self.graphql(NETWORK_VOLUMES, None, operation="myself").get("myself")
        volumes = me.get("networkVolumes") if isinstance(me, dict) else None
        return {v["id"]: v.get("dataCenterId") or "" for v in volumes or []
                if isinstance(v, dict) and v.get("id")}

    def gpu_types(self, gpu_count: int = 1) -> list[dict[str, Any]]:
        """GPU types with list prices and, per cloud, the current price and stock for gpu_count."""
        data = self.graphql(GPU_TYPES, {"secure": {"gpuCount": gpu_count, "secureCloud": True},
                                        "community": {"gpuCount": gpu_count,
                                                      "secureCloud": False}},
                            operation="gpuTypes")
        return [g for g in data.get("gpuTypes") or [] if isinstance(g, dict)]

    def account(self) -> dict[str, Any]:
        """Balance and what running pods spend per hour."""
        me = self.graphql(ACCOUNT, None, operation="myself").get("myself")
        if not isinstance(me, dict):
            raise RunPodApiError("RunPod returned no account for this key.", operation="myself")
        return me

    # --- mutations (always variables) ------------------------------------------------------

    def create_pod(self, mutation: str, pod_input: Mapping[str, Any]) -> dict[str, Any]:
        """podFindAndDeployOnDemand or podRentInterruptable; sent once (never retried)."""
        query = MUTATIONS[mutation]
        data = self.graphql(query, {"input": dict(pod_input)}, operation=mutation, retry=False)
        pod = data.get(mutation)
        if not isinstance(pod, dict) or not pod.get("id"):
            raise RunPodApiError(f"RunPod answered {mutation} without a pod id.",
                                 operation=mutation)
        return pod

    def stop_pod(self, pod_id: str) -> dict[str, Any]:
        data = self.graphql(STOP_POD, {"input": {"podId": check_pod_id(pod_id)}},
                            operation="podStop")
        return data.get("podStop") or {}

    def terminate_pod(self, pod_id: str) -> bool:
        """True when this call ended the pod, False when RunPod says it no longer exists."""
        try:
            self.graphql(TERMINATE_POD, {"input": {"podId": check_pod_id(pod_id)}},
                         operation="podTerminate")
        except RunPodApiError as e:
            if any(s in str(e).lower() for s in _NOT_FOUND):
                return False
            raise
        return True


def _errors_in(payload: bytes, decoded: Any = None) -> str:
    if decoded is None:
        try:
            decoded = json.loads(payload)
        except ValueError:
            return ""
    if not isinstance(decoded, dict) or not decoded.get("errors"):
        return ""
    errors = decoded["errors"]
    first = errors[0] if isinstance(errors, list) and errors else errors
    message = first.get("message") if isinstance(first, dict) else first
    return str(message or "unknown error")


def _maybe_sent(error: BaseException) -> bool:
    """A refused connection never reached RunPod; a reset or a timeout may have."""
    reason = getattr(error, "reason", error)
    return not isinstance(reason, (ConnectionRefusedError, socket.gaierror))
