"""The launch plan: a pure function of the request and the looked-up facts.

``plan_launch`` holds the exact EC2 requests ``launch`` will send, so ``--dry-run`` prints
what would really happen (torchx's ``submit_dryrun``). Problems that would make AWS refuse
the launch, or break the budget, are found here, before anything is created.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .errors import (
    AccessDeniedError,
    AwsError,
    BudgetExceededError,
    LaunchRefusedError,
    QuotaExceededError,
    SetupMissingError,
)
from .facts import AmiFact, Facts, InstanceTypeInfo, PriceFact, QuotaFact, iso_utc
from .names import (
    TAG_NODE,
    USER_DATA_LIMIT_BYTES,
    instance_profile_name,
    launch_template_name,
    nodes_security_group_name,
    placement_group_name,
    quota_for,
    secrets_path,
    session_tags,
    tag_list,
)
from .request import LaunchRequest
from .userdata import BootSpec, boot_script_size, render_boot_script

# Same GPUs is what makes another instance type a safe fleet replacement.
FLEET_ALLOCATION = "price-capacity-optimized"
# Stands for the session's node security group in the planned requests: its id exists only
# once CreateSecurityGroup answered; launch puts the real id in its place.
NODE_GROUP = "<the session's node security group>"
RDZV_PORT = 29400  # torchrun's c10d rendezvous on the head node


@dataclass(frozen=True)
class Problem:
    """Something that makes the launch refuse; ``error`` is raised by ``AwsPlan.check``."""

    error: AwsError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self.error).__name__, "message": self.error.message, "hint": self.error.hint}


@dataclass
class AwsPlan:
    request: LaunchRequest
    region: str
    instance_types: tuple[InstanceTypeInfo, ...]
    zones: tuple[str, ...]  # zones tried in order (on-demand) or spread over (fleet)
    subnets: tuple[tuple[str, str], ...]
    price: PriceFact
    on_demand_price: PriceFact | None
    projected_cost_usd: float | None
    deadline: datetime
    ami: AmiFact
    quota: QuotaFact
    boot_script: str
    requests: list[dict[str, Any]]  # [{"operation": ..., "params": {...}}] in the order sent
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    planned_at: datetime | None = None
    node_boot_scripts: tuple[str, ...] = ()  # multi-node: one per node rank (boot_script is node 0's)

    @property
    def nodes(self) -> int:
        return self.request.nodes

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def uses_fleet(self) -> bool:
        return self.request.market == "spot"

    @property
    def deadline_iso(self) -> str:
        return iso_utc(self.deadline)

    def check(self) -> None:
        """Raise the first blocking problem, if any."""
        if self.problems:
            raise self.problems[0].error

    def request_params(self, operation: str) -> dict[str, Any]:
        for item in self.requests:
            if item["operation"] == operation:
                return copy.deepcopy(item["params"])
        raise KeyError(operation)

    def redacted_requests(self) -> list[dict[str, Any]]:
        """The requests for display: the boot script summarised (it is shown whole elsewhere).

        Nothing else needs hiding: secrets never enter a request (``check_env`` refuses
        secret-looking names in user data; values travel through SSM).
        """
        shown = []
        for item in copy.deepcopy(self.requests):
            params = item["params"]
            script = self.node_boot_scripts[item["node"]] if "node" in item else self.boot_script
            digest = hashlib.sha256(script.encode()).hexdigest()[:16]
            which = f"node {item['node']}'s boot script" if "node" in item else "the boot script below"
            summary = f"<{which}: {boot_script_size(script)} bytes, sha256 {digest}...>"
            for holder in (params, params.get("LaunchTemplateData", {})):
                if "UserData" in holder:
                    holder["UserData"] = summary
            shown.append(item)
        return shown

    def to_dict(self) -> dict[str, Any]:
        req = self.request
        return {
            "session_id": req.session_id, "project": req.project, "attempt": req.attempt,
            "region": self.region, "market": req.market,
            "mechanism": "ec2-fleet-maintain" if self.uses_fleet else "run-instances",
            "instance_types": [t.__dict__ | {"architectures": list(t.architectures)} for t in self.instance_types],
            "zones": list(self.zones),
            "price": _price_dict(self.price),
            "on_demand_price": _price_dict(self.on_demand_price) if self.on_demand_price else None,
            "max_hours": req.max_hours,
            "projected_cost_usd": _round(self.projected_cost_usd),
            **({"nodes": req.nodes, "efa": req.efa} if req.nodes > 1 else {}),
            "budget_usd": req.budget_usd,
            "deadline": self.deadline_iso,
            "ami": self.ami.__dict__,
            "quota": self.quota.__dict__,
            "disk_gb": req.disk_gb,
            "storage_uri": req.storage_uri,
            "display": [list(row) for row in req.display],
            "boot_script": self.boot_script,
            "boot_script_bytes": boot_script_size(self.boot_script),
            **({"node_boot_scripts": list(self.node_boot_scripts)} if req.nodes > 1 else {}),
            "requests": self.redacted_requests(),
            "problems": [p.to_dict() for p in self.problems],
            "warnings": list(self.warnings),
            "planned_at": iso_utc(self.planned_at) if self.planned_at else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def render_text(self) -> str:
        return render_plan(self)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _price_dict(price: PriceFact) -> dict[str, Any]:
    data = dict(price.__dict__)
    data["per_zone"] = [list(p) for p in price.per_zone]
    return data


def client_token(*parts: object) -> str:
    """Idempotency token (EC2: at most 64 ASCII characters): readable when short, hashed when long."""
    text = "-".join(str(p) for p in parts)
    return text if len(text) <= 64 else hashlib.sha256(text.encode()).hexdigest()[:64]


def boot_env(request: LaunchRequest, region: str, node_rank: int = 0) -> dict[str, str]:
    """What the agent reads at boot, besides its command line (names are the agent's contract)."""
    env = {"AWS_DEFAULT_REGION": region, "TRAINCTL_REGION": region, "TRAINCTL_PROJECT": request.project,
           "TRAINCTL_ATTEMPT": str(request.attempt), "TRAINCTL_BACKEND": "aws"}
    if request.nodes > 1:  # the agent of node 0 publishes its private address; the others wait for it
        env.update(TRAINCTL_NNODES=str(request.nodes), TRAINCTL_NODE_RANK=str(node_rank))
        if request.market == "spot":  # each node's fleet replaces it: the job waits for it and resumes
            env["TRAINCTL_NODE_REPLACEMENT"] = "fleet"
    if request.storage_uri:
        env["TRAINCTL_STORAGE_URI"] = request.storage_uri
    if request.secrets:
        env["TRAINCTL_SSM_PATH"] = secrets_path(request.project)
        env["TRAINCTL_FORWARD_VARS"] = ",".join(request.secrets)
    env.update(request.env)
    return env


def instance_spec(request: LaunchRequest, facts: Facts, boot_script: str, node_rank: int | None = None) -> dict[str, Any]:
    """The machine, as both RunInstances and a launch template take it (one source for both)."""
    named = session_tags(request.project, request.session_id, request.attempt, request.name)
    if node_rank is not None:
        named = {**named, TAG_NODE: str(node_rank),
                 "Name": f"{named['Name']} node {node_rank}/{request.nodes}"}
    tags = tag_list(named)
    profile = ({"Arn": facts.instance_profile_arn} if facts.instance_profile_arn
               else {"Name": instance_profile_name(request.project)})
    spec: dict[str, Any] = {
        "ImageId": facts.ami.image_id,
        "InstanceType": request.instance_type,
        "IamInstanceProfile": profile,
        "UserData": base64.b64encode(boot_script.encode()).decode(),
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                            "HttpPutResponseHopLimit": 2, "InstanceMetadataTags": "enabled"},
        "BlockDeviceMappings": [{"DeviceName": facts.ami.root_device_name, "Ebs": {
            "VolumeSize": request.disk_gb, "VolumeType": "gp3", "DeleteOnTermination": True,
            "Encrypted": True}}],
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                              for kind in ("instance", "volume", "network-interface")],
    }
    if facts.network.security_group_id:
        spec["SecurityGroupIds"] = [facts.network.security_group_id]
    return spec


