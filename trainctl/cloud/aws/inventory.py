"""What trainctl has running or left behind in a region, what it costs, and how to end it.

``list_resources`` reads trainctl-tagged instances, fleets, volumes, launch templates and the
bucket's incomplete multipart uploads; a resource whose session has ended, or is unknown to
this machine's session store, is flagged as a possible leak with the command that ends it.
Session states come from the caller (``session_status``), so this layer reads no local files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .context import AwsContext
from .cost import CostSummary, MachineUsage, ended_at, session_cost
from .errors import AwsError
from .facts import PriceFact, iso_utc, on_demand_price, spot_price, utcnow
from .launch import (
    FLEET_GONE_STATES,
    INSTANCE_GONE_STATES,
    session_fleets,
    session_instances,
    session_launch_templates,
)
from .names import TAG_NODE, TAG_PROJECT, TAG_SESSION, tag_dict

ENDED_STATUSES = frozenset({"completed", "failed", "killed", "stopped"})
UPLOAD_STALE_AFTER = timedelta(days=1)

SessionStatusLookup = Callable[[str], "str | None"] | Mapping[str, str] | None


def _status_of(lookup: SessionStatusLookup, session_id: str | None) -> str | None:
    if not session_id or lookup is None:
        return None
    if callable(lookup):
        return lookup(session_id)
    return lookup.get(session_id)


def _leak_reason(lookup: SessionStatusLookup, session_id: str | None) -> str | None:
    """Why a live resource of ``session_id`` looks leaked, or None when it has a live session."""
    if lookup is None:
        return None  # no session store to compare with: flag nothing by session
    status = _status_of(lookup, session_id)
    if status is None:
        return f"session {session_id or '?'} is unknown here (started elsewhere, or its record was deleted)"
    if status in ENDED_STATUSES:
        return f"session {session_id} has ended ({status})"
    return None


class PriceBook:
    """Prices looked up once per (type, market, zone) while listing."""

    def __init__(self, ctx: AwsContext, now: datetime) -> None:
        self.ctx = ctx
        self.now = now
        self._cache: dict[tuple[str, str, str | None], PriceFact] = {}

    def price(self, instance_type: str, market: str, zone: str | None) -> PriceFact:
        key = (instance_type, market, zone if market == "spot" else None)
        if key not in self._cache:
            self._cache[key] = (spot_price(self.ctx, [instance_type], [zone] if zone else [], self.now)
                                if market == "spot" else on_demand_price(self.ctx, instance_type))
        return self._cache[key]


@dataclass
class MachineRow:
    instance_id: str
    session_id: str | None
    project: str | None
    state: str
    instance_type: str
    market: str
    zone: str | None
    launched_at: str
    uptime_s: float
    usd_per_hour: float | None
    price_source: str
    cost_usd: float | None
    fleet_id: str | None = None
    leak: str | None = None
    end_command: str | None = None
    state_reason: str | None = None  # EC2's code, e.g. Server.SpotInstanceTermination
    node: int | None = None  # a multi-node session's machine: its node rank (0 is the head)


@dataclass
class FleetRow:
    fleet_id: str
    session_id: str | None
    state: str
    activity: str | None
    valid_until: str | None
    instance_ids: list[str] = field(default_factory=list)
    leak: str | None = None
    end_command: str | None = None


@dataclass
class LeakRow:
    kind: str  # instance | fleet | volume | launch template | multipart upload
    resource_id: str
    session_id: str | None
    reason: str
    end_command: str


@dataclass
class Inventory:
    region: str
    generated_at: str
    machines: list[MachineRow] = field(default_factory=list)
    fleets: list[FleetRow] = field(default_factory=list)
    leaks: list[LeakRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render_text(self) -> str:
        lines = [f"trainctl on AWS in {self.region} at {self.generated_at}"]
        if not self.machines and not self.fleets:
            lines.append("  no machines or fleets")
        if self.machines:
            header = ("INSTANCE", "SESSION", "NODE", "STATE", "TYPE", "MARKET", "UPTIME", "$/H", "COST SO FAR")
            rows: list[tuple[str, ...]] = []
            for sid, group in _by_session(self.machines):
                rows += [(m.instance_id, m.session_id or "?", "-" if m.node is None else str(m.node), m.state,
                          m.instance_type, m.market, _duration(m.uptime_s),
                          "?" if m.usd_per_hour is None else f"{m.usd_per_hour:.4f}",
                          "unknown" if m.cost_usd is None else f"${m.cost_usd:.2f}") for m in group]
                if len(group) > 1:  # one job over several machines: one figure for the session
                    hourly = [m.usd_per_hour for m in group if m.state not in INSTANCE_GONE_STATES]
                    costs = [m.cost_usd for m in group]
                    rows.append(("", f"{sid or '?'} total", f"{len(group)}", "", "", "", "",
                                 "?" if any(h is None for h in hourly) else f"{sum(h or 0 for h in hourly):.4f}",
                                 "unknown" if any(c is None for c in costs) else f"${sum(c or 0 for c in costs):.2f}"))
            lines += _table(header, rows)
        if self.fleets:
            header = ("FLEET", "SESSION", "STATE", "VALID UNTIL", "MACHINES")
            rows = [(f.fleet_id, f.session_id or "?", f.state, f.valid_until or "-", ", ".join(f.instance_ids) or "-")
                    for f in self.fleets]
            lines += _table(header, rows)
        if self.leaks:
            lines.append(f"Possible leaks ({len(self.leaks)}): these may bill after their session")
            for leak in self.leaks:
                lines.append(f"  {leak.kind} {leak.resource_id}: {leak.reason}")
                lines.append(f"    end it: {leak.end_command}")
        else:
            lines.append("No leaks found.")
        return "\n".join(lines) + "\n"


def _by_session(machines: list[MachineRow]) -> list[tuple[str | None, list[MachineRow]]]:
    """Machines grouped by session (first seen first), node rank order within a session."""
    groups: dict[str | None, list[MachineRow]] = {}
    for m in machines:
        groups.setdefault(m.session_id, []).append(m)
    return [(sid, sorted(group, key=lambda m: (m.node is None, m.node or 0))) for sid, group in groups.items()]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(f"{c!s:<{w}}" for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def _market(instance: dict[str, Any]) -> str:
    return "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand"


def _machine_row(ctx: AwsContext, instance: dict[str, Any], prices: PriceBook, now: datetime,
                 fleet_of: Mapping[str, str], usd_per_hour: float | None = None) -> tuple[MachineRow, MachineUsage]:
    tags = tag_dict(instance.get("Tags"))
    market = _market(instance)
    zone = instance.get("Placement", {}).get("AvailabilityZone")
    started = instance["LaunchTime"]
    state = instance["State"]["Name"]
    end = ended_at(instance) if state in INSTANCE_GONE_STATES else None
    if usd_per_hour is None:
        fact = prices.price(instance["InstanceType"], market, zone)
        usd_per_hour, source = fact.usd_per_hour, fact.source
    else:
        source = "recorded at launch"
    usage = MachineUsage(instance["InstanceId"], instance["InstanceType"], market, started,
                         end if state in INSTANCE_GONE_STATES else None,
                         usd_per_hour if (state not in INSTANCE_GONE_STATES or end) else None)
    session_id = tags.get(TAG_SESSION)
    row = MachineRow(
        instance_id=instance["InstanceId"], session_id=session_id, project=tags.get(TAG_PROJECT), state=state,
        instance_type=instance["InstanceType"], market=market, zone=zone, launched_at=iso_utc(started),
        uptime_s=usage.running_s(now), usd_per_hour=usd_per_hour, price_source=source,
        cost_usd=usage.cost_usd(now),
        fleet_id=tags.get("aws:ec2:fleet-id") or fleet_of.get(instance["InstanceId"]),
        end_command=f"trainctl aws terminate {session_id or instance['InstanceId']} --region {ctx.region}",
        state_reason=(instance.get("StateReason") or {}).get("Code"),
        node=int(tags[TAG_NODE]) if tags.get(TAG_NODE, "").isdigit() else None)
    return row, usage


def _fleet_rows(ctx: AwsContext, fleets: list[dict[str, Any]]) -> tuple[list[FleetRow], dict[str, str]]:
    rows, fleet_of = [], {}
    for fleet in fleets:
        fid = fleet["FleetId"]
        try:
            members = [i["InstanceId"] for i in ctx.call("ec2", "describe_fleet_instances", FleetId=fid)
                       .get("ActiveInstances", [])]
        except AwsError:
            members = []
        for iid in members:
            fleet_of[iid] = fid
        valid = fleet.get("ValidUntil")
        session_id = tag_dict(fleet.get("Tags")).get(TAG_SESSION)
        rows.append(FleetRow(fid, session_id, fleet.get("FleetState", "?"), fleet.get("ActivityStatus"),
                             iso_utc(valid) if isinstance(valid, datetime) else valid, members,
                             end_command=f"trainctl aws terminate {session_id or fid} --region {ctx.region}"))
    return rows, fleet_of


def list_resources(ctx: AwsContext, *, session_status: SessionStatusLookup = None, bucket: str | None = None,
                   prefix: str | None = None, now: datetime | None = None,
                   include_terminated: bool = False) -> Inventory:
    """Every trainctl-tagged machine and fleet in the region, with cost so far and possible leaks."""
    now = now or utcnow()
    inventory = Inventory(region=ctx.region, generated_at=iso_utc(now))
    prices = PriceBook(ctx, now)
    fleet_rows, fleet_of = _fleet_rows(ctx, session_fleets(ctx))
    live_machines: dict[str, list[MachineRow]] = {}
    for instance in session_instances(ctx):
        if instance["State"]["Name"] in INSTANCE_GONE_STATES and not include_terminated:
            continue
        row, _ = _machine_row(ctx, instance, prices, now, fleet_of)
        inventory.machines.append(row)
        if row.state not in INSTANCE_GONE_STATES:
            live_machines.setdefault(row.session_id or "", []).append(row)
            row.leak = _leak_reason(session_status, row.session_id)
            if row.state in ("stopped", "stopping"):
                row.leak = row.leak or "a stopped machine keeps billing for its disk"
            if row.leak:
                inventory.leaks.append(LeakRow("instance", row.instance_id, row.session_id, row.leak,
                                               row.end_command or ""))
    inventory.fleets = fleet_rows
    for fleet in fleet_rows:
        live = [m for m in live_machines.get(fleet.session_id or "", []) if m.instance_id in fleet.instance_ids
                or m.fleet_id == fleet.fleet_id]
        reason = _leak_reason(session_status, fleet.session_id)
        if fleet.state == "deleted_running" and live:
            fleet.leak = (f"deleted without terminating, {len(live)} machine(s) still running"
                          + (f"; {reason}" if reason else ""))
        elif fleet.state not in FLEET_GONE_STATES and reason:
            fleet.leak = f"{reason}; the fleet keeps replacing its machine until {fleet.valid_until or 'deleted'}"
        if fleet.leak:
            inventory.leaks.append(LeakRow("fleet", fleet.fleet_id, fleet.session_id, fleet.leak,
                                           fleet.end_command or ""))
    _volume_leaks(ctx, inventory)
    _template_leaks(ctx, inventory, session_status)
    if bucket:
        _upload_leaks(ctx, inventory, bucket, prefix or "", session_status, now)
    return inventory


def _volume_leaks(ctx: AwsContext, inventory: Inventory) -> None:
    volumes = ctx.paginate("ec2", "describe_volumes", "Volumes", Filters=[
        {"Name": f"tag:{TAG_SESSION}", "Values": ["*"]}, {"Name": "status", "Values": ["available"]}])
    for volume in volumes:
        session_id = tag_dict(volume.get("Tags")).get(TAG_SESSION)
        inventory.leaks.append(LeakRow(
            "volume", volume["VolumeId"], session_id,
            f"{volume.get('Size', '?')} GB volume attached to nothing (it bills until deleted)",
            f"aws ec2 delete-volume --volume-id {volume['VolumeId']} --region {ctx.region}"))


def _template_leaks(ctx: AwsContext, inventory: Inventory, session_status: SessionStatusLookup) -> None:
    active_sessions = {f.session_id for f in inventory.fleets if f.state not in FLEET_GONE_STATES}
    for template in session_launch_templates(ctx):
        session_id = tag_dict(template.get("Tags")).get(TAG_SESSION)
        if session_id in active_sessions:
            continue
        reason = _leak_reason(session_status, session_id)
        if reason:
            tid = template["LaunchTemplateId"]
            inventory.leaks.append(LeakRow(
                "launch template", tid, session_id, f"{reason}; no fleet uses it",
                f"aws ec2 delete-launch-template --launch-template-id {tid} --region {ctx.region}"))


def _upload_leaks(ctx: AwsContext, inventory: Inventory, bucket: str, prefix: str,
                  session_status: SessionStatusLookup, now: datetime) -> None:
    uploads = ctx.paginate("s3", "list_multipart_uploads", "Uploads", Bucket=bucket, Prefix=prefix,
                           error_context={"bucket": bucket})
    for upload in uploads:
        key, started = upload["Key"], upload["Initiated"]
        session_id = _session_in_key(key, prefix)
        reason = _leak_reason(session_status, session_id) if session_id else None
        if reason is None and now - started > UPLOAD_STALE_AFTER:
            reason = f"started {iso_utc(started)}, over a day ago"
        if reason:
            inventory.leaks.append(LeakRow(
                "multipart upload", upload["UploadId"], session_id,
                f"incomplete upload of s3://{bucket}/{key} ({reason}); its parts bill as storage",
                f"aws s3api abort-multipart-upload --bucket {bucket} --key {key} --upload-id {upload['UploadId']}"))


def _session_in_key(key: str, prefix: str) -> str | None:
    """``<prefix>/<project>/<session>/...`` -> session (the storage layout's contract)."""
    rest = key[len(prefix):].lstrip("/") if prefix and key.startswith(prefix) else key
    parts = rest.split("/")
    return parts[1] if len(parts) > 2 else None


@dataclass
class SessionStatus:
    session_id: str
    region: str
    state: str  # running | starting | ended | none
    machines: list[MachineRow]
    fleets: list[FleetRow]
    launch_templates: list[str]
    cost: CostSummary

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost"] = asdict(self.cost) | {"describe": self.cost.describe()}
        return data

    def render_text(self) -> str:
        lines = [f"session {self.session_id} on AWS {self.region}: {self.state}"]
        for m in self.machines:
            node = f" node {m.node}" if m.node is not None else ""
            lines.append(f"  {m.instance_id}{node} {m.state} {m.instance_type} {m.market} {m.zone or '?'} "
                         f"up {_duration(m.uptime_s)}"
                         + ("" if m.cost_usd is None else f" ${m.cost_usd:.2f}"))
        for f in self.fleets:
            lines.append(f"  fleet {f.fleet_id} {f.state} valid until {f.valid_until or '-'}")
        lines.append(f"  cost so far: {self.cost.describe()}")
        return "\n".join(lines) + "\n"


def session_status(ctx: AwsContext, session_id: str, *, now: datetime | None = None,
                   recorded_prices: Mapping[str, float] | None = None) -> SessionStatus:
    """One session's machines (terminated ones included while EC2 still lists them) and total cost.

    ``recorded_prices`` (instance id -> USD/h, from the session record) wins over current prices.
    """
    now = now or utcnow()
    prices = PriceBook(ctx, now)
    fleets, fleet_of = _fleet_rows(ctx, session_fleets(ctx, session_id))
    machines, usages = [], []
    for instance in sorted(session_instances(ctx, session_id), key=lambda i: i["LaunchTime"]):
        row, usage = _machine_row(ctx, instance, prices, now, fleet_of,
                                  (recorded_prices or {}).get(instance["InstanceId"]))
        machines.append(row)
        usages.append(usage)
    live = [m for m in machines if m.state not in INSTANCE_GONE_STATES]
    active_fleet = any(f.state not in FLEET_GONE_STATES for f in fleets)
    if any(m.state == "running" for m in live):
        state = "running"
    elif live or active_fleet:
        state = "starting"
    elif machines or fleets:
        state = "ended"
    else:
        state = "none"
    templates = [t["LaunchTemplateId"] for t in session_launch_templates(ctx, session_id)]
    return SessionStatus(session_id, ctx.region, state, machines, fleets, templates, session_cost(usages, now))


def shell_command(ctx: AwsContext, target: str) -> list[str]:
    """The command that opens a shell on a session's running machine through SSM (no open port)."""
    from ...errors import NotFoundError

    if target.startswith("i-"):
        return ["aws", "ssm", "start-session", "--target", target, "--region", ctx.region]
    running = [i for i in session_instances(ctx, target) if i["State"]["Name"] == "running"]
    if not running:
        raise NotFoundError(f"Session {target} has no running machine in {ctx.region}.",
                            f"See where it stands with: trainctl aws status {target} --region {ctx.region}")
    newest = max(running, key=lambda i: i["LaunchTime"])
    return ["aws", "ssm", "start-session", "--target", newest["InstanceId"], "--region", ctx.region]
