"""EC2 as a place to run: the Backend over the AWS provider layer (`trainctl.cloud.aws`).

One attempt is one machine (on-demand, RunInstances across the region's zones) or one EC2 Fleet
of type `maintain` (spot: AWS itself replaces a reclaimed machine from the session's launch
template, and ends everything at `ValidUntil`). The machine's boot script installs trainctl
from the session's storage and starts `trainctl agent`, which runs the same engine as
`trainctl local`, syncs the session to storage and ends its machine through `AwsMachineEnd`.

    plan      the provider's pure launch plan (exact EC2 requests) + storage, bundle, resume
    launch    uploads the code bundle, the launcher's record and a resume checkpoint, then
              starts the machine or fleet; returns at once with instance/fleet ids and region
    describe  EC2's state + the session in storage (heartbeat, record, tombstone)
    log_iter  the output segments in storage
    stop      preemption-style: fleet deleted without terminating, SIGTERM to the agent
              through SSM (emergency checkpoint, final sync), terminate after the grace period
    release   terminate, idempotent
    list      what trainctl runs in the region, one handle per session

describe and log_iter keep the local session folder in step with storage (`SessionMirror`),
so `sessions list/show/logs/attach` read an AWS session as they read a local one.
boto3 is imported only inside functions (through the provider layer).
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UsageError
from ..redact import redact_args
from ..session import Session, State
from .base import (
    Backend,
    Description,
    EndFailedError,
    Handle,
    LaunchPlan,
    LogChunk,
    MachineEnd,
    RunSpec,
    SecretNotFoundError,
    SecretStore,
    check_secret_name,
)
from .cloud import SessionMirror, epoch_seconds, merge_remote_record

WORKDIR = "/opt/trainctl"  # the boot script's work folder on the machine (the agent's machine dir)
AGENT_ENV = WORKDIR + "/agent"  # the virtual environment the agent runs from
IMAGE_PYTHONS = ("/opt/pytorch/bin/python", "python3")  # the DLAMI's PyTorch interpreter first
AGENT_SIGNAL_GRACE_S = 90.0  # what the agent gives the script after a stop request (SIGTERM)
STOP_GRACE_S = 150.0  # what `stop` waits for the agent's final sync before terminating
LOOK_EVERY_S = 2.0  # describe answers from its last look for this long (EC2 and storage reads)
FOLLOW_POLL_S = 2.0
DEFAULT_MAX_HOURS = 24.0
PROVIDER = "aws"
END_ATTEMPTS = 4  # EC2 requests of a machine ending itself, with backoff; the boot script's power-off follows
SPOT_RECLAIMED = "Server.SpotInstanceTermination"  # EC2's state reason for a reclaimed spot machine


# ------------------------------------------------------------------------------- settings

def aws_settings(cfg: Any) -> Any:
    """The `[aws]` table (and `[cloud] budget_usd`) as the provider layer's AwsSettings."""
    from ..cloud.aws.context import AwsSettings

    table = dict(cfg.values.get("aws", {})) if cfg is not None else {}
    values = {k: (v if v != "" else None) for k, v in table.items()}
    budget = cfg.get("cloud", "budget_usd") if cfg is not None else 0
    values["budget_usd"] = float(budget) if budget else None
    return AwsSettings.from_mapping({k: v for k, v in values.items() if v is not None},
                                    source="[aws] in trainctl.toml")


def project_name(cfg: Any) -> str:
    """The project's name in storage and in AWS tags (the provider layer makes IAM, EC2 and SSM
    names safe from it): the one storage uses for every cloud session."""
    from ..storage.mirror import project_name as storage_project_name

    return storage_project_name(cfg)


def default_region(settings: Any) -> str | None:
    """[aws] region, else the AWS configuration's (profile, AWS_DEFAULT_REGION)."""
    if settings.region:
        return settings.region
    try:
        import boto3
    except ImportError:
        return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    try:
        return boto3.Session(profile_name=settings.profile).region_name
    except Exception:  # a missing profile is reported by the first real call
        return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def storage_root(settings: Any, cfg: Any) -> Any:
    """Where this project's cloud sessions live: s3://[aws] bucket/[aws] prefix, else an s3://
    [cloud] storage. A project with neither is told how to set one up."""
    from ..cloud.aws.errors import SetupMissingError
    from ..storage.uri import parse_uri

    if settings.bucket:
        return parse_uri(f"s3://{settings.bucket}/{settings.prefix.strip('/')}".rstrip("/"))
    storage = cfg.get("cloud", "storage") if cfg is not None else ""
    if storage and storage.startswith("s3://"):
        return parse_uri(storage)
    raise SetupMissingError("No bucket is set for AWS sessions.", settings.region)


# ------------------------------------------------------------------------------- the boot

def agent_command(engine: dict[str, Any] | None = None) -> tuple[str, ...]:
    """What the boot script starts; the rest of the agent's settings are the boot script's
    TRAINCTL_* variables (storage, project, session, region, attempt, deadline, secrets), and
    the script with its arguments is in the session's code record."""
    command = [f"{AGENT_ENV}/bin/trainctl", "agent", "--end", PROVIDER,
               "--signal-grace", f"{AGENT_SIGNAL_GRACE_S:g}"]
    for key, value in sorted((engine or {}).items()):
        command += [f"--{key.replace('_', '-')}", str(value)]
    return tuple(command)


def prepare_lines(session_uri: str, region: str, endpoint_url: str | None) -> tuple[str, ...]:
    """Shell lines the boot script runs before the agent: trainctl's wheel from the session's
    storage into a virtual environment of its own (the machine has no trainctl; PyPI is not
    where it comes from). The DLAMI ships the AWS CLI; pip fetches click and boto3."""
    wheel = f"trainctl-{__version__}-py3-none-any.whl"
    endpoint = f" --endpoint-url {shlex.quote(endpoint_url)}" if endpoint_url else ""
    pythons = " ".join(IMAGE_PYTHONS)
    return (
        f"aws s3 cp --only-show-errors --region {shlex.quote(region)}{endpoint} "
        f"{shlex.quote(session_uri.rstrip('/') + '/code/' + wheel)} {WORKDIR}/{wheel}",
        f'for py in {pythons}; do command -v "$py" >/dev/null && "$py" -m venv {AGENT_ENV} && break; done',
        f"{AGENT_ENV}/bin/python -m pip install --quiet --disable-pip-version-check "
        f"{WORKDIR}/{wheel} 'boto3>=1.36'",
    )


# ------------------------------------------------------------------------------- the backend

@dataclass
class _Look:
    """The last look at a session: when, and what it found."""

    at: float
    description: Description