def _node_requests(request: LaunchRequest, facts: Facts, boots: tuple[str, ...],
                   zones: tuple[str, ...]) -> list[dict[str, Any]]:
    """A multi-node job: one cluster placement group, a security group that admits its own
    members only (all TCP; with EFA all traffic, both ways, as EFA requires), then one
    RunInstances per node, all in one zone, each with its own boot script (its node rank)."""
    subnets = dict(facts.network.subnets)
    tags = session_tags(request.project, request.session_id, request.attempt, request.name)
    group_name = placement_group_name(request.session_id, request.attempt)
    protocol = "-1" if request.efa else "tcp"
    member = {"IpProtocol": protocol, "UserIdGroupPairs": [{"GroupId": NODE_GROUP,
                                                            "Description": "the session's own nodes"}]}
    if protocol == "tcp":
        member |= {"FromPort": 0, "ToPort": 65535}
    out: list[dict[str, Any]] = [
        {"operation": "CreatePlacementGroup", "params": {
            "GroupName": group_name, "Strategy": "cluster",
            "TagSpecifications": [{"ResourceType": "placement-group", "Tags": tag_list(tags)}]}},
        {"operation": "CreateSecurityGroup", "params": {
            "GroupName": nodes_security_group_name(request.session_id, request.attempt),
            "VpcId": facts.network.vpc_id,
            "Description": f"trainctl session {request.session_id}: its nodes reach each other, nothing else",
            "TagSpecifications": [{"ResourceType": "security-group",
                                   "Tags": tag_list({**tags, "trainctl:purpose": "nodes"})}]}},
        {"operation": "AuthorizeSecurityGroupIngress", "params": {"GroupId": NODE_GROUP, "IpPermissions": [member]}},
    ]
    if request.efa:
        out.append({"operation": "AuthorizeSecurityGroupEgress", "params": {"GroupId": NODE_GROUP,
                                                                            "IpPermissions": [member]}})
    if request.market == "spot":
        return out + _node_fleet_requests(request, facts, boots, zones, group_name)
    zone = zones[0] if zones else None
    for rank, boot in enumerate(boots):
        spec = instance_spec(request, facts, boot, node_rank=rank)
        groups = [*spec.pop("SecurityGroupIds", []), NODE_GROUP]
        params = spec | {"UserData": boot, "MinCount": 1, "MaxCount": 1,
                         "Placement": {"GroupName": group_name, "AvailabilityZone": zone},
                         "ClientToken": client_token(request.session_id, request.attempt, zone or "run", rank)}
        if request.efa:
            params["NetworkInterfaces"] = [{"DeviceIndex": 0, "InterfaceType": "efa", "Groups": groups,
                                            "SubnetId": subnets.get(zone) if zone else None,
                                            "DeleteOnTermination": True}]
        else:
            params |= {"SecurityGroupIds": groups, "SubnetId": subnets.get(zone) if zone else None}
        out.append({"operation": "RunInstances", "node": rank, "zones": list(zones), "params": params})
    return out


