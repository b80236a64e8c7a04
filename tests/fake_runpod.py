"""A stateful fake of RunPod's GraphQL API on 127.0.0.1, for the real runpod SDK and trainctl.

It speaks ``POST {RUNPOD_API_BASE_URL}/graphql`` the way the SDK (runpod 1.12) and trainctl use
it: the SDK's pasted queries (``myself { pods }``, ``pod(input: {podId: "..."})``, ``myself``)
and trainctl's operations with variables, whose declared types and input fields it checks the
way a GraphQL server would. State: GPU types with secure/community prices and stock, a balance,
network volumes, and pods (created -> RUNNING once ``provision_ticks`` more requests arrived ->
EXITED on stop or interruption, volume kept -> gone on terminate). Every request is logged for
golden assertions; errors, HTTP failures and dropped answers come on demand.

What RunPod really answers in a few cases is not public; those messages are this fake's
assumptions and are marked ``ASSUMED``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from trainctl.cloud.runpod.api import ApiKey, RunPodClient

API_KEY = "rpa_user_key_for_tests"
NO_CAPACITY = ("There are no longer any instances available with the requested specifications. "
               "Please refresh and try again.")
NOT_FOUND_TO_TERMINATE = "pod not found to terminate"  # as dstack matches it
NO_FUNDS = "Insufficient balance to deploy this pod."  # ASSUMED wording
PULL_FAILED = "error pulling image: manifest unknown"  # ASSUMED wording (lastStatusChange)

_COMMON_INPUT = {
    "name", "imageName", "gpuTypeId", "gpuCount", "cloudType", "containerDiskInGb", "volumeInGb",
    "volumeMountPath", "minVcpuCount", "minMemoryInGb", "dockerArgs", "ports", "env", "startSsh",
    "startJupyter", "supportPublicIp", "dataCenterId", "countryCode", "networkVolumeId",
    "allowedCudaVersions", "templateId", "minDownload", "minUpload", "stopAfter",
    "terminateAfter", "cudaVersion", "volumeKey",
}
INPUT_TYPES = {
    "podFindAndDeployOnDemand": ("PodFindAndDeployOnDemandInput", _COMMON_INPUT),
    "podRentInterruptable": ("PodRentInterruptableInput", _COMMON_INPUT | {"bidPerGpu"}),
    "podStop": ("PodStopInput", {"podId", "incrementVersion"}),
    "podTerminate": ("PodTerminateInput", {"podId"}),
    "podResume": ("PodResumeInput", {"podId", "gpuCount"}),
}


@dataclass
class Gpu:
    id: str
    memory_gb: int
    secure_price: float | None
    community_price: float | None
    secure_spot: float | None
    community_spot: float | None
    secure_stock: str | None = "High"
    community_stock: str | None = "High"
    max_count: int = 8

    def stock(self, secure: bool) -> str | None:
        return self.secure_stock if secure else self.community_stock

    def price(self, secure: bool) -> float | None:
        return self.secure_price if secure else self.community_price

    def spot(self, secure: bool) -> float | None:
        return self.secure_spot if secure else self.community_spot


def default_gpus() -> list[Gpu]:
    return [
        Gpu("NVIDIA RTX A4000", 16, 0.17, 0.09, 0.10, 0.06),
        Gpu("NVIDIA RTX A4500", 20, 0.19, 0.12, 0.11, 0.07),
        Gpu("NVIDIA GeForce RTX 4090", 24, 0.69, 0.34, 0.35, 0.20),
        Gpu("NVIDIA A40", 48, 0.40, None, 0.20, None, community_stock=None),
        Gpu("NVIDIA H100 80GB HBM3", 80, 2.99, None, 1.75, None, community_stock=None,
            secure_stock="Low"),
    ]


@dataclass
class Pod:
    id: str
    key: str  # the pod-scoped RUNPOD_API_KEY RunPod injects
    input: dict[str, Any]
    kind: str  # podFindAndDeployOnDemand or podRentInterruptable
    cost_per_hr: float
    created_tick: int
    ready_tick: int | None  # None: never leaves provisioning
    desired: str = "RUNNING"
    status_message: str = "Rented by User"
    uptime_s: float = 0.0

    def env_list(self) -> list[str]:
        return [f"{e['key']}={e['value']}" for e in self.input.get("env") or []]


@dataclass
class Failure:
    operation: str
    message: str | None = None
    status: int = 200
    drop: bool = False  # close the connection without answering
    after: bool = False  # ... after doing the work (a create whose answer is lost)
    times: int = 1


class GraphQLError(Exception):
    pass


class FakeRunPod:
    def __init__(self) -> None:
        self.api_key = API_KEY
        self.gpus = {g.id: g for g in default_gpus()}
        self.balance = 25.0
        self.network_volumes = [{"id": "nv1abc", "name": "data", "size": 100,
                                 "dataCenterId": "EU-RO-1"}]
        self.pods: dict[str, Pod] = {}
        self.terminated: list[tuple[str, str]] = []  # (pod id, who: user or pod)
        self.requests: list[dict[str, Any]] = []
        self.failures: list[Failure] = []
        self.provision_ticks: int | None = 1
        self.secrets: dict[str, str] = {}  # RunPod secrets: name -> value
        self.on_terminate: dict[str, Any] = {}  # pod id -> called once its termination is answered
        self._after: list[Any] = []
        self.stuck_images: set[str] = set()
        self.bad_images: set[str] = set()
        self.tick = 0
        self._counter = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- control --------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeRunPod:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def fail(self, operation: str, message: str | None = None, *, status: int = 200,
             drop: bool = False, after: bool = False, times: int = 1) -> None:
        self.failures.append(Failure(operation, message, status, drop, after, times))

    def interrupt(self, pod_id: str) -> None:
        """What an outbid interruptible pod goes through: stopped, volume kept."""
        with self._lock:
            pod = self.pods[pod_id]
            pod.desired = "EXITED"
            pod.status_message = "Exited by RunPod: interrupted"  # ASSUMED wording

    def pod_environment(self, pod_id: str) -> dict[str, str]:
        """What RunPod puts in the container's environment: the pod's env, its secret references
        replaced by the secrets' values, plus its own variables."""
        pod = self.pods[pod_id]
        env = {e["key"]: re.sub(r"\{\{ RUNPOD_SECRET_([A-Za-z0-9_.\-/]+) \}\}",
                                lambda m: self.secrets.get(m.group(1), m.group(0)), e["value"])
               for e in pod.input.get("env") or []}
        env.update(RUNPOD_POD_ID=pod.id, RUNPOD_API_KEY=pod.key)
        return env

    def operations(self) -> list[str]:
        return [r["operation"] for r in self.requests]

    # --- serving --------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        if handler.path != "/graphql":
            self._send(handler, 404, {"error": "not found"})
            return
        token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        try:
            body = json.loads(raw)
            query = body["query"]
            variables = body.get("variables") or {}
        except (ValueError, KeyError, TypeError):
            self._send(handler, 400, {"errors": [{"message": "bad request body"}]})
            return
        operation = _root_field(query)
        with self._lock:
            self.tick += 1
            who = "user" if token == self.api_key else next(
                (f"pod:{p.id}" for p in self.pods.values() if p.key == token), "unknown")
            entry = {"operation": operation, "query": query, "variables": variables,
                     "auth": who, "user_agent": handler.headers.get("User-Agent", "")}
            self.requests.append(entry)
            failure = next((f for f in self.failures if f.operation == operation), None)
            if failure is not None:
                failure.times -= 1
                if failure.times <= 0:
                    self.failures.remove(failure)
            if who == "unknown":
                entry["status"] = 401
                self._send(handler, 401, {"error": "Unauthorized"})
                return
            if failure is not None and not failure.after:
                self._fail(handler, failure, entry)
                return
            try:
                data = self._execute(operation, query, variables, who)
                answer: dict[str, Any] = {"data": data}
            except GraphQLError as e:
                answer = {"errors": [{"message": str(e), "path": [operation]}], "data": None}
            if failure is not None:
                self._fail(handler, failure, entry)
                return
            entry["status"] = 200
            after, self._after = self._after, []
        self._send(handler, 200, answer)
        for callback in after:
            callback()

    def _fail(self, handler: BaseHTTPRequestHandler, failure: Failure,
              entry: dict[str, Any]) -> None:
        entry["status"] = "dropped" if failure.drop else failure.status
        if failure.drop:
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if failure.message is not None:
            self._send(handler, failure.status,
                       {"errors": [{"message": failure.message}], "data": None})
        else:
            self._send(handler, failure.status, {"error": "upstream failure"})

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    # --- the API --------------------------------------------------------------------------

    def _execute(self, operation: str, query: str, variables: dict[str, Any], who: str) -> Any:
        _check_variables(query, variables)
        if who != "user" and operation not in ("podTerminate", "podStop", "pod"):
            raise GraphQLError("This API key is scoped to a pod.")  # ASSUMED wording
        if operation in INPUT_TYPES:
            pod_input = _input_of(operation, query, variables)
            if who != "user" and pod_input.get("podId") != who.removeprefix("pod:"):
                raise GraphQLError("This API key is scoped to another pod.")  # ASSUMED wording
            return {operation: getattr(self, "_" + operation)(pod_input, who)}
        if operation == "pod":
            pod_id = (variables.get("input") or {}).get("podId") or _pasted(query, "podId")
            if who != "user" and pod_id != who.removeprefix("pod:"):
                raise GraphQLError("This API key is scoped to another pod.")
            pod = self.pods.get(pod_id or "")
            return {"pod": self._pod_json(pod) if pod else None}
        if operation == "myself":
            return {"myself": self._myself()}
        if operation == "gpuTypes":
            return {"gpuTypes": self._gpu_types(query, variables)}
        raise GraphQLError(f'Cannot query field "{operation}" on type "Query".')

    def _myself(self) -> dict[str, Any]:
        running = [p for p in self.pods.values() if p.desired == "RUNNING"]
        return {"id": "user_fake", "pubKey": "", "networkVolumes": self.network_volumes,
                "clientBalance": self.balance,
                "currentSpendPerHr": round(sum(p.cost_per_hr for p in running), 6),
                "pods": [self._pod_json(p) for p in self.pods.values()]}

    def _gpu_types(self, query: str, variables: dict[str, Any]) -> list[dict[str, Any]]:
        only = _pasted(query, "id")
        aliases = re.findall(r"(\w+)\s*:\s*lowestPrice\s*\(\s*input\s*:\s*\$(\w+)\s*\)", query)
        pasted = re.search(r"(?<!:\s)lowestPrice\s*\(\s*input\s*:\s*\{\s*gpuCount\s*:\s*(\d+)",
                           query)
        out = []
        for g in self.gpus.values():
            if only and g.id != only:
                continue
            item: dict[str, Any] = {
                "id": g.id, "displayName": g.id.removeprefix("NVIDIA ").removeprefix("GeForce "),
                "memoryInGb": g.memory_gb, "maxGpuCount": g.max_count, "manufacturer": "Nvidia",
                "secureCloud": g.secure_price is not None,
                "communityCloud": g.community_price is not None,
                "securePrice": g.secure_price or 0, "communityPrice": g.community_price or 0,
                "secureSpotPrice": g.secure_spot, "communitySpotPrice": g.community_spot,
            }
            for alias, var in aliases:
                spec = variables.get(var) or {}
                item[alias] = self._lowest(g, bool(spec.get("secureCloud", True)),
                                           int(spec.get("gpuCount") or 1))
            if pasted:
                item["lowestPrice"] = self._lowest(g, True, int(pasted.group(1)))
            out.append(item)
        return out

    def _lowest(self, g: Gpu, secure: bool, count: int) -> dict[str, Any] | None:
        if g.stock(secure) is None or g.price(secure) is None or count > g.max_count:
            return None
        return {"minimumBidPrice": g.spot(secure), "uninterruptablePrice": g.price(secure),
                "stockStatus": g.stock(secure), "maxUnreservedGpuCount": g.max_count}

    def _create(self, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        for required in ("name", "imageName", "gpuTypeId", "cloudType"):
            if spec.get(required) in (None, ""):
                raise GraphQLError(f'Field "{required}" of required type was not provided.')
        if spec["cloudType"] not in ("SECURE", "COMMUNITY", "ALL"):
            raise GraphQLError(f'Value "{spec["cloudType"]}" does not exist in "CloudTypeEnum".')
        for item in spec.get("env") or []:
            if set(item) != {"key", "value"} or not all(isinstance(v, str) for v in item.values()):
                raise GraphQLError('Expected type "EnvironmentVariableInput".')
        gpu = self.gpus.get(spec["gpuTypeId"])
        clouds = {"SECURE": [True], "COMMUNITY": [False], "ALL": [True, False]}[spec["cloudType"]]
        count = int(spec.get("gpuCount") or 1)
        cloud = next((c for c in clouds if gpu and gpu.stock(c) and gpu.price(c) is not None
                      and count <= gpu.max_count), None)
        if gpu is None or cloud is None:
            raise GraphQLError(NO_CAPACITY)
        if kind == "podRentInterruptable":
            bid = spec.get("bidPerGpu")
            if not isinstance(bid, (int, float)) or bid < (gpu.spot(cloud) or 0):
                raise GraphQLError("Your bid is below the minimum bid price.")  # ASSUMED
            cost = bid * count
        else:
            cost = (gpu.price(cloud) or 0) * count
        if self.balance < cost:
            raise GraphQLError(NO_FUNDS)
        self._counter += 1
        pod_id = f"fk{self._counter:04d}xq7m2z"
        image = spec["imageName"]
        pod = Pod(pod_id, f"pod_key_{pod_id}", json.loads(json.dumps(spec)), kind,
                  round(cost, 6), self.tick,
                  None if image in self.stuck_images or image in self.bad_images
                  or self.provision_ticks is None else self.tick + self.provision_ticks)
        if image in self.bad_images:
            pod.status_message = PULL_FAILED
        self.pods[pod_id] = pod
        return {"id": pod_id, "name": spec["name"], "desiredStatus": "RUNNING",
                "imageName": image, "costPerHr": pod.cost_per_hr, "machineId": "m_fake",
                "env": pod.env_list(), "machine": {"podHostId": f"{pod_id}-host"}}

    def _podFindAndDeployOnDemand(self, spec: dict[str, Any], who: str) -> dict[str, Any]:
        return self._create("podFindAndDeployOnDemand", spec)

    def _podRentInterruptable(self, spec: dict[str, Any], who: str) -> dict[str, Any]:
        return self._create("podRentInterruptable", spec)

    def _podStop(self, spec: dict[str, Any], who: str) -> dict[str, Any]:
        pod = self.pods.get(spec.get("podId") or "")
        if pod is None:
            raise GraphQLError("pod not found")
        pod.desired = "EXITED"
        pod.status_message = "Exited by User"
        return {"id": pod.id, "desiredStatus": "EXITED"}

    def _podTerminate(self, spec: dict[str, Any], who: str) -> None:
        pod = self.pods.pop(spec.get("podId") or "", None)
        if pod is None:
            raise GraphQLError(NOT_FOUND_TO_TERMINATE)
        self.terminated.append((pod.id, "pod" if who.startswith("pod:") else "user"))
        if pod.id in self.on_terminate:
            self._after.append(self.on_terminate.pop(pod.id))
        return None

    def _podResume(self, spec: dict[str, Any], who: str) -> dict[str, Any]:
        raise GraphQLError("There are not enough free GPUs on the host machine to start this "
                           "pod.")

    def _pod_json(self, pod: Pod) -> dict[str, Any]:
        spec = pod.input
        ready = pod.desired == "RUNNING" and pod.ready_tick is not None and \
            self.tick >= pod.ready_tick
        runtime = {"uptimeInSeconds": int(pod.uptime_s), "ports": [
            {"ip": "203.0.113.7", "isIpPublic": True, "privatePort": 22,
             "publicPort": 40022, "type": "tcp"}]} if ready else None
        gpu = self.gpus.get(spec.get("gpuTypeId") or "")
        return {
            "id": pod.id, "name": spec.get("name"), "imageName": spec.get("imageName"),
            "desiredStatus": pod.desired, "lastStatusChange": pod.status_message,
            "env": pod.env_list(), "gpuCount": spec.get("gpuCount"),
            "costPerHr": pod.cost_per_hr if pod.desired == "RUNNING" else 0,
            "uptimeSeconds": int(pod.uptime_s) if ready else 0,
            "containerDiskInGb": spec.get("containerDiskInGb"),
            "volumeInGb": spec.get("volumeInGb"), "volumeMountPath": spec.get("volumeMountPath"),
            "dockerArgs": spec.get("dockerArgs"), "dockerId": None, "machineId": "m_fake",
            "memoryInGb": 31, "vcpuCount": 8, "port": None, "ports": spec.get("ports"),
            "podType": "INTERRUPTABLE" if pod.kind == "podRentInterruptable" else "RESERVED",
            "runtime": runtime,
            "machine": {"gpuDisplayName": gpu.id.removeprefix("NVIDIA ") if gpu else None},
        }


def _root_field(query: str) -> str:
    body = re.sub(r"#[^\n]*", "", query)
    brace = body.find("{")
    match = re.match(r"\s*(?:\w+\s*:\s*)?(\w+)", body[brace + 1:]) if brace >= 0 else None
    return match.group(1) if match else ""


def _pasted(query: str, key: str) -> str | None:
    match = re.search(rf'\b{key}\s*:\s*"([^"]*)"', query)
    return match.group(1) if match else None


def _check_variables(query: str, variables: dict[str, Any]) -> None:
    """Declared variables only, required ones given, as a GraphQL server validates."""
    header = re.match(r"\s*(?:query|mutation)\s*\w*\s*\(([^)]*)\)", query)
    declared = dict(re.findall(r"\$(\w+)\s*:\s*([\w!\[\]]+)", header.group(1))) if header else {}
    for used in set(re.findall(r"\$(\w+)", query)):
        if used not in declared:
            raise GraphQLError(f'Variable "${used}" is not defined.')
    for name, type_ in declared.items():
        if type_.endswith("!") and variables.get(name) is None:
            raise GraphQLError(f'Variable "${name}" of required type "{type_}" was not provided.')


def _input_of(operation: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    type_name, fields = INPUT_TYPES[operation]
    used = re.search(rf"{operation}\s*\(\s*input\s*:\s*\$(\w+)", query)
    if used:
        declared = re.search(rf"\${used.group(1)}\s*:\s*([\w!]+)", query)
        if not declared or declared.group(1).rstrip("!") != type_name:
            got = declared.group(1) if declared else "?"
            raise GraphQLError(f'Variable "${used.group(1)}" of type "{got}" used in position '
                               f'expecting type "{type_name}!".')
        spec = variables.get(used.group(1))
        if not isinstance(spec, dict):
            raise GraphQLError(f'Expected type "{type_name}".')
        for key in spec:
            if key not in fields:
                raise GraphQLError(f'Field "{key}" is not defined by type "{type_name}".')
        return spec
    if operation in ("podStop", "podTerminate", "podResume"):  # the SDK pastes these
        return {"podId": _pasted(query, "podId")}
    raise GraphQLError(f"{operation}: this fake takes the input as a variable only")


# --- no test reaches a non-loopback address ---------------------------------------------------


def _is_loopback(address: Any) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = address[0]
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Fail loudly if anything in this process connects off the machine."""
    original = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise AssertionError(f"test tried to reach a non-loopback address: {address!r}")
        return original(sock, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]


def assert_golden(path: Path, text: str) -> None:
    """Compare with a reviewed golden file; TRAINCTL_UPDATE_GOLDEN=1 rewrites it instead."""
    if os.environ.get("TRAINCTL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing: run once with TRAINCTL_UPDATE_GOLDEN=1 and review"
    assert text == path.read_text(encoding="utf-8")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRunPod]:
    """A running fake; HOME is a temp folder, RUNPOD_API_BASE_URL points at the fake, no key set."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    server = FakeRunPod().start()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", server.base_url)
    try:
        with loopback_only():
            yield server
    finally:
        server.stop()


@pytest.fixture
def client(fake: FakeRunPod) -> RunPodClient:
    """A client with the fake's user key and short retry delays."""
    return RunPodClient(ApiKey(API_KEY, "RUNPOD_API_KEY"), retry_delays_s=(0.05, 0.05))
