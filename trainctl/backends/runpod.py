"""RunPod pods as a Backend: one pod per attempt, the session in object storage.

The laptop only launches, watches and records: `launch` uploads the code bundle (with a wheel of
trainctl) through `trainctl.storage` and creates a pod whose start command bootstraps trainctl
from storage and runs `trainctl agent`; the agent runs the same engine as `trainctl local`,
syncs events, output and verified checkpoints to storage, and ends its pod. Everything a later
process needs to reattach is in the Handle (pod id, the LaunchedPod, the session's storage URI).

`describe` reads the pod (RunPod's API) and the session's records in storage (`ended.json`,
`session.json`, `heartbeat.json`); where the handle names the session's folder on this machine,
it also mirrors the output and events segments there and records the end in session.json, so
`sessions logs/attach/show` work on a pod session as on a local one. Like LocalBackend's
`describe` keeping a stop deadline, it keeps the provisioning deadline: a pod that can't pull
its image, or is still provisioning past `provision_timeout_s`, is terminated and reported.

`plan` is pure over the facts it holds (GPU offers and the balance, read once and again when
older than FACTS_MAX_AGE_S): the provider plan (`trainctl.cloud.runpod.plan`), the storage
URI, the bundle summary and the resume checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..session import TERMINAL, Session, State, summarize_metrics
from .base import (
    Backend,
    Description,
    EndFailedError,
    Handle,
    LaunchPlan,
    LogChunk,
    MachineEnd,
    RunSpec,
)
from .cloud import SessionMirror, merge_remote_record

BACKEND = "runpod"
FACTS_MAX_AGE_S = 300.0  # prices and stock move; a plan made later reads them again
LOOK_CACHE_S = 1.0  # describe asks RunPod and storage at most this often per pod
MIRROR_EVERY_S = 1.0  # a follower copies storage's new output at most this often
POD_LOOK_EVERY_S = 5.0  # ... and asks RunPod about the pod at most this often
SIGNAL_GRACE_S = 5  # what RunPod gives a container between SIGTERM and SIGKILL
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
END_HOOK = "runpod"  # the agent's name for RunPodMachineEnd, below

# The pod's start command runs this with the system python3 of the image (where its CUDA torch
# is): it fetches trainctl's wheel from the session's storage (the pod has no trainctl, and PyPI
# is not where it comes from), checks the wheel's digest, installs it unless the same version is
# there, and becomes `trainctl agent` (exec: the start script's SIGTERM reaches the agent).
BOOTSTRAP = r'''import hashlib, json, os, subprocess, sys
e = os.environ
say = lambda text: print("trainctl bootstrap: " + text, file=sys.stderr, flush=True)
home = e["TRAINCTL_MACHINE_DIR"] = os.path.expanduser(e.get("TRAINCTL_MACHINE_DIR") or "~/trainctl")
e.setdefault("TRAINCTL_MACHINE_ID", e.get("RUNPOD_POD_ID", ""))
e.setdefault("PIP_ROOT_USER_ACTION", "ignore")
os.makedirs(home, exist_ok=True)
def pip(*what):
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-input",
                           "--disable-pip-version-check", *what])
try:
    import boto3
except ImportError:
    say("installing boto3 to read the session's storage")
    pip("boto3>=1.36")
    import boto3
from botocore.config import Config
mode = e.get("TRAINCTL_CHECKSUMS") or "when_supported"
endpoint = e.get("TRAINCTL_ENDPOINT_URL") or None
s3 = boto3.client("s3", endpoint_url=endpoint, region_name=e.get("TRAINCTL_REGION") or None,
                  config=Config(request_checksum_calculation=mode, response_checksum_validation=mode,
                                s3={"addressing_style": "path"} if endpoint else None))
bucket, _, prefix = e["TRAINCTL_STORAGE_URI"][len("s3://"):].partition("/")
base = "/".join(p.strip("/") for p in (prefix, e["TRAINCTL_PROJECT"], e["TRAINCTL_SESSION_ID"]) if p.strip("/"))
read = lambda key: s3.get_object(Bucket=bucket, Key=base + "/" + key)["Body"].read()
wheel = json.loads(read("code/bundle.json"))["wheel"]
data = read(wheel["key"])
if "sha256:" + hashlib.sha256(data).hexdigest() != wheel["sha256"]:
    sys.exit("trainctl bootstrap: " + wheel["key"] + " does not match its digest; not installed")
path = os.path.join(home, os.path.basename(wheel["file"]))
with open(path, "wb") as f:
    f.write(data)
try:
    import trainctl
    have = trainctl.__version__
except ImportError:
    have = None
if have != wheel["file"].split("-")[1]:
    say("installing " + wheel["file"])
    pip(path)
os.execv(sys.executable, [sys.executable, "-m", "trainctl", "agent", *sys.argv[1:]])
'''


@dataclass(frozen=True)
class PodSettings:
    """Where a pod session lives and what reaches its pod besides the resources: trainctl.toml's
    [cloud] and [runpod] tables, with the command line's choices over them."""

    storage: str  # [cloud] storage: s3://bucket/prefix (any S3-compatible store)
    project: str  # the project's name in storage: <storage>/<project>/<session>/
    endpoint_url: str | None = None
    region: str | None = None
    checksums: str = "when_supported"
    secrets: Mapping[str, str] = field(default_factory=dict)  # env name -> RunPod secret name
    budget_usd: float | None = None
    provision_timeout_s: float = 20 * 60.0
    setup: str = "auto"  # how the agent installs the project's requirements on the pod
    keep_on_failure: bool = False
    bundle_exclude: tuple[str, ...] = ()  # folders of the project left out of the code bundle
    grace_period_s: int = 120  # at the deadline: SIGTERM to the agent, then the pod ends

    def session_uri(self, session_id: str) -> str:
        from ..storage.uri import parse_uri

        return str(parse_uri(self.storage).join(self.project, session_id))