def node_launch_template_name(session_id: str, attempt: int, rank: int) -> str:
    return launch_template_name(session_id, attempt)[:120] + f"-n{rank}"


def fleet_params(request: LaunchRequest, template_name: str, overrides: list[dict[str, Any]], deadline: datetime,
                 tags: list[dict[str, str]], token: str) -> dict[str, Any]:
    """One EC2 Fleet of type maintain, one spot machine: AWS starts another when it reclaims it."""
    return {
        "Type": "maintain",
        "ClientToken": token,
        "TargetCapacitySpecification": {"TotalTargetCapacity": 1, "SpotTargetCapacity": 1,
                                        "OnDemandTargetCapacity": 0, "DefaultTargetCapacityType": "spot"},
        "SpotOptions": {"AllocationStrategy": FLEET_ALLOCATION, "InstanceInterruptionBehavior": "terminate"},
        "LaunchTemplateConfigs": [{"LaunchTemplateSpecification": {"LaunchTemplateName": template_name,
                                                                   "Version": "1"},
                                   "Overrides": overrides}],
        "ExcessCapacityTerminationPolicy": "termination",
        "ValidUntil": iso_utc(deadline),
        "TerminateInstancesWithExpiration": True,
        "TagSpecifications": [{"ResourceType": "fleet", "Tags": tags}]}