class AwsBackend(Backend):
    """Runs attempts on EC2; any process reattaches through the handle (region + ids)."""

    name = PROVIDER

    def __init__(self, *, cfg: Any = None, settings: Any = None, session: Any = None) -> None:
        if cfg is None:
            from .. import config

            cfg = config.load()
        self.cfg = cfg
        self.settings = settings or aws_settings(cfg)
        if self.settings.profile and not os.environ.get("AWS_PROFILE"):
            os.environ["AWS_PROFILE"] = self.settings.profile  # the storage client reads it too
        self._session = session  # a boto3 Session to share (tests register event hooks on it)
        self._contexts: dict[str, Any] = {}
        self._looks: dict[str, _Look] = {}
        self._mirrors: dict[str, SessionMirror] = {}
        self._kill_at: dict[str, float] = {}
        self._networks_ended: set[str] = set()

    # ------------------------------------------------------------------ plumbing
    def context(self, region: str | None = None) -> Any:
        from ..cloud.aws.context import AwsContext
        from ..cloud.aws.errors import RegionError

        region = region or default_region(self.settings)
        if not region:
            raise RegionError("No AWS region is set.", "Pass --region REGION or set [aws] region in trainctl.toml "
                              "(trainctl aws setup --region REGION does it).", region="")
        if region not in self._contexts:
            self._contexts[region] = AwsContext(region, profile=self.settings.profile,
                                                endpoint_url=self.settings.endpoint_url,
                                                max_attempts=self.settings.max_attempts, session=self._session)
        return self._contexts[region]

    def remote(self, session_uri: str, region: str) -> Any:
        from ..storage import open_store
        from ..storage.remote import RemoteSession

        return RemoteSession(open_store(session_uri, endpoint_url=self.settings.endpoint_url, region=region,
                                        checksums=self.cfg.get("cloud", "checksums")))

    def session_uri(self, session_id: str) -> str:
        return str(storage_root(self.settings, self.cfg).join(project_name(self.cfg), session_id))

    # ------------------------------------------------------------------ plan
    def plan(self, spec: RunSpec) -> LaunchPlan:
        """The launch, decided and priced, nothing created: reads the account (types, prices,
        quotas, AMI, network, setup) and the session's storage, writes nothing."""
        from ..cloud.aws.facts import gather_facts, rank_regions
        from ..cloud.aws.plan import LaunchRequest, plan_launch
        from ..cloud.aws.setup import check_bucket

        r = dict(spec.resources)
        instance_type = r.get("instance_type")
        if not instance_type:
            raise UsageError("No instance type was given.", "Pass --instance-type, e.g. --instance-type g5.xlarge.")
        market = "spot" if r.get("spot") else "on-demand"
        attempt = int(r.get("attempt") or 0)
        nodes, efa = int(r.get("nodes") or 1), bool(r.get("efa"))
        root = storage_root(self.settings, self.cfg)
        warnings: list[str] = []
        region = r.get("region") or default_region(self.settings)
        if region == "auto":
            ranked = rank_regions(self.context(self.settings.region or "us-east-1"), instance_type, market)
            if not ranked:
                from ..cloud.aws.errors import InstanceTypeNotOfferedError

                raise InstanceTypeNotOfferedError(instance_type, "any region trainctl looked at")
            region = ranked[0].region
            warnings.append("--region auto picked " + ranked[0].describe()
                            + (f" (next: {ranked[1].describe()})" if len(ranked) > 1 else ""))
        ctx = self.context(region)
        from ..cloud.aws.errors import BucketRegionError

        try:
            check_bucket(ctx, root.bucket)
        except BucketRegionError as e:
            if r.get("region") != "auto":
                raise
            warnings.append(f"{e.message} Checkpoints and logs cross regions (slower, billed per GB).")
        session_uri = str(root.join(project_name(self.cfg), spec.session_id))
        also: tuple[str, ...] = ()
        if market == "spot" and r.get("alternatives", True):
            from ..cloud.aws.facts import equivalent_instance_types

            also = tuple(equivalent_instance_types(ctx, instance_type))
        if spec.resume == "storage":  # a resumed session runs the code it started with
            bundle_row, bundle = self._stored_code(session_uri, region)
        else:
            bundle_row, bundle = self._bundle_summary(spec)
        resume_row, resume = self._resume_summary(spec, session_uri, region)
        secrets = tuple(r.get("secrets") or ())
        env: dict[str, str] = {}
        if self.settings.endpoint_url:
            env["TRAINCTL_ENDPOINT_URL"] = self.settings.endpoint_url
        fallback = r.get("spot_fallback")
        display = [("session data", session_uri + "/"), ("code bundle", bundle_row), ("resume", resume_row),
                   ("run", " ".join(redact_args([_script_rel(spec, self.cfg), *spec.args])))]
        if nodes > 1:
            per_node = r.get("nproc_per_node") or 1
            display.append(("job", f"{nodes} nodes x {per_node} process(es) through torchrun, rendezvous id "
                            f"{spec.session_id}; node 0's agent publishes its private address (IMDS local-ipv4) in "
                            "the session's storage, the others wait for it"))
        if market == "spot" and nodes > 1:
            display.append(("spot fallback", f"a node reclaimed {fallback} time(s) continues on on-demand (its fleet "
                            "ends, an on-demand machine from its launch template joins the placement group) when "
                            "trainctl next looks at the session (aws launch following, aws status)"
                            if fallback is not None else "none: each node's fleet replaces it on spot until the "
                            "deadline"))
        elif market == "spot":
            display.append(("spot fallback", f"after {fallback} interruption(s), trainctl continues on on-demand "
                            "when it next looks at the session (aws launch following, aws status)"
                            if fallback is not None else "none: the fleet replaces on spot until the deadline"))
        request = LaunchRequest(
            session_id=spec.session_id, project=project_name(self.cfg), instance_type=instance_type, market=market,
            attempt=attempt, also_instance_types=also, ami=r.get("ami") or self.settings.ami,
            disk_gb=int(r.get("disk_gb") or self.settings.disk_gb),
            max_hours=float(r.get("max_hours") or DEFAULT_MAX_HOURS),
            budget_usd=self.settings.budget_usd, name=spec.name, storage_uri=str(root),
            agent_command=agent_command(_engine_options(r)), prepare=prepare_lines(session_uri, region, self.settings.endpoint_url),
            env=env, secrets=secrets, display=tuple(display), nodes=nodes, efa=efa)
        deadline = r.get("deadline")
        facts = gather_facts(ctx, request)
        if efa and not facts.instance_types[0].efa_supported:
            raise UsageError(f"--efa: {instance_type} does not support EFA (its EfaSupported is false).",
                             "Drop --efa, or pick a type that has it: aws ec2 describe-instance-types "
                             "--filters Name=network-info.efa-supported,Values=true")
        if deadline:  # a resume keeps the session's absolute deadline
            from dataclasses import replace

            left_h = (epoch_seconds(deadline) - facts.now.timestamp()) / 3600.0
            if left_h <= 0:
                raise UsageError(f"The session's deadline {deadline} has passed.",
                                 "Start a new session with trainctl aws launch.")
            request = replace(request, max_hours=round(left_h, 4))
        aws_plan = plan_launch(request, facts)
        aws_plan.warnings.extend(warnings)
        return LaunchPlan(
            backend=self.name, command=request.agent_command, env=dict(_boot_env(aws_plan)), cwd=WORKDIR,
            resources=r, output=session_uri + "/output/", checkpoint_location=session_uri + "/checkpoints/",
            cost_per_hour=aws_plan.price.usd_per_hour,
            details={"aws_plan": aws_plan, "region": region, "session_uri": session_uri, "storage_root": str(root),
                     "project": request.project, "bundle": bundle, "resume": resume, "attempt": attempt,
                     "script": _script_rel(spec, self.cfg), "args": list(spec.args),
                     "session_dir": str(spec.session_dir) if spec.session_dir else None,
                     "spot_fallback": fallback, "engine": _engine_options(r)})

    def _bundle_summary(self, spec: RunSpec) -> tuple[str, dict[str, Any]]:
        from ..config import format_size
        from ..storage.bundle import select_files

        files, skipped, git = select_files(self.cfg.root, exclude=_excluded(self.cfg))
        total = sum(size for _, size in files)
        largest = sorted(files, key=lambda f: (-f[1], f[0]))[:3]
        row = (f"{len(files)} files, {format_size(total)} from {'git' if git else 'the folder'}"
               + (f"; largest {', '.join(f'{p} ({format_size(s)})' for p, s in largest)}" if largest else "")
               + (f"; {len(skipped)} left out" if skipped else "") + f"; with trainctl {__version__}")
        script = _script_rel(spec, self.cfg)
        if script not in {p for p, _ in files}:
            raise UsageError(f"{script} is not in the code bundle (left out by git, .trainctlignore or its size).",
                             "Commit or un-ignore the script; the machine only gets the bundle.")
        return row, {"files": len(files), "bytes": total, "largest": largest, "skipped": skipped, "git": git}

    def _stored_code(self, session_uri: str, region: str) -> tuple[str, dict[str, Any]]:
        from ..cloud.aws.errors import SetupMissingError
        from ..config import format_size

        record = self.remote(session_uri, region).code_record()
        if not isinstance(record, dict):
            raise SetupMissingError(f"{session_uri} has no code bundle: the session never launched.", region)
        summary = record.get("summary") or {}
        when = datetime.fromtimestamp(float(record.get("t") or 0), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"the session's own: {summary.get('files', '?')} files, {format_size(summary.get('bytes') or 0)}, "
                f"uploaded {when}", {**summary, "stored": True})

    def _resume_summary(self, spec: RunSpec, session_uri: str, region: str) -> tuple[str, dict[str, Any] | None]:
        from ..config import format_size

        if spec.resume == "storage":
            latest = self.remote(session_uri, region).latest_checkpoint()
            if latest is None:
                return "none in storage yet: the machine starts from scratch", None
            return (f"{latest['checkpoint']} (step {latest.get('step')}, {format_size(latest.get('bytes') or 0)}), "
                    "the newest verified checkpoint in storage", {"from": "storage", **latest})
        if spec.resume:
            from .. import checkpoint

            path = Path(spec.resume)
            meta = (checkpoint.read_manifest(path) or {}).get("meta") or {}
            return (f"{path} (step {meta.get('step')}, {format_size(path.stat().st_size)}), uploaded and verified "
                    "before the machine starts", {"from": "local", "path": str(path), "step": meta.get("step")})
        return "none: a fresh start", None

    # ------------------------------------------------------------------ launch
    def launch(self, plan: LaunchPlan, attempt: int) -> Handle:
        """Upload what the machine needs, then start it; returns once AWS accepted the request."""
        from ..cloud.aws.launch import launch as start_machines

        details = plan.details
        aws_plan = details["aws_plan"]
        if attempt != details["attempt"]:
            raise UsageError(f"The plan is for attempt {details['attempt']}, not {attempt}.", "Plan it again.")
        aws_plan.check()
        region = details["region"]
        remote = self.remote(details["session_uri"], region)
        self._upload_code(remote, details)
        if details["resume"] and details["resume"].get("from") == "local":
            from .. import checkpoint

            path = Path(details["resume"]["path"])
            remote.push_checkpoint(path, checkpoint.read_manifest(path) or {})
        record = remote.read_session() or {}
        launcher = _launcher_record(plan, aws_plan)
        launcher["created_at"] = record.get("created_at") or launcher["created_at"]  # a resume keeps it
        remote.write_session({**record, **launcher})
        result = start_machines(self.context(region), aws_plan)
        ids = {"region": region, "session_id": aws_plan.request.session_id, "project": details["project"],
               "storage": details["session_uri"], "mechanism": result.mechanism, "market": result.market,
               "instance_type": aws_plan.request.instance_type, "instance_ids": list(result.instance_ids),
               "fleet_id": result.fleet_id, "launch_template_id": result.launch_template_id,
               "zone": result.zone, "deadline": result.deadline, "usd_per_hour": result.usd_per_hour,
               "price_source": aws_plan.price.describe(), "session_dir": details.get("session_dir"),
               "spot_fallback": details.get("spot_fallback"), "launched_at": time.time(),
               "engine": details.get("engine") or {},
               "notes": list(result.notes)}
        if result.nodes > 1:
            ids.update(nodes=result.nodes, efa=aws_plan.request.efa, placement_group=result.placement_group,
                       node_security_group_id=result.node_security_group_id)
            if result.fleet_ids:
                ids.update(fleet_ids=list(result.fleet_ids), launch_template_ids=list(result.launch_template_ids))
        return Handle(self.name, ids, attempt)

    def _upload_code(self, remote: Any, details: dict[str, Any]) -> None:
        """The bundle, a wheel of this trainctl and the run (script, args) the agent starts,
        once per session: a resumed session keeps the code it started with."""
        from ..storage.bundle import build_bundle, build_wheel

        existing = remote.code_record()
        if isinstance(existing, dict) and existing.get("wheel"):
            return
        with tempfile.TemporaryDirectory(prefix="trainctl-bundle-") as tmp:
            bundle = build_bundle(self.cfg.root, Path(tmp) / "bundle.tar.gz", exclude=_excluded(self.cfg))
            wheel, _digest = build_wheel(tmp)
            remote.put_code(bundle, wheel, run={"script": details["script"], "args": details["args"],
                                                "engine": details["engine"]})

    # ------------------------------------------------------------------ observe
    def describe(self, handle: Handle) -> Description:
        """Where the session stands: EC2's machines and fleet, and what the agent wrote to
        storage. Answers from its last look for LOOK_EVERY_S; keeps the stop's deadline."""
        sid = handle.ids["session_id"]
        look = self._looks.get(sid)
        if look is not None and time.monotonic() - look.at < LOOK_EVERY_S:
            return look.description
        description = self._look(handle)
        self._looks[sid] = _Look(time.monotonic(), description)
        return description

    def _look(self, handle: Handle) -> Description:
        from ..cloud.aws.inventory import session_status
        from ..cloud.aws.launch import FLEET_GONE_STATES, INSTANCE_GONE_STATES, terminate

        ids = handle.ids
        sid, region = ids["session_id"], ids["region"]
        ctx = self.context(region)
        prices = self._recorded_prices(handle)
        status = session_status(ctx, sid, recorded_prices=prices)
        live = [m for m in status.machines if m.state not in INSTANCE_GONE_STATES]
        fleet_active = any(f.state not in FLEET_GONE_STATES for f in status.fleets)
        remote = self._remote_for(handle)
        record = remote.read_session() or {}
        ended = remote.ended()
        heartbeat = remote.read_heartbeat()
        remote_status = record.get("status")
        kill_at = self._kill_at.get(sid)
        if kill_at is not None and live and (time.monotonic() >= kill_at or remote_status in _ENDINGS):
            terminate(ctx, sid)  # the agent is done (or out of time): end the machines now
            self._kill_at.pop(sid, None)
            status = session_status(ctx, sid, recorded_prices=prices)
            live, fleet_active = [], False
        if not live and not fleet_active:
            self._kill_at.pop(sid, None)
            if int(ids.get("nodes") or 1) > 1 and status.machines and sid not in self._networks_ended:
                self._end_node_network(ctx, sid)
                self._networks_ended.add(sid)
        state = State.RUNNING if live or fleet_active else self._ended_state(ended, record)
        if state is State.RUNNING and not any(m.state == "running" for m in live) and heartbeat is None:
            state = State.PENDING
        details = {"machines": [_machine(m) for m in status.machines], "fleets": [f.__dict__ for f in status.fleets],
                   "remote_status": remote_status, "heartbeat": heartbeat, "ended": ended,
                   "cost": {"total_usd": status.cost.total_usd, "describe": status.cost.describe()},
                   "region": region, "state": status.state}
        description = Description(state, record.get("exit_code") if state not in (State.RUNNING, State.PENDING)
                                  else None, None, details)
        fallback = ids.get("spot_fallback")
        if fallback is not None and fleet_active and int(ids.get("nodes") or 1) > 1:
            moved = self._fall_back_nodes(handle, status)
            if moved:
                details["node_fallbacks"] = moved
        elif fallback is not None and fleet_active and self._interruptions(handle, status) >= int(fallback):
            details["fallback"] = self._fall_back_to_on_demand(handle)
        self._mirror_record(handle, description, record)
        return description

    @staticmethod
    def _end_node_network(ctx: Any, session_id: str) -> None:
        """A finished multi-node session's security group and placement group (nothing bills for
        them; a machine still shutting down keeps them until the next look)."""
        from ..cloud.aws.errors import AwsError
        from ..cloud.aws.launch import end_node_network

        try:
            end_node_network(ctx, session_id)
        except AwsError:
            pass  # the next look, or trainctl aws terminate, tries again

    @staticmethod
    def _ended_state(ended: dict[str, Any] | None, record: dict[str, Any]) -> State:
        for value in ((ended or {}).get("status"), record.get("status")):
            if value in _ENDINGS:
                return State(value)
        return State.FAILED if ended else State.CRASHED

    def _recorded_prices(self, handle: Handle) -> dict[str, float]:
        """Instance id -> the price its launch planned with (spot: the highest of its types)."""
        out: dict[str, float] = {}
        data = self._local_record(handle) or {}
        for m in (data.get("cloud") or {}).get("machines") or []:
            if isinstance(m, dict) and isinstance(m.get("usd_per_hour"), (int, float)) and m.get("id"):
                out[str(m["id"])] = float(m["usd_per_hour"])
        price = handle.ids.get("usd_per_hour")
        for iid in handle.ids.get("instance_ids") or []:
            if price is not None:
                out.setdefault(iid, float(price))
        return out

    def _interruptions(self, handle: Handle, status: Any) -> int:
        """Spot machines of the session that AWS reclaimed (EC2's state reason), or that the
        agent saw a notice for (in the session's events), whichever counts more."""
        reclaimed = sum(1 for m in status.machines if m.market == "spot" and m.state in ("shutting-down", "terminated")
                        and m.state_reason == SPOT_RECLAIMED)
        noticed = 0
        session = self._local_session(handle)
        if session is not None:
            noticed = sum(1 for e in session.iter_events(("notice",)) if e.get("notice") == "interruption")
        return max(reclaimed, noticed)

    def log_iter(self, handle: Handle, since: int = 0, follow: bool = False) -> Iterator[LogChunk]:
        """The session's output from byte `since`, read from its segments in storage (through
        the local folder's output.log when there is one: whoever pulled a byte in, it is read
        from there at its offset); with `follow`, until the session ends."""
        mirror = self._mirror(handle)
        source = _OutputView(self._remote_for(handle)) if mirror is None else None
        offset = since

        def fresh() -> Iterator[LogChunk]:
            if mirror is not None:
                mirror.pull()
                yield from mirror.read(offset)
                return
            chunk = source.poll()  # type: ignore[union-attr]
            if chunk is not None and chunk.offset + len(chunk.data) > offset:
                cut = max(0, offset - chunk.offset)
                yield LogChunk(chunk.offset + cut, chunk.data[cut:], chunk.stream)

        while True:
            got = False
            for chunk in fresh():
                got = True
                offset = chunk.offset + len(chunk.data)
                yield chunk
            if got:
                continue
            if not follow:
                return
            if not self.describe(handle).running:
                yield from fresh()  # what the last sync brought
                return
            time.sleep(FOLLOW_POLL_S)

    # ------------------------------------------------------------------ stop and release
    def stop(self, handle: Handle, grace_period_s: float, *, signal_name: str = "SIGTERM") -> None:
        """No replacement (the fleet is deleted without terminating), then SIGTERM to the agent
        through SSM: emergency checkpoint, final sync. The machines are terminated once the
        agent recorded its end or `grace_period_s` passed (kept by describe); at once when 0."""
        from ..cloud.aws.launch import stop_session

        sid = handle.ids["session_id"]
        if grace_period_s <= 0:
            self.release(handle)
            return
        stop_session(self.context(handle.ids["region"]), sid, workdir=WORKDIR)
        self._kill_at[sid] = time.monotonic() + grace_period_s
        self._looks.pop(sid, None)

    def release(self, handle: Handle) -> None:
        """Terminate the session's fleet, machines and launch templates; nothing left: no-op."""
        from ..cloud.aws.launch import terminate

        terminate(self.context(handle.ids["region"]), handle.ids["session_id"])
        self._kill_at.pop(handle.ids["session_id"], None)
        self._looks.pop(handle.ids["session_id"], None)

    def list(self) -> list[Handle]:
        """One handle per session trainctl has machines or fleets for in the default region."""
        from ..cloud.aws.launch import (
            FLEET_GONE_STATES,
            INSTANCE_GONE_STATES,
            session_fleets,
            session_instances,
        )
        from ..cloud.aws.names import TAG_PROJECT, TAG_SESSION, tag_dict

        ctx = self.context()
        found: dict[str, dict[str, Any]] = {}
        for instance in session_instances(ctx):
            if instance["State"]["Name"] in INSTANCE_GONE_STATES:
                continue
            tags = tag_dict(instance.get("Tags"))
            ids = found.setdefault(tags[TAG_SESSION], {"region": ctx.region, "session_id": tags[TAG_SESSION],
                                                       "project": tags.get(TAG_PROJECT), "instance_ids": []})
            ids["instance_ids"].append(instance["InstanceId"])
        for fleet in session_fleets(ctx):
            if fleet.get("FleetState") in FLEET_GONE_STATES:
                continue
            tags = tag_dict(fleet.get("Tags"))
            ids = found.setdefault(tags[TAG_SESSION], {"region": ctx.region, "session_id": tags[TAG_SESSION],
                                                       "project": tags.get(TAG_PROJECT), "instance_ids": []})
            ids["fleet_id"] = fleet["FleetId"]
        for ids in found.values():
            if ids.get("project"):
                try:
                    ids["storage"] = str(storage_root(self.settings, self.cfg).join(ids["project"], ids["session_id"]))
                except Exception:  # no bucket configured here: the handle still ends its machines
                    ids["storage"] = None
        return [Handle(self.name, ids) for ids in found.values()]

    def pull_checkpoints(self, handle: Handle, dest: Path) -> list[str]:
        """The session's checkpoints in storage, each with its manifest, into `dest` (verified
        against the digests recorded at upload); what is already there is not fetched again."""
        from ..fsutil import atomic_write_json

        remote = self._remote_for(handle)
        fetched = []
        for manifest in remote.checkpoints():
            stored = manifest.get("storage") if isinstance(manifest.get("storage"), dict) else {}
            name = Path(str(stored.get("key") or "")).name
            if not name:
                continue
            target = dest / name
            if not (target.exists() and target.stat().st_size == stored.get("bytes")):
                remote.store.get_file(stored["key"], target, sha256=stored.get("sha256"))
                fetched.append(name)
            atomic_write_json(target.with_name(name + ".json"),
                              {k: v for k, v in manifest.items() if k != "storage"}, sync_dir=False)
        return fetched

    # ------------------------------------------------------------------ spot fallback
    def _fall_back_to_on_demand(self, handle: Handle) -> dict[str, Any]:
        """Enough interruptions: end the spot fleet (and its machine) and continue the session
        on one on-demand machine, from latest.json, before the same deadline."""
        from ..cloud.aws.launch import end_fleet

        ctx = self.context(handle.ids["region"])
        sid = handle.ids["session_id"]
        for fleet in _active_fleets(ctx, sid):
            end_fleet(ctx, fleet["FleetId"], terminate_instances=True)
        session = self._local_session(handle)
        data = session.read() if session is not None else {}
        attempt = len(data.get("attempts") or []) or handle.attempt + 1
        spec = RunSpec(script=Path(self.cfg.root) / (data.get("cloud") or {}).get("script", "train.py"),
                       args=tuple(data.get("args") or ()), resume="storage", name=data.get("name"), session_id=sid,
                       session_dir=session.dir if session is not None else None, cwd=Path(self.cfg.root),
                       resources={"instance_type": handle.ids.get("instance_type"), "region": handle.ids["region"],
                                  "attempt": attempt, "deadline": handle.ids.get("deadline"), "spot": False})
        plan = self.plan(spec)
        new = self.launch(plan, attempt)
        if session is not None:
            record_attempt(session, new, plan, note=f"after {handle.ids.get('spot_fallback')} spot interruption(s)")
        return {"attempt": attempt, "instance_ids": new.ids.get("instance_ids")}

    def _fall_back_nodes(self, handle: Handle, status: Any) -> list[dict[str, Any]]:
        """Spot nodes: a node reclaimed `spot_fallback` times continues on on-demand. One
        on-demand machine starts from the node's launch template (same node rank and attempt),
        in its placement group and zone, then the node's fleet ends with its spot machine: the
        head takes the new machine in as the node's replacement (the next round). A node
        without on-demand room there keeps its fleet; the next look tries again."""
        from ..cloud.aws.errors import CapacityUnavailableError, InstanceTypeNotOfferedError
        from ..cloud.aws.launch import (
            FLEET_GONE_STATES,
            INSTANCE_GONE_STATES,
            end_fleet,
            session_fleets,
        )
        from ..cloud.aws.names import TAG_NODE, tag_dict
        from ..cloud.aws.plan import client_token

        ids = handle.ids
        sid, limit = ids["session_id"], int(ids["spot_fallback"])
        ctx = self.context(ids["region"])
        moved: list[dict[str, Any]] = []
        for fleet in session_fleets(ctx, sid):
            rank = tag_dict(fleet.get("Tags")).get(TAG_NODE, "")
            if fleet.get("FleetState") in FLEET_GONE_STATES or not rank.isdigit():
                continue
            reclaimed = sum(1 for m in status.machines if m.node == int(rank) and m.market == "spot"
                            and m.state in INSTANCE_GONE_STATES and m.state_reason == SPOT_RECLAIMED)
            if reclaimed < limit:
                continue
            config = fleet["LaunchTemplateConfigs"][0]
            template = {k: v for k, v in config["LaunchTemplateSpecification"].items()
                        if k in ("LaunchTemplateId", "LaunchTemplateName", "Version")}
            subnet = next((o["SubnetId"] for o in config.get("Overrides") or [] if o.get("SubnetId")), None)
            params: dict[str, Any] = {"MinCount": 1, "MaxCount": 1, "LaunchTemplate": template,
                                      "ClientToken": client_token(sid, handle.attempt, "on-demand", rank)}
            if subnet:
                params["SubnetId"] = subnet
            try:
                started = ctx.call("ec2", "run_instances", error_context={
                    "instance_type": ids.get("instance_type"), "market": "on-demand", "zone": ids.get("zone")},
                    **params)["Instances"][0]["InstanceId"]
            except (CapacityUnavailableError, InstanceTypeNotOfferedError) as e:
                moved.append({"node": int(rank), "instance_id": None, "interruptions": reclaimed,
                              "note": f"no on-demand room in the placement group yet ({e.message}); the node "
                                      "stays on its spot fleet and the next look tries again"})
                continue
            end_fleet(ctx, fleet["FleetId"], terminate_instances=True)
            moved.append({"node": int(rank), "instance_id": started, "interruptions": reclaimed,
                          "fleet_id": fleet["FleetId"],
                          "note": f"node {rank} continues on on-demand ({started}) after {reclaimed} spot "
                                  "interruption(s); its spot fleet was ended"})
        session = self._local_session(handle)
        done = [m for m in moved if m["instance_id"]]
        if session is not None and done:
            cloud = session.read().get("cloud") or {}
            session.update(cloud={"node_fallbacks": [*(cloud.get("node_fallbacks") or []), *done]})
            for m in done:
                session.event("warning", message=m["note"], node=m["node"], instance_id=m["instance_id"])
        return moved

    # ------------------------------------------------------------------ the local mirror
    def _remote_for(self, handle: Handle) -> Any:
        uri = handle.ids.get("storage") or self.session_uri(handle.ids["session_id"])
        return self.remote(uri, handle.ids["region"])

    def _local_session(self, handle: Handle | None) -> Session | None:
        if handle is None:
            return None
        path = handle.ids.get("session_dir")
        if not path or not (Path(path) / "session.json").is_file():
            return None
        return Session(Path(path))

    def _local_record(self, handle: Handle) -> dict[str, Any] | None:
        session = self._local_session(handle)
        if session is None:
            return None
        try:
            return session.read()
        except Exception:  # a torn record: nothing recorded to read from
            return None

    def _mirror(self, handle: Handle) -> Any:
        session = self._local_session(handle)
        if session is None:
            return None
        sid = handle.ids["session_id"]
        mirror = self._mirrors.get(sid)
        if mirror is None:
            mirror = self._mirrors[sid] = _HandleMirror(session, self._remote_for(handle), handle)
        mirror.handle = handle
        return mirror

    def _mirror_record(self, handle: Handle, description: Description, record: dict[str, Any]) -> None:
        """session.json and the logs of the local folder, from this look."""
        mirror = self._mirror(handle)
        if mirror is None:
            return
        mirror.pull()
        session = mirror.session
        data = session.read()
        fields: dict[str, Any] = merge_remote_record(data, record)
        machines = _merge_machines((data.get("cloud") or {}).get("machines") or [], description.details["machines"])
        fields["cloud"] = {"machines": machines, "seen_at": time.time(),
                           "cost": description.details["cost"]}
        if not description.running and data.get("status") in (State.RUNNING, State.PENDING, "running", "pending"):
            end = _local_end(data, description)
            fields.update(status=end, ended_at=time.time())
            attempts = data.get("attempts") or []
            if attempts and isinstance(attempts[-1], dict) and not attempts[-1].get("ended_at"):
                attempts[-1].update(ended_at=time.time(), status=end)
                fields["attempts"] = attempts
            session.update(**fields)
            session.event("status", status=end, source="aws", remote_status=description.details.get("remote_status"))
            return
        session.update(**fields)