def storage_environment(settings: PodSettings, session_id: str) -> dict[str, str]:
    """What the bootstrap and the agent read to find the session (no secrets: the credentials
    come as RunPod secret references)."""
    env = {"TRAINCTL_STORAGE_URI": settings.storage, "TRAINCTL_PROJECT": settings.project,
           "TRAINCTL_SESSION_ID": session_id, "TRAINCTL_BACKEND": BACKEND,
           "TRAINCTL_CHECKSUMS": settings.checksums}
    if settings.endpoint_url:
        env["TRAINCTL_ENDPOINT_URL"] = settings.endpoint_url
    if settings.region:
        env["TRAINCTL_REGION"] = settings.region
    return env


def agent_command(script: str, args: tuple[str, ...], *, attempt: int, setup: str,
                  keep_on_failure: bool) -> tuple[str, ...]:
    """The pod's agent: the bootstrap, then `trainctl agent OPTIONS SCRIPT ARGS`."""
    options = ["--attempt", str(attempt), "--backend", BACKEND, "--watch", "signal",
               "--signal-grace", str(SIGNAL_GRACE_S), "--end", END_HOOK, "--setup", setup]
    if keep_on_failure:
        options.append("--keep-on-failure")
    return ("python3", "-c", BOOTSTRAP, *options, script, *args)


def agent_display(command: tuple[str, ...]) -> str:
    """The agent command as a plan shows it: the bootstrap named, not pasted."""
    import shlex

    return "python3 -c BOOTSTRAP " + shlex.join(command[3:]) + \
        " (BOOTSTRAP installs trainctl's wheel from storage, then runs trainctl agent)"


def _bundle_line(summary: dict[str, Any]) -> str:
    from ..config import format_size

    largest = ", ".join(f"{f['path']} {format_size(f['bytes'])}" for f in summary["largest"][:3])
    left = f"; {len(summary['skipped'])} left out" if summary["skipped"] else ""
    return (f"{summary['files']} files, {format_size(summary['bytes'])} ({summary['source']})"
            + (f"; largest: {largest}" if largest else "") + left)