def _node_fleet_requests(request: LaunchRequest, facts: Facts, boots: tuple[str, ...], zones: tuple[str, ...],
                         group_name: str) -> list[dict[str, Any]]:
    """Spot nodes: per node rank a launch template (its boot script, the placement group, the
    node security group, its tags) and an EC2 Fleet of type maintain that keeps one machine of
    it. AWS replaces a reclaimed node from the same template: same node rank, same attempt, in
    the group (a replacement that finds no room there waits for it). The zone is the fleets'
    overrides' subnet, tried in order at launch; with EFA the subnet is the interface's, so
    only the first zone is tried."""
    subnets = dict(facts.network.subnets)
    deadline = facts.now + timedelta(hours=request.max_hours)
    tried = zones[:1] if request.efa else zones
    zone = tried[0] if tried else None
    templates: list[dict[str, Any]] = []
    fleets: list[dict[str, Any]] = []
    for rank, boot in enumerate(boots):
        spec = instance_spec(request, facts, boot, node_rank=rank)
        groups = [*spec.pop("SecurityGroupIds", []), NODE_GROUP]
        data = spec | {"Placement": {"GroupName": group_name}}
        if request.efa:
            data["NetworkInterfaces"] = [{"DeviceIndex": 0, "InterfaceType": "efa", "Groups": groups,
                                          "SubnetId": subnets.get(zone) if zone else None,
                                          "DeleteOnTermination": True}]
        else:
            data["SecurityGroupIds"] = groups
        tags = tag_list({**session_tags(request.project, request.session_id, request.attempt, request.name),
                         TAG_NODE: str(rank)})
        name = node_launch_template_name(request.session_id, request.attempt, rank)
        templates.append({"operation": "CreateLaunchTemplate", "node": rank, "params": {
            "LaunchTemplateName": name,
            "VersionDescription": f"trainctl session {request.session_id} attempt {request.attempt} node {rank}",
            "ClientToken": client_token(request.session_id, request.attempt, "lt", rank),
            "LaunchTemplateData": data,
            "TagSpecifications": [{"ResourceType": "launch-template", "Tags": tags}]}})
        overrides = [{"InstanceType": info.name, **({} if request.efa else {"SubnetId": subnets.get(zone)})}
                     for info in facts.instance_types
                     if zone is None or zone in facts.offered_zones.get(info.name, ())]
        fleets.append({"operation": "CreateFleet", "node": rank, "zones": list(tried), "params": fleet_params(
            request, name, overrides, deadline, tags,
            client_token(request.session_id, request.attempt, "fleet", zone or "run", rank))})
    return templates + fleets