_ENDINGS = frozenset({"completed", "failed", "killed", "preempted", "stopped"})


class _HandleMirror(SessionMirror):
    def __init__(self, session: Session, remote: Any, handle: Handle) -> None:
        super().__init__(session, remote)
        self.handle = handle


class _OutputView:
    """A session's output read from storage without a local folder to mirror into."""

    def __init__(self, remote: Any) -> None:
        self.reader = remote.output_reader()
        self.seen = 0

    def poll(self) -> LogChunk | None:
        data = self.reader.poll()
        if not data:
            return None
        chunk = LogChunk(self.seen, data, "output")
        self.seen += len(data)
        return chunk


def _local_end(data: dict[str, Any], description: Description) -> str:
    """How the local record ends: the user's stop or terminate first, then the machine's word."""
    if data.get("terminate_request"):
        return State.KILLED.value
    if data.get("stop_request") and description.state in (State.PREEMPTED, State.KILLED, State.CRASHED,
                                                          State.STOPPED):
        return State.STOPPED.value
    if description.state is State.CRASHED:
        return State.FAILED.value
    return description.state.value


def _machine(row: Any) -> dict[str, Any]:
    started = epoch_seconds(row.launched_at)
    gone = row.state in ("shutting-down", "terminated")
    return {"id": row.instance_id, "type": row.instance_type, "market": row.market, "zone": row.zone,
            "state": row.state, "usd_per_hour": row.usd_per_hour, "price_source": row.price_source,
            "started_at": started, "ended_at": (started + row.uptime_s) if gone and started is not None else None,
            "cost_usd": row.cost_usd, **({"node": row.node} if row.node is not None else {})}