def bundle_summary(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the code bundle will hold, without writing it (the plan shows it)."""
    from ..storage.bundle import select_files

    files, skipped, git = select_files(root, exclude=exclude)
    largest = sorted(files, key=lambda f: (-f[1], f[0]))[:5]
    return {"files": len(files), "bytes": sum(s for _, s in files), "source": "git" if git else "folder",
            "largest": [{"path": p, "bytes": s} for p, s in largest],
            "skipped": [{"path": p, "why": w} for p, w in skipped]}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


class RunPodBackend(Backend):
    """One RunPod pod per attempt; the session's record, code, logs and checkpoints in storage."""

    name = BACKEND

    def __init__(self, *, settings: PodSettings | None = None, client: Any = None) -> None:
        self.settings = settings
        self._client = client
        self._facts: dict[tuple[int, str | None], Any] = {}
        self._pinned: set[tuple[int, str | None]] = set()
        self._pod_plans: dict[tuple[str, int], Any] = {}
        self._specs: dict[str, RunSpec] = {}
        self._remotes: dict[tuple[str, ...], Any] = {}
        self._mirrors: dict[str, Any] = {}
        self._looks: dict[str, tuple[float, dict[str, Any]]] = {}
        self._stopping: dict[str, float] = {}  # pod id -> until when a stop waits for the agent

    # ------------------------------------------------------------------ RunPod and storage
    @property
    def client(self) -> Any:
        """The RunPod API with the user's key (read when first needed)."""
        if self._client is None:
            from ..cloud.runpod.api import RunPodClient

            self._client = RunPodClient.from_environment()
        return self._client

    def facts(self, gpu_count: int = 1, network_volume_id: str | None = None) -> Any:
        """GPU offers, balance and network volumes, as read from RunPod (cached a while)."""
        from ..cloud.runpod.plan import gather_facts

        key = (gpu_count, network_volume_id)
        found = self._facts.get(key)
        if found is None or (key not in self._pinned and
                             (datetime.now(timezone.utc) - found.read_at).total_seconds() > FACTS_MAX_AGE_S):
            found = self._facts[key] = gather_facts(self.client, gpu_count,
                                                    network_volume_id=network_volume_id)
        return found

    def use_facts(self, facts: Any, gpu_count: int = 1, network_volume_id: str | None = None) -> None:
        """Plan with these facts, however old (a plan shown, then launched as shown; tests)."""
        self._facts[(gpu_count, network_volume_id)] = facts
        self._pinned.add((gpu_count, network_volume_id))

    def remote(self, ids: Mapping[str, Any]) -> Any:
        """The session in storage, as the handle (or a launch) names it."""
        from ..storage import open_store
        from ..storage.remote import RemoteSession

        key = tuple(str(ids.get(k)) for k in ("storage", "endpoint_url", "region", "checksums", "session_dir"))
        if key in self._remotes:
            return self._remotes[key]

        # an interrupted multipart upload resumes from the session's folder here
        state = Path(ids["session_dir"]) / "uploads" if ids.get("session_dir") else None
        store = open_store(ids["storage"], endpoint_url=ids.get("endpoint_url") or None,
                           region=ids.get("region") or None,
                           checksums=ids.get("checksums") or "when_supported", upload_state_dir=state)
        found = self._remotes[key] = RemoteSession(store)
        return found

    # ------------------------------------------------------------------ plan
    def _require_settings(self) -> PodSettings:
        if self.settings is None:
            raise UsageError("This RunPod backend was made without settings; it can watch pods "
                             "but not plan them.", "Launch through: trainctl runpod launch")
        return self.settings

    def plan(self, spec: RunSpec) -> LaunchPlan:
        from ..cloud.runpod.plan import DEFAULT_IMAGE, PodRequest, display_env
        from ..cloud.runpod.plan import plan as pod_plan
        from ..storage.uri import parse_uri

        s = self._require_settings()
        if parse_uri(s.storage).scheme != "s3":
            raise UsageError(f"[cloud] storage = {s.storage!r} is a folder on this machine, which a "
                             "pod can't reach.",
                             'Set [cloud] storage = "s3://bucket/prefix" in trainctl.toml (AWS S3, '
                             "or R2, B2, MinIO with endpoint_url)")
        missing = [v for v in CREDENTIAL_VARIABLES if v not in s.secrets]
        if missing:
            raise UsageError(
                f"The pod needs credentials for {s.storage} and {', '.join(missing)} is not among "
                "the RunPod secrets it gets.",
                "Store the key id and secret as RunPod secrets (console.runpod.io/user/secrets), "
                "then map them: [runpod] secrets = { AWS_ACCESS_KEY_ID = \"<secret name>\", "
                "AWS_SECRET_ACCESS_KEY = \"<secret name>\" } or --secret NAME=SECRET_NAME")
        if not spec.session_id:
            raise UsageError("A RunPod plan needs the session's id.", "Launch through: trainctl runpod launch")
        root = Path(spec.cwd or Path.cwd()).resolve()
        script = Path(spec.script)
        script = (script if script.is_absolute() else Path.cwd() / script).resolve()
        try:
            script_rel = script.relative_to(root).as_posix()
        except ValueError:
            raise UsageError(f"{spec.script} is outside the project {root}, so it is not in the code "
                             "the pod gets.", "Move the script into the project, or run from the "
                             "project that holds it") from None
        r = dict(spec.resources)
        attempt = int(r.get("attempt", 0))
        summary = r.get("bundle") or bundle_summary(root, s.bundle_exclude)
        uri = s.session_uri(spec.session_id)
        resume = spec.resume or "none: a fresh start"
        command = agent_command(script_rel, tuple(spec.args), attempt=attempt, setup=s.setup,
                                keep_on_failure=s.keep_on_failure)
        deadline = r.get("deadline_utc")
        request = PodRequest(
            session_id=spec.session_id, agent_command=command, agent_display=agent_display(command),
            gpu=str(r.get("gpu") or ""), gpu_count=int(r.get("gpu_count", 1)),
            cloud=str(r.get("cloud", "secure")), interruptible=bool(r.get("interruptible", False)),
            bid_per_gpu=r.get("bid_per_gpu"), image=str(r.get("image") or DEFAULT_IMAGE),
            container_disk_gb=int(r.get("container_disk_gb", 50)), volume_gb=int(r.get("volume_gb", 0)),
            network_volume_id=r.get("network_volume_id") or None, max_hours=float(r.get("max_hours", 24.0)),
            deadline_utc=datetime.fromtimestamp(_parse_iso(deadline), timezone.utc)
            if _parse_iso(deadline) is not None else None,
            budget_usd=s.budget_usd, spent_usd=float(r.get("spent_usd", 0.0)), attempt=attempt,
            name=spec.name, env=storage_environment(s, spec.session_id), secrets=dict(s.secrets),
            keep_on_failure=s.keep_on_failure, grace_period_s=s.grace_period_s,
            notes=(("storage", uri + "/"), ("bundle", _bundle_line(summary)), ("resume", resume),
                   ("checkpoints", "uploaded to storage as the script writes them, each verified "
                                   "first; work lost on an interruption <= the checkpoint interval")))
        if not request.gpu:
            raise UsageError("No GPU type chosen.", "Pass --gpu \"NVIDIA RTX A4000\" or set [runpod] gpu "
                                                    "in trainctl.toml; see: trainctl runpod gpus")
        planned = pod_plan(request, self.facts(request.gpu_count, request.network_volume_id))
        self._pod_plans[(spec.session_id, attempt)] = planned
        self._specs[spec.session_id] = spec
        return LaunchPlan(
            backend=BACKEND, command=command, env=display_env(planned.env), cwd=str(root),
            resources={"gpu": planned.offer.id, "gpu_count": request.gpu_count, "cloud": request.cloud,
                       "market": planned.market, "memory_gb": planned.offer.memory_gb},
            output=uri + "/output/", checkpoint_location=uri + "/checkpoints/",
            cost_per_hour=round(planned.price_hr, 6),
            details={"session_id": spec.session_id, "attempt": attempt, "storage": uri,
                     "script": script_rel, "args": list(spec.args), "bundle": summary,
                     "resume": spec.resume, "session_dir": str(spec.session_dir) if spec.session_dir else None,
                     "deadline_utc": planned.deadline_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "projected_usd": round(planned.projected_usd, 4), "pod": planned.to_json(),
                     "text": planned.render_text()})

    # ------------------------------------------------------------------ launch
    def launch(self, plan: LaunchPlan, attempt: int) -> Handle:
        """Upload the code (first attempt), record the session in storage, create the pod."""
        from ..cloud.runpod import pods
        from ..cloud.runpod.plan import plan as pod_plan

        s = self._require_settings()
        session_id = plan.details["session_id"]
        planned = self._pod_plans.get((session_id, attempt))
        if planned is None:
            base = self._pod_plans.get((session_id, plan.details.get("attempt", 0)))
            if base is None:
                raise UsageError(f"No plan for session {session_id} in this process.",
                                 "Call plan(spec) before launch(plan, attempt)")
            planned = pod_plan(dataclasses.replace(base.request, attempt=attempt),
                               self.facts(base.request.gpu_count, base.request.network_volume_id))
        ids: dict[str, Any] = {"storage": plan.details["storage"], "endpoint_url": s.endpoint_url,
                               "region": s.region, "checksums": s.checksums, "session_id": session_id,
                               "session_dir": plan.details.get("session_dir"),
                               "provision_timeout_s": s.provision_timeout_s}
        remote = self.remote(ids)
        if remote.code_record() is None:
            self._publish_code(remote, Path(plan.cwd), plan.details)
        if remote.read_session() is None:
            remote.write_session(self._remote_record(plan))
        launched = pods.launch_pod(self.client, planned)
        ids.update(pod_id=launched.pod_id, pod=launched.to_json())
        handle = Handle(BACKEND, ids, attempt)
        folder = Path(ids["session_dir"]) if ids.get("session_dir") else None
        if folder is not None and (folder / "session.json").exists():
            session = Session(folder)
            session.update(cloud=cloud_record(session.read(), handle))
        return handle

    def _publish_code(self, remote: Any, root: Path, details: dict[str, Any]) -> dict[str, Any]:
        """The bundle and trainctl's wheel, then `code/bundle.json` naming both (written last:
        a pod that finds the record never meets a half-uploaded bundle)."""
        from ..storage.bundle import build_bundle, build_wheel

        s = self._require_settings()
        with tempfile.TemporaryDirectory(prefix="trainctl-bundle-") as tmp:
            bundle = build_bundle(root, Path(tmp) / "bundle.tar.gz", exclude=s.bundle_exclude)
            wheel, _ = build_wheel(tmp)
            return remote.put_code(bundle, wheel, run={"script": details["script"],
                                                       "args": list(details["args"])})

    def _remote_record(self, plan: LaunchPlan) -> dict[str, Any]:
        """session.json in storage, as the launcher knows the session (the agent adds the machine's)."""
        from ..redact import redact_args

        d = plan.details
        return {"id": d["session_id"], "status": State.PENDING.value, "backend": BACKEND,
                "created_at": time.time(), "script": d["script"], "args": redact_args(list(d["args"])),
                "name": self._specs[d["session_id"]].name if d["session_id"] in self._specs else None,
                "resources": dict(plan.resources), "checkpoint_location": plan.checkpoint_location,
                "deadline_utc": d.get("deadline_utc")}

    # ------------------------------------------------------------------ describe
    def _look(self, handle: Handle) -> dict[str, Any]:
        """What storage and RunPod say of the attempt now (the same answer for LOOK_CACHE_S:
        a caller polling describe does not poll RunPod that fast)."""
        from ..cloud.runpod.errors import RunPodError
        from ..storage import StorageError

        key = str(handle.ids.get("pod_id"))
        cached = self._looks.get(key)
        if cached is not None and time.monotonic() - cached[0] < LOOK_CACHE_S:
            return cached[1]
        look: dict[str, Any] = {"remote": None, "ended": None, "record": {}, "beat": None,
                                "raw": None, "pod_known": True, "errors": {}}
        try:
            remote = look["remote"] = self.remote(handle.ids)
            look["ended"] = remote.ended()
            look["record"] = remote.read_session() or {}
            look["beat"] = remote.read_heartbeat()
        except StorageError as e:
            look["errors"]["storage_error"] = e.message
        try:
            look["raw"] = self.client.get_pod(handle.ids["pod_id"])
        except RunPodError as e:
            look["pod_known"] = False
            look["errors"]["pod_error"] = e.message
        self._looks[key] = (time.monotonic(), look)
        return look

    def describe(self, handle: Handle) -> Description:
        from ..cloud.runpod import pods
        from ..cloud.runpod.errors import RunPodError

        ids = handle.ids
        look = self._look(handle)
        ended, record, beat, raw = look["ended"], look["record"], look["beat"], look["raw"]
        details: dict[str, Any] = {"pod_id": ids.get("pod_id"), **look["errors"], "heartbeat": beat,
                                   "ended": ended, "remote_status": record.get("status")}
        info = pods.pod_info(raw) if raw else None
        details["pod"] = info.to_json() if info else None
        state, why = self._state(ended, record, raw, look["pod_known"])
        until = self._stopping.get(str(ids.get("pod_id")))
        if state is State.PREEMPTED and until is not None and time.monotonic() < until \
                and record.get("status") not in [s.value for s in TERMINAL]:
            state, why = State.RUNNING, "stopping: the agent writes and uploads its emergency checkpoint"
        details["why"] = why
        if state is State.PENDING and raw is not None:
            launched = pods.LaunchedPod.from_json(ids["pod"])
            try:
                pods.check_provisioning(self.client, launched,
                                        timeout_s=float(ids["provision_timeout_s"] if ids.get("provision_timeout_s")
                                                          is not None else 1200))
            except RunPodError as e:
                state, details["why"], details["error"], details["hint"] = State.FAILED, e.message, e.message, e.hint
                self._looks.pop(str(ids.get("pod_id")), None)
        details["cost_usd"] = self._cost(ids, ended, beat, raw, state)
        exit_code = record.get("exit_code") if state in TERMINAL else None
        desc = Description(state, exit_code if isinstance(exit_code, int) else None,
                           record.get("signal") if state in TERMINAL else None, details)
        if ids.get("session_dir"):
            self._record_locally(handle, desc, look["remote"], record)
        return desc

    @staticmethod
    def _state(ended: Any, record: dict[str, Any], raw: dict[str, Any] | None,
               pod_known: bool) -> tuple[State, str]:
        from ..cloud.runpod.pods import pod_state

        def terminal(value: Any) -> State | None:
            try:
                found = State(value)
            except ValueError:
                return None
            return found if found in TERMINAL else None

        if isinstance(ended, dict):
            found = terminal(ended.get("status")) or terminal(record.get("status")) or State.FAILED
            return found, f"the agent ended the session: {ended.get('reason')}"
        if not pod_known:
            return State.RUNNING, "RunPod could not be asked about the pod"
        if raw is None:
            found = terminal(record.get("status"))
            if found is not None:
                return found, f"the pod is gone; the session recorded {found}"
            return State.FAILED, ("the pod ended before its agent recorded an end (see the pod's "
                                  "logs in RunPod's console while it exists)")
        state = pod_state(raw)
        if state == "stopped":
            return State.PREEMPTED, f"the pod stopped ({raw.get('lastStatusChange') or 'exited'}); " \
                                    "its volume keeps billing until it is terminated"
        if state == "provisioning":
            return State.PENDING, "the pod is provisioning"
        return State.RUNNING, "the pod runs"

    @staticmethod
    def _cost(ids: Mapping[str, Any], ended: Any, beat: Any, raw: dict[str, Any] | None,
              state: State) -> float | None:
        """What this attempt's pod cost so far: its price since it was created, until it ended."""
        pod = ids.get("pod") or {}
        start = _parse_iso(pod.get("created_at"))
        price = pod.get("price_hr_usd")
        if start is None or not isinstance(price, (int, float)):
            return None
        end = time.time()
        if raw is None or state in TERMINAL:
            marks = [x.get("t") for x in (ended, beat) if isinstance(x, dict) and isinstance(x.get("t"), (int, float))]
            if marks and raw is None:
                end = max(marks)
        return round(max(0.0, end - start) * price / 3600, 4)

    # ------------------------------------------------------------------ this machine's copy
    def _record_locally(self, handle: Handle, desc: Description, remote: Any,
                        record: dict[str, Any]) -> None:
        """Mirror storage's output and events into the session's folder here, and record the
        end in its session.json (once: the first process to see it)."""
        folder = Path(handle.ids["session_dir"])
        if not (folder / "session.json").exists():
            return
        session = Session(folder)
        if remote is not None:
            self.mirror(session, remote)
        data = session.read()
        if data.get("handle") != handle.to_json():
            return  # an earlier attempt: the session moved on
        fields: dict[str, Any] = {"cost_usd": self._session_cost(data, desc),
                                  "cloud": cloud_record(data, handle, desc)}
        if desc.state in TERMINAL and data.get("status") not in [s.value for s in TERMINAL]:
            status = State.STOPPED if data.get("stop_request") else desc.state
            now = time.time()
            attempts = data.get("attempts") or []
            if attempts and isinstance(attempts[-1], dict) and not attempts[-1].get("ended_at"):
                attempts[-1].update(ended_at=now, status=status.value, why=desc.details.get("why"))
            summary = {**summarize_metrics(session.metrics()),
                       "checkpoints": sum(1 for _ in session.iter_events(("checkpoint",)))}
            latest = None
            try:
                latest = remote.latest_checkpoint() if remote is not None else None
            except Exception:
                latest = None
            if latest:
                summary["last_checkpoint"] = f"{handle.ids['storage']}/{latest.get('checkpoint')}"
            fields.update(merge_remote_record(data, record))  # what the machine knows better
            fields.update(status=status.value, ended_at=now, exit_code=desc.exit_code,
                          signal=desc.signal, attempts=attempts,
                          summary={**(fields.get("summary") or {}), **summary},
                          end_reason=desc.details.get("why"))
            if desc.details.get("error"):
                fields["error"] = desc.details["error"]
            session.update(**fields)
            session.event("status", status=status.value, source=BACKEND, why=desc.details.get("why"))
            return
        if desc.state is State.RUNNING and data.get("status") == State.PENDING.value:
            fields["status"] = State.RUNNING.value
        if any(data.get(k) != v for k, v in fields.items()):
            session.update(**fields)

    @staticmethod
    def _session_cost(data: dict[str, Any], desc: Description) -> float | None:
        """Earlier attempts' cost (recorded as they ended) plus this one's so far."""
        earlier = sum(a.get("cost_usd") or 0.0 for a in (data.get("attempts") or [])[:-1]
                      if isinstance(a, dict))
        now = desc.details.get("cost_usd")
        return round(earlier + (now or 0.0), 2) if now is not None or earlier else None

    def mirror(self, session: Session, remote: Any) -> None:
        """Append what storage's output and events segments gained to output.log and
        events.jsonl here (the cloud backends' one SessionMirror)."""
        key = str(session.dir)
        found = self._mirrors.get(key)
        if found is None or found.remote is not remote:
            found = self._mirrors[key] = SessionMirror(session, remote)
        found.pull()

    # ------------------------------------------------------------------ output
    def log_iter(self, handle: Handle, since: int = 0, follow: bool = False) -> Iterator[LogChunk]:
        """The session's output as storage holds it (every attempt's, in order), from byte
        `since`; with `follow`, until the attempt ends."""
        folder = Path(handle.ids["session_dir"]) if handle.ids.get("session_dir") else None
        local = folder is not None and (folder / "session.json").exists()
        remote = self.remote(handle.ids)
        reader = None if local else remote.output_reader()
        position = 0
        next_look = 0.0
        while True:
            if local:
                assert folder is not None
                self.mirror(Session(folder), remote)
                chunks = _read_from(folder / "output.log", since)
            else:
                assert reader is not None
                data = reader.poll()
                chunks = []
                if position + len(data) > since:
                    cut = max(0, since - position)
                    chunks = [LogChunk(position + cut, data[cut:])]
                position += len(data)
            for chunk in chunks:
                since = chunk.offset + len(chunk.data)
                yield chunk
            if not follow:
                return
            now = time.monotonic()
            if now >= next_look:
                next_look = now + POD_LOOK_EVERY_S
                if not self.describe(handle).running:
                    follow = False  # one more copy: what the agent synced last
                    continue
            time.sleep(MIRROR_EVERY_S)

    # ------------------------------------------------------------------ stop and end
    def stop(self, handle: Handle, grace_period_s: float, *, signal_name: str = "SIGTERM") -> None:
        """Stop the pod (RunPod sends its container SIGTERM: the agent writes the emergency
        checkpoint and uploads it if it fits); with no grace period, terminate it at once."""
        from ..cloud.runpod import pods
        from ..cloud.runpod.errors import PodNotFoundError

        self._looks.pop(str(handle.ids.get("pod_id")), None)
        if grace_period_s <= 0:
            pods.terminate_pod(self.client, handle.ids["pod_id"])
            return
        # describe reports the attempt running until its agent records the end, or until then
        self._stopping[str(handle.ids["pod_id"])] = time.monotonic() + grace_period_s
        try:
            pods.stop_pod(self.client, handle.ids["pod_id"])
        except PodNotFoundError:
            pass  # already gone: nothing to stop

    def release(self, handle: Handle) -> None:
        """Terminate the pod (a stopped pod still bills its volume); a pod already gone is fine."""
        from ..cloud.runpod import pods

        self._looks.pop(str(handle.ids.get("pod_id")), None)
        pods.terminate_pod(self.client, handle.ids["pod_id"])

    def list(self) -> list[Handle]:
        from ..cloud.runpod import pods

        return [Handle(BACKEND, {"pod_id": p.id, "session_id": p.session_id}, p.attempt or 0)
                for p in pods.list_pods(self.client)]


def cloud_record(data: dict[str, Any], current: Handle, desc: Description | None = None) -> dict[str, Any]:
    """session.json's `cloud` table: the provider, storage, deadline and every pod the session
    had with its price and running time, so a listing can show the cost without asking RunPod."""
    handles = [Handle.from_json(a["handle"]) for a in data.get("attempts") or []
               if isinstance(a, dict) and isinstance(a.get("handle"), dict)]
    ended = {int(a.get("attempt", -1)): a.get("ended_at") for a in data.get("attempts") or []
             if isinstance(a, dict)}
    if all(h.ids.get("pod_id") != current.ids.get("pod_id") for h in handles):
        handles.append(current)
    machines = []
    for h in handles:
        pod = h.ids.get("pod") or {}
        end = ended.get(h.attempt)
        state = "terminated" if end is not None else None  # a pod is ended before the next
        if desc is not None and h.ids.get("pod_id") == current.ids.get("pod_id"):
            state = (desc.details.get("pod") or {}).get("state") or "terminated"
            if desc.state in TERMINAL and end is None:
                end = time.time()
        machines.append({"id": h.ids.get("pod_id"), "type": f"{pod.get('gpu_count', 1)} x {pod.get('gpu')}",
                         "market": pod.get("market"), "usd_per_hour": pod.get("price_hr_usd"),
                         "price_source": "RunPod API at launch", "state": state,
                         "started_at": pod.get("created_at"),
                         "ended_at": _iso(end) if isinstance(end, (int, float)) else end})
    return {"provider": BACKEND, "region": None, "storage": current.ids.get("storage"),
            "deadline": (current.ids.get("pod") or {}).get("deadline_utc"), "machines": machines,
            "seen_at": time.time()}


def _read_from(path: Path, offset: int) -> list[LogChunk]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    return [LogChunk(offset, data)] if data else []


# ---------------------------------------------------------------------- the pod's own end

def end_this_pod(reason: str, environ: Mapping[str, str] | None = None) -> str:
    """Terminate the pod this process runs in: `runpodctl remove pod` where the image has it
    (and no test endpoint is set), else podTerminate with the pod-scoped RUNPOD_API_KEY that
    RunPod injects. Returns how it was ended; raises RunPodError when it could not be."""
    from ..cloud.runpod.api import ApiKey, RunPodClient, check_pod_id
    from ..cloud.runpod.errors import RunPodApiError

    env = os.environ if environ is None else environ
    pod_id = env.get("RUNPOD_POD_ID") or ""
    key = env.get("RUNPOD_API_KEY") or ""
    if not pod_id:
        raise RunPodApiError("RUNPOD_POD_ID is not set: this is not a RunPod pod.",
                             "Run the agent with another --end hook outside RunPod")
    check_pod_id(pod_id)
    tool = shutil.which("runpodctl")
    if tool and not env.get("RUNPOD_API_BASE_URL"):
        done = subprocess.run([tool, "remove", "pod", pod_id], capture_output=True, text=True,
                              timeout=120, env={**env})
        if done.returncode == 0:
            return f"runpodctl remove pod {pod_id} ({reason})"
    if not key:
        raise RunPodApiError("RUNPOD_API_KEY is not set in the pod.",
                             "RunPod injects a pod-scoped key; the start script's watchdog still "
                             "ends the pod at the deadline")
    client = RunPodClient(ApiKey(key, "RUNPOD_API_KEY (pod-scoped)"), environ=env,
                          retry_delays_s=(1.0, 2.0, 4.0, 8.0))
    gone = not client.terminate_pod(pod_id)
    return f"podTerminate {pod_id}" + (" (it was already gone)" if gone else "") + f" ({reason})"


class RunPodMachineEnd(MachineEnd):
    """The agent's end on a RunPod pod (`--end runpod`): terminate the pod it runs in, with
    `runpodctl` or the pod-scoped key (end_this_pod). The start script also ends the pod when
    the agent exits, and its watchdog at the deadline."""

    name = BACKEND

    def end_machine(self, reason: str) -> None:
        from ..errors import TrainctlError

        try:
            end_this_pod(reason)
        except TrainctlError as e:
            raise EndFailedError(f"Could not end this pod: {e.message}",
                                 "The start script ends the pod when the agent exits, and its "
                                 "watchdog at the deadline") from e

    def describe(self) -> str:
        return "runpod: terminate this pod with its pod-scoped key"