def _requests(request: LaunchRequest, facts: Facts, boot_script: str, zones: tuple[str, ...],
              deadline: datetime, boots: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    if request.nodes > 1:
        return _node_requests(request, facts, boots, zones)
    spec = instance_spec(request, facts, boot_script)
    subnets = dict(facts.network.subnets)
    if request.market == "on-demand":
        return [{"operation": "RunInstances",
                 "zones": list(zones),  # tried in this order on InsufficientInstanceCapacity
                 # boto3 base64-encodes RunInstances user data itself (not a template's)
                 "params": spec | {"UserData": boot_script, "MinCount": 1, "MaxCount": 1,
                                   "SubnetId": subnets.get(zones[0]) if zones else None,
                                   "ClientToken": client_token(request.session_id, request.attempt,
                                                               zones[0] if zones else "run")}}]
    name = launch_template_name(request.session_id, request.attempt)
    tags = tag_list(session_tags(request.project, request.session_id, request.attempt, request.name))
    overrides = [{"InstanceType": info.name, "SubnetId": subnets[zone]}
                 for info in facts.instance_types for zone in zones
                 if zone in facts.offered_zones.get(info.name, ()) and zone in subnets]
    return [
        {"operation": "CreateLaunchTemplate", "params": {
            "LaunchTemplateName": name,
            "VersionDescription": f"trainctl session {request.session_id} attempt {request.attempt}",
            "ClientToken": client_token(request.session_id, request.attempt, "lt"),
            "LaunchTemplateData": spec,
            "TagSpecifications": [{"ResourceType": "launch-template", "Tags": tags}]}},
        {"operation": "CreateFleet", "params": fleet_params(
            request, name, overrides, deadline, tags, client_token(request.session_id, request.attempt, "fleet"))},
    ]


def plan_launch(request: LaunchRequest, facts: Facts) -> AwsPlan:
    """The plan for ``request`` given ``facts``: pure, repeatable, no I/O."""
    primary = facts.instance_types[0]
    problems: list[Problem] = []
    warnings = list(facts.notes)

    for other in facts.instance_types[1:]:
        if (other.gpu_model, other.gpu_count) != (primary.gpu_model, primary.gpu_count):
            problems.append(Problem(LaunchRefusedError(
                f"{other.name} has {other.gpu_count} x {other.gpu_model}, {primary.name} has "
                f"{primary.gpu_count} x {primary.gpu_model}: a replacement must have the same GPUs.",
                f"Drop {other.name} from the alternative instance types.")))

    subnets = dict(facts.network.subnets)
    zones = tuple(z for z in facts.offered_zones.get(primary.name, ()) if z in subnets)
    if not zones:
        problems.append(Problem(SetupMissingError(
            f"No default subnet in a zone that offers {primary.name} in {facts.region}.", facts.region)))

    deadline = facts.now + timedelta(hours=request.max_hours)
    price = facts.price
    projected = price.usd_per_hour * request.max_hours * request.nodes if price.usd_per_hour is not None else None
    if request.budget_usd is not None:
        if projected is None:
            warnings.append(f"The budget (${request.budget_usd:.2f}) can't be checked: the price is "
                            f"unknown. The deadline still ends the machine after {request.max_hours:g} h.")
        elif projected > request.budget_usd:
            problems.append(Problem(BudgetExceededError(projected, request.budget_usd, request.max_hours,
                                                        price.usd_per_hour or 0.0)))

    quota = facts.quota
    ref = quota_for(primary.name, request.market)
    # a fleet may start any of its types: the largest must fit
    biggest = max(facts.instance_types, key=lambda t: t.vcpus)
    needed = biggest.vcpus * request.nodes
    if quota.value_vcpus is not None and quota.value_vcpus < needed:
        zero = " (new accounts often start at 0)" if quota.value_vcpus == 0 else ""
        what = f"{request.nodes} x {biggest.name} need" if request.nodes > 1 else f"{biggest.name} needs"
        problems.append(Problem(QuotaExceededError(
            f"The {request.market} quota '{quota.name}' ({quota.code}) is {quota.value_vcpus:g} vCPUs"
            f"{zero}; {what} {needed}.",
            quota=ref, region=facts.region, vcpus_needed=needed, limit_vcpus=quota.value_vcpus)))
    elif quota.value_vcpus is None:
        named = f" '{quota.name}' ({quota.code})" if quota.code else ""
        warnings.append(f"The {request.market} vCPU quota{named} is {quota.source}; if the launch fails on "
                        f"it, raise it to {needed}+ vCPUs"
                        + (f": {ref.raise_command(facts.region, needed)}" if ref else "."))

    if facts.network.security_group_id is None:
        problems.append(Problem(SetupMissingError(
            f"The security group for project '{request.project}' is missing in {facts.region}.", facts.region)))
    if facts.instance_profile_arn is None:
        problems.append(Problem(SetupMissingError(
            f"The instance profile {instance_profile_name(request.project)} is missing.", facts.region)))
    for action in facts.missing_permissions:
        problems.append(Problem(AccessDeniedError(
            f"Access denied: the AWS identity lacks {action}, which the launch needs.",
            f"Grant {action} to the IAM identity trainctl runs as.", action=action)))

    if price.usd_per_hour is None:
        warnings.append(f"The {request.market} price is {price.source}; cost so far will show as unknown.")
    if facts.ami.architecture not in primary.architectures:
        problems.append(Problem(LaunchRefusedError(
            f"AMI {facts.ami.image_id} is {facts.ami.architecture}; {primary.name} runs "
            f"{'/'.join(primary.architectures)}.", "Use --ami auto or an AMI of the right architecture.")))

    if request.efa and not primary.efa_supported:
        problems.append(Problem(LaunchRefusedError(
            f"{primary.name} does not support EFA (its EfaSupported is false).",
            "Drop --efa, or pick a type that has it: aws ec2 describe-instance-types "
            "--filters Name=network-info.efa-supported,Values=true")))
    boots = tuple(render_boot_script(BootSpec(session_id=request.session_id, deadline=deadline,
                                              agent_command=request.agent_command,
                                              env=boot_env(request, facts.region, rank), prepare=request.prepare))
                  for rank in range(request.nodes))
    boot = boots[0]
    if boot_script_size(boot) > USER_DATA_LIMIT_BYTES:
        problems.append(Problem(LaunchRefusedError(
            f"The boot script is {boot_script_size(boot)} bytes; EC2 takes at most "
            f"{USER_DATA_LIMIT_BYTES} bytes of user data.",
            "Move setup steps out of the boot script into the code bundle.")))

    return AwsPlan(request=request, region=facts.region, instance_types=facts.instance_types,
                   zones=zones, subnets=tuple((z, subnets[z]) for z in zones), price=price,
                   on_demand_price=facts.on_demand_price, projected_cost_usd=projected,
                   deadline=deadline, ami=facts.ami, quota=quota, boot_script=boot,
                   requests=_requests(request, facts, boot, zones, deadline, boots), problems=problems,
                   warnings=warnings, planned_at=facts.now,
                   node_boot_scripts=boots if request.nodes > 1 else ())


def compact_json(value: Any, indent: int = 0, width: int = 96) -> str:
    """JSON with short lists and objects kept on one line: the exact request, still readable."""
    flat = json.dumps(value, sort_keys=True)
    if len(flat) + indent <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {compact_json(v, indent + 2, width)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + compact_json(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def render_plan(plan: AwsPlan) -> str:
    req = plan.request
    primary = plan.instance_types[0]
    rows: list[tuple[str, str]] = [
        ("session", f"{req.session_id} (attempt {req.attempt}, project {req.project})"),
        ("region", f"{plan.region}; zones {', '.join(plan.zones) or 'none'}"
                   + (" (tried in this order)" if not plan.uses_fleet or req.nodes > 1 else " (AWS picks)")),
        ("machine", primary.describe()),
    ]
    for other in plan.instance_types[1:]:
        rows.append(("or", other.describe()))
    if req.nodes > 1:
        rows.append(("nodes", f"{req.nodes} machines in one cluster placement group in one zone; node 0 is the "
                              f"head (torchrun's c10d rendezvous on its private address, port {RDZV_PORT})"
                              + ("; an EFA interface on each" if req.efa else "")))
        rows.append(("network", "a security group of the session's own: its members reach each other on "
                                + ("all traffic, in and out (EFA)" if req.efa else "all TCP") + ", nothing else"))
    if plan.uses_fleet and req.nodes > 1:
        rows.append(("market", f"spot, one EC2 Fleet of type maintain per node: AWS replaces a reclaimed node "
                               f"(same node rank, in the placement group; one that finds no room there waits for it), "
                               f"and the job resumes with {req.nodes} nodes from the newest verified checkpoint"))
    else:
        rows.append(("market", "spot, through an EC2 Fleet of type maintain: AWS replaces a reclaimed machine"
                     if plan.uses_fleet else "on-demand, through RunInstances"))
    rows.append(("price", plan.price.describe()))
    if req.nodes > 1:
        each = plan.price.usd_per_hour
        rows.append(("", f"{req.nodes} x ${each:.4f}/h = ${each * req.nodes:.4f}/h for the job" if each is not None
                     else f"{req.nodes} x unknown"))
    if plan.on_demand_price:
        rows.append(("", f"on-demand: {plan.on_demand_price.describe()}"))
    machines = f", {req.nodes} machines" if req.nodes > 1 else ""
    cost = (f"${plan.projected_cost_usd:.2f} for {req.max_hours:g} h{machines}" if plan.projected_cost_usd is not None
            else f"unknown for {req.max_hours:g} h (price unknown)")
    if req.budget_usd is not None:
        cost += f"; budget ${req.budget_usd:.2f}"
    rows.append(("projected", cost))
    rows.append(("deadline", f"{plan.deadline_iso}: the machine powers itself off"
                 + (", and the fleet expires and AWS terminates its machines" if plan.uses_fleet else "")))
    quota = plan.quota
    quota_text = (f"{quota.value_vcpus:g} vCPUs ({quota.source})" if quota.value_vcpus is not None
                  else quota.source)
    needs = max(t.vcpus for t in plan.instance_types) * req.nodes
    rows.append(("quota", f"{quota.name or 'unknown quota'}"
                 + (f" ({quota.code})" if quota.code else "") + f": {quota_text}; needs {needs}"))
    rows.append(("ami", f"{plan.ami.image_id} {plan.ami.name} [{plan.ami.source}]"))
    rows.append(("disk", f"{req.disk_gb} GB gp3, encrypted, deleted with the machine"))
    rows.append(("storage", req.storage_uri or "(none)"))
    rows += list(req.display)
    rows.append(("boot script", f"{boot_script_size(plan.boot_script)} of {USER_DATA_LIMIT_BYTES} bytes, "
                                "no secrets" + (f"; secrets from SSM: {', '.join(req.secrets)}" if req.secrets else "")))
    width = max(len(k) for k, _ in rows)
    lines = [f"Launch plan ({'ready' if plan.ok else 'REFUSED'})"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    for problem in plan.problems:
        lines.append(f"  problem: {problem.error.message}")
        if problem.error.hint:
            lines.append(f"    hint: {problem.error.hint}")
    for warning in plan.warnings:
        lines.append(f"  warning: {warning}")
    lines.append("Requests (in order):")
    for item in plan.redacted_requests():
        extra = f" (zones in order: {', '.join(item['zones'])})" if item.get("zones") else ""
        node = f" node {item['node']}" if "node" in item else ""
        lines.append(f"  {item['operation']}{node}{extra}")
        lines += ["    " + line for line in compact_json(item["params"]).splitlines()]
    lines.append("Boot script:" if req.nodes == 1 else
                 f"Boot script of node 0 (node r differs only in TRAINCTL_NODE_RANK=r, 0 to {req.nodes - 1}):")
    lines += ["  " + line if line else "" for line in plan.boot_script.splitlines()]
    return "\n".join(lines) + "\n"