def _merge_machines(known: list[Any], seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The record's machines updated with what EC2 shows now; a machine EC2 no longer lists
    (terminated a while ago) keeps what was recorded."""
    by_id = {m["id"]: dict(m) for m in known if isinstance(m, dict) and m.get("id")}
    for m in seen:
        by_id.setdefault(m["id"], {})
        old = by_id[m["id"]]
        merged = {**old, **{k: v for k, v in m.items() if v is not None or k not in old}}
        if old.get("usd_per_hour") is not None and m.get("price_source") != "recorded at launch":
            merged["usd_per_hour"], merged["price_source"] = old["usd_per_hour"], old.get("price_source")
        by_id[m["id"]] = merged
    # EC2's LaunchTime has whole seconds: a replacement started in the same second as the
    # machine it replaced ties with it, and then the order they were first seen decides.
    first_seen = {iid: i for i, iid in enumerate(by_id)}
    return sorted(by_id.values(), key=lambda m: (int(m.get("started_at") or 0), first_seen[m["id"]]))


def record_attempt(session: Session, handle: Handle, plan: LaunchPlan, *, note: str | None = None) -> dict[str, Any]:
    """The launch in the local record: the handle, a new attempt, its machines and price."""
    data = session.read()
    ids = handle.ids
    attempts = [a for a in data.get("attempts") or [] if isinstance(a, dict)]
    if attempts and not attempts[-1].get("ended_at"):
        attempts[-1].update(ended_at=time.time(), status=State.PREEMPTED.value)
    attempts.append({"attempt": handle.attempt, "started_at": time.time(), "market": ids.get("market"),
                     "instance_type": ids.get("instance_type"), "instance_ids": ids.get("instance_ids"),
                     "fleet_id": ids.get("fleet_id"), "usd_per_hour": ids.get("usd_per_hour"),
                     **({"note": note} if note else {})})
    machines = list((data.get("cloud") or {}).get("machines") or [])
    for iid in ids.get("instance_ids") or []:
        machines.append({"id": iid, "type": ids.get("instance_type"), "market": ids.get("market"),
                         "usd_per_hour": ids.get("usd_per_hour"), "price_source": ids.get("price_source"),
                         "state": "pending", "started_at": time.time(), "ended_at": None})
    aws_plan = plan.details["aws_plan"]
    return session.update(
        handle=handle.to_json(), attempts=attempts, status=State.RUNNING.value, ended_at=None,
        cloud={"provider": PROVIDER, "region": ids["region"], "storage": ids["storage"],
               "deadline": ids.get("deadline"), "budget_usd": aws_plan.request.budget_usd,
               "mechanism": ids.get("mechanism"), "spot_fallback": ids.get("spot_fallback"),
               "script": plan.details["script"], "machines": machines, "seen_at": time.time()})


def _active_fleets(ctx: Any, session_id: str) -> list[dict[str, Any]]:
    from ..cloud.aws.launch import FLEET_GONE_STATES, session_fleets

    return [f for f in session_fleets(ctx, session_id) if f.get("FleetState") not in FLEET_GONE_STATES]


def _script_rel(spec: RunSpec, cfg: Any) -> str:
    """The script as a path inside the project (what the bundle holds)."""
    root = Path(cfg.root).resolve()
    script = Path(spec.script)
    full = (script if script.is_absolute() else Path(spec.cwd or Path.cwd()) / script).resolve()
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        raise UsageError(f"{spec.script} is outside the project folder {root}.",
                         "The machine gets the project's files only: move the script into the project.") from None


def _excluded(cfg: Any) -> list[str]:
    """The state and checkpoint folders, relative to the project root, never bundled."""
    out = []
    for folder in (cfg.state_dir, cfg.checkpoint_dir):
        try:
            out.append(Path(folder).resolve().relative_to(Path(cfg.root).resolve()).as_posix())
        except ValueError:
            continue
    return out


def _engine_options(resources: dict[str, Any]) -> dict[str, Any]:
    return {k: resources[k] for k in ("max_restarts", "nproc_per_node") if resources.get(k) is not None}


def _boot_env(aws_plan: Any) -> dict[str, str]:
    from ..cloud.aws.plan import boot_env

    return boot_env(aws_plan.request, aws_plan.region)


def _launcher_record(plan: LaunchPlan, aws_plan: Any) -> dict[str, Any]:
    """What the launcher tells the agent (and any reader) about the session in storage."""
    d = plan.details
    return {"id": aws_plan.request.session_id, "name": aws_plan.request.name, "backend": PROVIDER,
            "project": d["project"], "script": d["script"], "args": redact_args(list(d["args"])),
            "created_at": time.time(), "cloud": {"provider": PROVIDER, "region": d["region"],
                                                 "deadline": aws_plan.deadline_iso, "attempt": d["attempt"],
                                                 "market": aws_plan.request.market,
                                                 "instance_type": aws_plan.request.instance_type,
                                                 "nodes": aws_plan.request.nodes}}


# ------------------------------------------------------------------------------- the machine's end

class AwsMachineEnd(MachineEnd):
    """The agent's end on EC2: terminate this instance, and when the session is over (its
    `ended.json` is in storage) first delete its fleet without terminating, so AWS starts no
    replacement, and its launch templates. A machine that merely lost the session to another
    writer ends alone. The boot script powers the machine off as well (its shutdown behaviour
    is terminate), and the fleet's ValidUntil holds if both fail. Settings come from the boot
    script's variables; the instance id from TRAINCTL_MACHINE_ID or IMDSv2
    (AWS_EC2_METADATA_SERVICE_ENDPOINT honoured)."""

    name = PROVIDER

    def __init__(self, *, instance_id: str | None = None, region: str | None = None,
                 endpoint_url: str | None = None, session: Any = None) -> None:
        self.instance_id = instance_id
        self.region = region
        self.endpoint_url = endpoint_url if endpoint_url is not None else os.environ.get("TRAINCTL_ENDPOINT_URL") or None
        self._session = session
        self.actions: list[str] = []

    def end_machine(self, reason: str) -> None:
        from ..cloud.aws.context import AwsContext
        from ..cloud.aws.errors import AwsError
        from ..cloud.aws.launch import INSTANCE_GONE_STATES
        from ..cloud.aws.names import TAG_SESSION, tag_dict

        try:
            instance_id = self.instance_id or _machine_id()
            region = self.region or os.environ.get("TRAINCTL_REGION") or _imds("/latest/meta-data/placement/region")
            ctx = AwsContext(region, endpoint_url=self.endpoint_url, max_attempts=END_ATTEMPTS, session=self._session)
            reservations = ctx.call("ec2", "describe_instances", InstanceIds=[instance_id])["Reservations"]
            instance = next((i for r in reservations for i in r["Instances"]), None)
            if instance is None or instance["State"]["Name"] in INSTANCE_GONE_STATES:
                self.actions.append(f"instance {instance_id}: already ending")
                return
            tags = tag_dict(instance.get("Tags"))
            session_id = tags.get(TAG_SESSION)
            if session_id and self._session_over(region):
                try:
                    self._end_session_fleets(ctx, session_id, instance_id, tags)
                except AwsError as e:
                    # the nodes of a multi-node session end at once and race for the same fleets
                    # and templates: this machine ends all the same; the others' ends, the
                    # fleets' ValidUntil and aws terminate finish the rest
                    self.actions.append(f"session {session_id}: could not end all of its fleets and templates "
                                        f"({e.message})")
            ctx.call("ec2", "terminate_instances", InstanceIds=[instance_id])
            self.actions.append(f"instance {instance_id}: terminated ({reason})")
        except (AwsError, OSError, KeyError) as e:
            raise EndFailedError(f"Could not end this machine through the EC2 API ({e}).",
                                 "The boot script powers it off, and the session's deadline ends it.") from e

    def _end_session_fleets(self, ctx: Any, session_id: str, instance_id: str, tags: dict[str, str]) -> None:
        """Its own fleet by the tag AWS puts on fleet machines, else any fleet of its session
        still active (every node's, in a multi-node session): nothing may start a machine for
        this session again; then the session's launch templates."""
        from ..cloud.aws.launch import end_fleet, fleet_instance_ids, session_fleets

        fleets = {tags["aws:ec2:fleet-id"]} if tags.get("aws:ec2:fleet-id") else set()
        fleets |= {f["FleetId"] for f in session_fleets(ctx, session_id)
                   if instance_id in fleet_instance_ids(ctx, f["FleetId"])}
        fleets |= {f["FleetId"] for f in _active_fleets(ctx, session_id)}
        for fid in sorted(fleets):
            self.actions += [a.describe() for a in end_fleet(ctx, fid, terminate_instances=False).actions]
        self.actions += _delete_templates(ctx, session_id)

    def _session_over(self, region: str) -> bool:
        """Whether the session's tombstone is in storage; when storage can't be read, yes: a
        machine never keeps billing for a session that may be over."""
        from ..storage import StorageError, open_store
        from ..storage.remote import RemoteSession
        from ..storage.uri import parse_uri

        root, project, session = (os.environ.get(k) for k in ("TRAINCTL_STORAGE_URI", "TRAINCTL_PROJECT",
                                                               "TRAINCTL_SESSION_ID"))
        if not (root and project and session):
            return True
        try:
            store = open_store(parse_uri(root).join(project, session), endpoint_url=self.endpoint_url, region=region)
            return RemoteSession(store).ended() is not None
        except (StorageError, UsageError, OSError):
            return True

    def describe(self) -> str:
        return "aws (when the session is over: delete its fleet and launch templates; terminate this instance)"


# ------------------------------------------------------------------------------- the machine's secrets

class SsmSecretStore(SecretStore):
    """The project's forwarded secrets as SSM SecureString parameters under one path
    (`ssm:/trainctl/<project>/`, what the boot script names in TRAINCTL_SSM_PATH): the launcher
    puts them, the agent reads them with the instance role, decrypted, for the script's
    environment alone. Region from TRAINCTL_REGION (else botocore's, else IMDS); endpoint from
    TRAINCTL_ENDPOINT_URL, else botocore's own (which honours AWS_ENDPOINT_URL)."""

    name = "ssm"

    def __init__(self, path: str | None = None, *, region: str | None = None, endpoint_url: str | None = None,
                 session: Any = None) -> None:
        path = path or os.environ.get("TRAINCTL_SSM_PATH") or ""
        if not path.startswith("/"):
            raise UsageError(f"The ssm secret store needs a parameter path, not {path!r}.",
                             "Example: --secret-store ssm:/trainctl/myproject/")
        self.path = path.rstrip("/") + "/"
        self.region = region
        self.endpoint_url = endpoint_url if endpoint_url is not None else os.environ.get("TRAINCTL_ENDPOINT_URL") or None
        self._session = session
        self._ctx: Any = None

    def _context(self) -> Any:
        if self._ctx is None:
            from ..cloud.aws.context import AwsContext

            region = (self.region or os.environ.get("TRAINCTL_REGION") or os.environ.get("AWS_REGION")
                      or os.environ.get("AWS_DEFAULT_REGION") or _imds("/latest/meta-data/placement/region"))
            self._ctx = AwsContext(region, endpoint_url=self.endpoint_url, max_attempts=END_ATTEMPTS,
                                   session=self._session)
        return self._ctx

    def _call(self, method: str, **params: Any) -> dict[str, Any]:
        from ..cloud.aws.errors import AwsError

        try:
            return self._context().call("ssm", method, **params)
        except AwsError as e:
            raise AwsError(f"Could not reach the secrets in SSM {self.path} ({e.message})",
                           "The machine's instance role must allow ssm:GetParameters on the project's path "
                           "(trainctl aws setup grants it).") from e

    def put(self, name: str, value: str) -> None:
        self._call("put_parameter", Name=self.path + check_secret_name(name), Value=value, Type="SecureString",
                   Overwrite=True)

    def get(self, name: str) -> str:
        answer = self._call("get_parameters", Names=[self.path + check_secret_name(name)], WithDecryption=True)
        for parameter in answer.get("Parameters", []):
            if parameter.get("Name") == self.path + name:
                return str(parameter["Value"])
        raise SecretNotFoundError(name, f"SSM {self.path}")

    def delete(self, name: str) -> None:
        from ..cloud.aws.errors import AwsRequestError

        try:
            self._context().call("ssm", "delete_parameter", Name=self.path + check_secret_name(name))
        except AwsRequestError as e:
            if e.code != "ParameterNotFound":
                raise

    def names(self) -> list[str]:
        found = self._context().paginate("ssm", "get_parameters_by_path", "Parameters", Path=self.path,
                                         Recursive=False, WithDecryption=False)
        return sorted(p["Name"][len(self.path):] for p in found)


def node_machines(session_id: str, attempt: int, *, region: str | None = None, endpoint_url: str | None = None,
                  session: Any = None) -> dict[int, tuple[str, str]]:
    """Node rank -> (instance id, state) of a multi-node session's machines of `attempt`, from
    EC2 (what the head's agent watches; the machine role may describe instances)."""
    from ..cloud.aws.context import AwsContext
    from ..cloud.aws.errors import AwsError
    from ..cloud.aws.names import TAG_ATTEMPT, TAG_NODE, TAG_SESSION, tag_dict

    region = region or os.environ.get("TRAINCTL_REGION") or _imds("/latest/meta-data/placement/region")
    endpoint = endpoint_url if endpoint_url is not None else os.environ.get("TRAINCTL_ENDPOINT_URL") or None
    ctx = AwsContext(region, endpoint_url=endpoint, max_attempts=END_ATTEMPTS, session=session)
    try:
        reservations = ctx.call("ec2", "describe_instances", Filters=[
            {"Name": f"tag:{TAG_SESSION}", "Values": [session_id]},
            {"Name": f"tag:{TAG_ATTEMPT}", "Values": [str(attempt)]}])["Reservations"]
    except AwsError as e:
        raise OSError(f"could not describe the job's machines ({e.message})") from e
    from ..cloud.aws.launch import INSTANCE_GONE_STATES

    out: dict[int, tuple[str, str]] = {}
    # a node replaced by its fleet has two machines: the live one counts, then the newest
    instances = sorted((i for r in reservations for i in r["Instances"]),
                       key=lambda i: (i["State"]["Name"] not in INSTANCE_GONE_STATES, str(i.get("LaunchTime") or "")))
    for instance in instances:
        rank = tag_dict(instance.get("Tags")).get(TAG_NODE, "")
        if rank.isdigit():
            out[int(rank)] = (instance["InstanceId"], instance["State"]["Name"])
    return out


def _delete_templates(ctx: Any, session_id: str) -> list[str]:
    from ..cloud.aws.errors import AwsRequestError
    from ..cloud.aws.launch import session_launch_templates

    done = []
    for template in session_launch_templates(ctx, session_id):
        try:
            ctx.call("ec2", "delete_launch_template", LaunchTemplateId=template["LaunchTemplateId"])
            done.append(f"launch template {template['LaunchTemplateId']}: deleted")
        except AwsRequestError as e:
            if not e.code.startswith(("InvalidLaunchTemplateId", "InvalidLaunchTemplateName")):  # gone already
                raise
    return done


def _machine_id() -> str:
    given = os.environ.get("TRAINCTL_MACHINE_ID", "")
    return given if given.startswith("i-") else _imds("/latest/meta-data/instance-id")


def _imds(path: str, timeout_s: float = 2.0) -> str:
    """One IMDSv2 read (token, then GET), past any HTTP proxy: IMDS is link-local."""
    import urllib.request

    endpoint = (os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or "http://169.254.169.254").rstrip("/")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    put = urllib.request.Request(endpoint + "/latest/api/token", data=b"", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    with opener.open(put, timeout=timeout_s) as response:
        token = response.read().decode()
    get = urllib.request.Request(endpoint + path, headers={"X-aws-ec2-metadata-token": token})
    with opener.open(get, timeout=timeout_s) as response:
        return response.read().decode().strip()

