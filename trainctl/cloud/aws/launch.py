"""Start machines from a plan, and end them: every step idempotent, nothing half-made left behind.

On-demand: RunInstances, trying the plan's zones in order on InsufficientInstanceCapacity.
Spot: a launch template (resolved AMI, tags, boot script) and an EC2 Fleet of type
``maintain`` so AWS itself replaces a reclaimed machine and ends everything at ``ValidUntil``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import TrainctlError, UsageError
from .context import AwsContext
from .errors import (
    AwsError,
    AwsRequestError,
    CapacityUnavailableError,
    InstanceTypeNotOfferedError,
)
from .names import TAG_NODE, TAG_SESSION, tag_dict
from .plan import NODE_GROUP, AwsPlan, client_token

FLEET_GONE_STATES = ("deleted", "deleted_running", "deleted_terminating", "failed")
INSTANCE_GONE_STATES = ("shutting-down", "terminated")


@dataclass
class LaunchResult:
    """What ``launch`` made: plain data, the AWS backend's handle is built from it."""

    session_id: str
    attempt: int
    region: str
    market: str
    mechanism: str  # run-instances | ec2-fleet-maintain
    deadline: str
    instance_ids: list[str] = field(default_factory=list)
    zone: str | None = None
    fleet_id: str | None = None
    launch_template_id: str | None = None
    launch_template_name: str | None = None
    usd_per_hour: float | None = None  # the price the plan had (the highest, for a fleet); per machine
    notes: list[str] = field(default_factory=list)
    nodes: int = 1  # multi-node: instance_ids are in node-rank order
    placement_group: str | None = None
    node_security_group_id: str | None = None
    fleet_ids: list[str] = field(default_factory=list)  # spot nodes: one fleet per node rank
    launch_template_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchResult:
        return cls(**data)


@dataclass
class Action:
    """One thing ``terminate``/``end_fleet`` did (or, in a dry run, would do)."""

    kind: str  # instance | fleet | launch template
    resource_id: str
    result: str  # "terminated (was running)", "already terminated", "would terminate", ...
    command: str = ""  # the AWS CLI equivalent

    def describe(self) -> str:
        return f"{self.kind} {self.resource_id}: {self.result}"


@dataclass
class EndReport:
    target: str
    region: str
    dry_run: bool
    actions: list[Action] = field(default_factory=list)

    @property
    def changed(self) -> list[Action]:
        return [a for a in self.actions if not a.result.startswith(("already", "would", "not found"))]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render_text(self) -> str:
        if not self.actions:
            return f"Nothing to end for {self.target} in {self.region}.\n"
        return "".join(f"{a.describe()}\n" for a in self.actions)


def _attach_cleanup_note(error: TrainctlError, cleaned: list[str], leftovers: list[str]) -> TrainctlError:
    notes = []
    if cleaned:
        notes.append(f"Cleaned up what the launch had made: {', '.join(cleaned)}.")
    if leftovers:
        notes.append(f"Could not clean up: {'; '.join(leftovers)}.")
    if not cleaned and not leftovers:
        notes.append("Nothing was created.")
    error.hint = " ".join(filter(None, [error.hint, *notes]))
    return error


def launch(ctx: AwsContext, plan: AwsPlan) -> LaunchResult:
    """Send the plan's requests; returns as soon as AWS accepted them."""
    plan.check()
    if plan.region != ctx.region:
        raise UsageError(f"The plan is for {plan.region}, the AWS context for {ctx.region}.")
    result = LaunchResult(session_id=plan.request.session_id, attempt=plan.request.attempt, region=plan.region,
                          market=plan.request.market,
                          mechanism="ec2-fleet-maintain" if plan.uses_fleet else "run-instances",
                          deadline=plan.deadline_iso, usd_per_hour=plan.price.usd_per_hour)
    if plan.nodes > 1:
        _launch_nodes(ctx, plan, result)
    elif plan.uses_fleet:
        _launch_fleet(ctx, plan, result)
    else:
        _launch_on_demand(ctx, plan, result)
    return result


def _launch_on_demand(ctx: AwsContext, plan: AwsPlan, result: LaunchResult) -> None:
    item = next(r for r in plan.requests if r["operation"] == "RunInstances")
    subnets = dict(plan.subnets)
    primary = plan.instance_types[0]
    failures: list[str] = []
    not_offered: list[str] = []
    for zone in item["zones"]:
        params = copy.deepcopy(item["params"])
        params["SubnetId"] = subnets[zone]
        params["ClientToken"] = client_token(plan.request.session_id, plan.request.attempt, zone)
        try:
            response = ctx.call("ec2", "run_instances", error_context={
                "instance_type": primary.name, "market": "on-demand", "zone": zone, "vcpus": primary.vcpus}, **params)
        except (CapacityUnavailableError, InstanceTypeNotOfferedError) as e:
            failures.append(zone)
            if isinstance(e, InstanceTypeNotOfferedError):
                not_offered.append(zone)
            result.notes.append(f"{zone}: {e.message}")
            continue
        except TrainctlError as e:
            _attach_cleanup_note(e, [], [])
            raise
        instance = response["Instances"][0]
        result.instance_ids = [instance["InstanceId"]]
        result.zone = instance.get("Placement", {}).get("AvailabilityZone", zone)
        if failures:
            result.notes.append(f"started in {result.zone} after no capacity in {', '.join(failures)}")
        return
    if failures and not_offered == failures:
        raise _attach_cleanup_note(InstanceTypeNotOfferedError(primary.name, ", ".join(failures)), [], [])
    raise _attach_cleanup_note(CapacityUnavailableError(primary.name, failures, "on-demand"), [], [])


def _launch_nodes(ctx: AwsContext, plan: AwsPlan, result: LaunchResult) -> None:
    """The placement group, the node security group and its rules, then the nodes one by one in
    one zone; a zone without capacity for all of them gives back what started there and the
    next zone is tried. A launch that fails leaves nothing behind (or says what it could not end)."""
    result.nodes = plan.nodes
    group = plan.request_params("CreatePlacementGroup")
    made: list[tuple[str, str]] = []
    try:
        _create_placement_group(ctx, group)
        made.append(("placement group", group["GroupName"]))
        result.placement_group = group["GroupName"]
        sg = _create_node_group(ctx, plan.request_params("CreateSecurityGroup"))
        made.append(("security group", sg))
        result.node_security_group_id = sg
        for item in plan.requests:
            if item["operation"].startswith("AuthorizeSecurityGroup"):
                params = _with_group(copy.deepcopy(item["params"]), sg)
                method = "authorize_security_group_" + ("egress" if item["operation"].endswith("Egress") else "ingress")
                try:
                    ctx.call("ec2", method, **params)
                except AwsRequestError as e:
                    if e.code != "InvalidPermission.Duplicate":  # a retried launch made it already
                        raise
        if plan.uses_fleet:
            _start_node_fleets(ctx, plan, result, sg, made)
        else:
            _start_nodes(ctx, plan, result, sg)
    except BaseException as e:
        cleaned: list[str] = []
        leftovers: list[str] = []
        for kind, rid in reversed(made):
            _cleanup(ctx, kind, rid, cleaned, leftovers)
        if isinstance(e, TrainctlError):
            _attach_cleanup_note(e, cleaned, leftovers)
        raise


def _with_group(value: Any, group_id: str) -> Any:
    """The planned request with the node security group's real id in place of NODE_GROUP."""
    if isinstance(value, dict):
        return {k: _with_group(v, group_id) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_group(v, group_id) for v in value]
    return group_id if value == NODE_GROUP else value


def _create_placement_group(ctx: AwsContext, params: dict[str, Any]) -> None:
    try:
        ctx.call("ec2", "create_placement_group", **params)
    except AwsRequestError as e:
        if e.code != "InvalidPlacementGroup.Duplicate":  # a retried launch of the same attempt
            raise


def _create_node_group(ctx: AwsContext, params: dict[str, Any]) -> str:
    try:
        return str(ctx.call("ec2", "create_security_group", **params)["GroupId"])
    except AwsRequestError as e:
        if e.code != "InvalidGroup.Duplicate":
            raise
    found = ctx.call("ec2", "describe_security_groups", Filters=[
        {"Name": "vpc-id", "Values": [params["VpcId"]]}, {"Name": "group-name", "Values": [params["GroupName"]]}])
    return str(found["SecurityGroups"][0]["GroupId"])


def _start_nodes(ctx: AwsContext, plan: AwsPlan, result: LaunchResult, group_id: str) -> None:
    items = sorted((r for r in plan.requests if r["operation"] == "RunInstances"), key=lambda r: r["node"])
    subnets = dict(plan.subnets)
    primary = plan.instance_types[0]
    failures: list[str] = []
    for zone in items[0]["zones"]:
        started: list[str] = []
        try:
            for item in items:
                params = _with_group(copy.deepcopy(item["params"]), group_id)
                params["Placement"]["AvailabilityZone"] = zone
                params["ClientToken"] = client_token(plan.request.session_id, plan.request.attempt, zone, item["node"])
                holder = params["NetworkInterfaces"][0] if "NetworkInterfaces" in params else params
                holder["SubnetId"] = subnets[zone]
                response = ctx.call("ec2", "run_instances", error_context={
                    "instance_type": primary.name, "market": "on-demand", "zone": zone, "vcpus": primary.vcpus},
                    **params)
                started.append(response["Instances"][0]["InstanceId"])
        except (CapacityUnavailableError, InstanceTypeNotOfferedError) as e:
            failures.append(zone)
            result.notes.append(f"{zone}: {e.message}" + (f" (after {len(started)} of {plan.nodes} nodes; "
                                                            "those were ended)" if started else ""))
            _end_started(ctx, started)
            continue
        except BaseException:
            _end_started(ctx, started)
            raise
        result.instance_ids, result.zone = started, zone
        if failures:
            result.notes.append(f"started in {zone} after no capacity for {plan.nodes} nodes in {', '.join(failures)}")
        return
    raise CapacityUnavailableError(primary.name, failures, "on-demand")


def _start_node_fleets(ctx: AwsContext, plan: AwsPlan, result: LaunchResult, group_id: str,
                       made: list[tuple[str, str]]) -> None:
    """Spot nodes: each node's launch template, then each node's fleet, zone by zone: a zone
    where a fleet starts no machine gives back the fleets made there and the next is tried."""
    sid, attempt = plan.request.session_id, plan.request.attempt
    for item in sorted((r for r in plan.requests if r["operation"] == "CreateLaunchTemplate"), key=lambda r: r["node"]):
        template_id = _create_launch_template(ctx, _with_group(copy.deepcopy(item["params"]), group_id), sid)
        made.append(("launch template", template_id))
        result.launch_template_ids.append(template_id)
    items = sorted((r for r in plan.requests if r["operation"] == "CreateFleet"), key=lambda r: r["node"])
    subnets = dict(plan.subnets)
    primary = plan.instance_types[0]
    failures: list[str] = []
    for zone in items[0]["zones"]:
        fleets: list[str] = []
        try:
            for item in items:
                params = copy.deepcopy(item["params"])
                for override in params["LaunchTemplateConfigs"][0]["Overrides"]:
                    if "SubnetId" in override:
                        override["SubnetId"] = subnets[zone]
                params["ClientToken"] = client_token(sid, attempt, "fleet", zone, item["node"])
                response = ctx.call("ec2", "create_fleet", error_context={
                    "instance_type": primary.name, "market": "spot", "zone": zone, "vcpus": primary.vcpus}, **params)
                fleets.append(response["FleetId"])
                errors = response.get("Errors") or []
                if errors and not response.get("Instances"):
                    first = errors[0]
                    code, message = first.get("ErrorCode", "Error"), first.get("ErrorMessage", "")
                    if "Capacity" in code or "Unsupported" in code:
                        raise CapacityUnavailableError(primary.name, [zone], "spot")
                    raise AwsRequestError("ec2:CreateFleet", code, message)
        except (CapacityUnavailableError, InstanceTypeNotOfferedError) as e:
            failures.append(zone)
            result.notes.append(f"{zone}: {e.message}" + (f" (after {len(fleets) - 1} of {plan.nodes} nodes; "
                                                            "their fleets were ended)" if len(fleets) > 1 else ""))
            _end_fleets(ctx, fleets)
            continue
        except BaseException:
            _end_fleets(ctx, fleets)
            raise
        made += [("fleet", f) for f in fleets]
        result.fleet_ids, result.zone = fleets, zone
        result.instance_ids = [next(iter(fleet_instance_ids(ctx, f)), "") for f in fleets]
        if failures:
            result.notes.append(f"started in {zone} after no spot capacity for {plan.nodes} nodes in "
                                f"{', '.join(failures)}")
        return
    raise CapacityUnavailableError(primary.name, failures, "spot")


def _end_fleets(ctx: AwsContext, fleet_ids: list[str]) -> None:
    if fleet_ids:
        ctx.call("ec2", "delete_fleets", FleetIds=fleet_ids, TerminateInstances=True)


def _end_started(ctx: AwsContext, instance_ids: list[str]) -> None:
    if instance_ids:
        ctx.call("ec2", "terminate_instances", InstanceIds=instance_ids)


def end_node_network(ctx: AwsContext, session_id: str, *, dry_run: bool = False,
                     report: EndReport | None = None) -> EndReport:
    """A multi-node session's security group and placement group, once no machine of the
    session is left in them; one still in use is left for the next call (nothing bills for either)."""
    report = report or EndReport(target=session_id, region=ctx.region, dry_run=dry_run)
    groups = ctx.call("ec2", "describe_security_groups", Filters=[
        {"Name": f"tag:{TAG_SESSION}", "Values": [session_id]}])["SecurityGroups"]
    for group in groups:
        gid = group["GroupId"]
        command = f"aws ec2 delete-security-group --region {ctx.region} --group-id {gid}"
        if dry_run:
            report.actions.append(Action("security group", gid, "would delete", command))
            continue
        try:
            ctx.call("ec2", "delete_security_group", GroupId=gid)
            report.actions.append(Action("security group", gid, "deleted", command))
        except AwsRequestError as e:
            if e.code == "InvalidGroup.NotFound":
                report.actions.append(Action("security group", gid, "already deleted", command))
            elif e.code == "DependencyViolation":
                report.actions.append(Action("security group", gid, "still in use by ending machines; "
                                             "run the same command again in a minute", command))
            else:
                raise
    try:
        placement = ctx.call("ec2", "describe_placement_groups", Filters=[
            {"Name": f"tag:{TAG_SESSION}", "Values": [session_id]}]).get("PlacementGroups", [])
    except AwsError as e:
        report.actions.append(Action("placement group", f"of session {session_id}",
                                     f"could not be looked up ({e.message}); nothing bills for it"))
        return report
    for pg in placement:
        name = pg["GroupName"]
        command = f"aws ec2 delete-placement-group --region {ctx.region} --group-name {name}"
        if pg.get("State") == "deleted":
            continue
        if dry_run:
            report.actions.append(Action("placement group", name, "would delete", command))
            continue
        try:
            ctx.call("ec2", "delete_placement_group", GroupName=name)
            report.actions.append(Action("placement group", name, "deleted", command))
        except AwsRequestError as e:
            if e.code == "InvalidPlacementGroup.Unknown":
                report.actions.append(Action("placement group", name, "already deleted", command))
            elif e.code == "InvalidPlacementGroup.InUse":
                report.actions.append(Action("placement group", name, "still in use by ending machines; "
                                             "run the same command again in a minute", command))
            else:
                raise
    return report


def _launch_fleet(ctx: AwsContext, plan: AwsPlan, result: LaunchResult) -> None:
    primary = plan.instance_types[0]
    template = plan.request_params("CreateLaunchTemplate")
    cleaned: list[str] = []
    leftovers: list[str] = []
    template_id: str | None = None
    fleet_id: str | None = None
    try:
        template_id = _create_launch_template(ctx, template, plan.request.session_id)
        result.launch_template_id, result.launch_template_name = template_id, template["LaunchTemplateName"]
        response = ctx.call("ec2", "create_fleet", error_context={
            "instance_type": primary.name, "market": "spot", "vcpus": primary.vcpus},
            **plan.request_params("CreateFleet"))
        fleet_id = response["FleetId"]
        result.fleet_id = fleet_id
        errors = response.get("Errors") or []
        if errors and not response.get("Instances"):
            first = errors[0]
            raise AwsRequestError("ec2:CreateFleet", first.get("ErrorCode", "Error"), first.get("ErrorMessage", ""))
    except BaseException as e:
        if fleet_id:
            _cleanup(ctx, "fleet", fleet_id, cleaned, leftovers)
        if template_id:
            _cleanup(ctx, "launch template", template_id, cleaned, leftovers)
        if isinstance(e, TrainctlError):
            _attach_cleanup_note(e, cleaned, leftovers)
        raise
    result.instance_ids = fleet_instance_ids(ctx, fleet_id)


def _create_launch_template(ctx: AwsContext, params: dict[str, Any], session_id: str) -> str:
    try:
        return ctx.call("ec2", "create_launch_template", **params)["LaunchTemplate"]["LaunchTemplateId"]
    except AwsRequestError as e:
        if e.code != "InvalidLaunchTemplateName.AlreadyExistsException":
            raise
    # A retried launch of the same session and attempt: reuse the template it made.
    found = ctx.call("ec2", "describe_launch_templates", LaunchTemplateNames=[params["LaunchTemplateName"]])
    existing = found["LaunchTemplates"][0]
    if tag_dict(existing.get("Tags")).get(TAG_SESSION) != session_id:
        raise UsageError(f"A launch template named {params['LaunchTemplateName']} exists and is not this session's.",
                         f"Delete it with: aws ec2 delete-launch-template --launch-template-id {existing['LaunchTemplateId']}")
    return existing["LaunchTemplateId"]


def _cleanup(ctx: AwsContext, kind: str, resource_id: str, cleaned: list[str], leftovers: list[str]) -> None:
    commands = {"fleet": f"aws ec2 delete-fleets --fleet-ids {resource_id} --terminate-instances",
                "launch template": f"aws ec2 delete-launch-template --launch-template-id {resource_id}",
                "placement group": f"aws ec2 delete-placement-group --group-name {resource_id}",
                "security group": f"aws ec2 delete-security-group --group-id {resource_id}"}
    try:
        if kind == "fleet":
            ctx.call("ec2", "delete_fleets", FleetIds=[resource_id], TerminateInstances=True)
        elif kind == "placement group":
            ctx.call("ec2", "delete_placement_group", GroupName=resource_id)
        elif kind == "security group":
            ctx.call("ec2", "delete_security_group", GroupId=resource_id)
        else:
            ctx.call("ec2", "delete_launch_template", LaunchTemplateId=resource_id)
        cleaned.append(f"{kind} {resource_id}")
    except AwsError as e:
        command = commands[kind]
        leftovers.append(f"{kind} {resource_id} ({e.message}); end it with: {command} --region {ctx.region}")


# ------------------------------------------------------------------------------ looking

def fleet_instance_ids(ctx: AwsContext, fleet_id: str) -> list[str]:
    response = ctx.call("ec2", "describe_fleet_instances", FleetId=fleet_id)
    return [i["InstanceId"] for i in response.get("ActiveInstances", [])]


def _live(ctx: AwsContext, instance_ids: list[str]) -> list[str]:
    if not instance_ids:
        return []
    reservations = ctx.call("ec2", "describe_instances", InstanceIds=instance_ids)["Reservations"]
    return [i["InstanceId"] for r in reservations for i in r["Instances"]
            if i["State"]["Name"] not in INSTANCE_GONE_STATES]


def describe_fleet(ctx: AwsContext, fleet_id: str) -> dict[str, Any] | None:
    try:
        fleets = ctx.call("ec2", "describe_fleets", FleetIds=[fleet_id])["Fleets"]
    except AwsRequestError as e:
        if e.code in ("InvalidFleetId.NotFound", "InvalidFleetId.Malformed"):
            return None
        raise
    return fleets[0] if fleets else None


def session_fleets(ctx: AwsContext, session_id: str | None = None) -> list[dict[str, Any]]:
    """trainctl's fleets (DescribeFleets has no tag filter: the tags are read here)."""
    fleets = ctx.paginate("ec2", "describe_fleets", "Fleets")
    out = []
    for fleet in fleets:
        tags = tag_dict(fleet.get("Tags"))
        if TAG_SESSION in tags and (session_id is None or tags[TAG_SESSION] == session_id):
            out.append(fleet)
    return out


def session_instances(ctx: AwsContext, session_id: str | None = None) -> list[dict[str, Any]]:
    value = [session_id] if session_id else ["*"]
    reservations = ctx.paginate("ec2", "describe_instances", "Reservations",
                                Filters=[{"Name": f"tag:{TAG_SESSION}", "Values": value}])
    return [i for r in reservations for i in r["Instances"]]


def session_launch_templates(ctx: AwsContext, session_id: str | None = None) -> list[dict[str, Any]]:
    value = [session_id] if session_id else ["*"]
    return list(ctx.paginate("ec2", "describe_launch_templates", "LaunchTemplates",
                             Filters=[{"Name": f"tag:{TAG_SESSION}", "Values": value}]))


# ------------------------------------------------------------------------------ ending

def end_fleet(ctx: AwsContext, fleet_id: str, *, terminate_instances: bool = False,
              dry_run: bool = False) -> EndReport:
    """Delete a fleet; by default its machine keeps running to power itself off after the final sync."""
    report = EndReport(target=fleet_id, region=ctx.region, dry_run=dry_run)
    _end_fleet(ctx, fleet_id, terminate_instances, dry_run, report)
    return report


def _end_fleet(ctx: AwsContext, fleet_id: str, terminate_instances: bool, dry_run: bool, report: EndReport) -> None:
    fleet = describe_fleet(ctx, fleet_id)
    command = (f"aws ec2 delete-fleets --region {ctx.region} --fleet-ids {fleet_id} "
               + ("--terminate-instances" if terminate_instances else "--no-terminate-instances"))
    if fleet is None:
        report.actions.append(Action("fleet", fleet_id, "not found (already gone)", command))
        return
    state = fleet.get("FleetState", "")
    if state in FLEET_GONE_STATES and not (terminate_instances and state == "deleted_running"):
        report.actions.append(Action("fleet", fleet_id, f"already deleted ({state})", command))
        return
    if terminate_instances and not _live(ctx, fleet_instance_ids(ctx, fleet_id)):
        terminate_instances = False  # nothing left to terminate (EC2 refuses an empty terminate)
    how = "its machines terminated" if terminate_instances else "its machine left to power itself off"
    if dry_run:
        report.actions.append(Action("fleet", fleet_id, f"would delete ({state}); {how}", command))
        return
    response = ctx.call("ec2", "delete_fleets", FleetIds=[fleet_id], TerminateInstances=terminate_instances)
    failed = response.get("UnsuccessfulFleetDeletions") or []
    if failed:
        error = failed[0].get("Error", {})
        raise AwsRequestError("ec2:DeleteFleets", error.get("Code", "Error"), error.get("Message", ""))
    report.actions.append(Action("fleet", fleet_id, f"deleted (was {state}); {how}", command))


def _end_instances(ctx: AwsContext, instances: list[dict[str, Any]], dry_run: bool, report: EndReport) -> None:
    live = [i for i in instances if i["State"]["Name"] not in INSTANCE_GONE_STATES]
    for instance in instances:
        if instance not in live:
            report.actions.append(Action("instance", instance["InstanceId"],
                                         f"already {instance['State']['Name']}"))
    if not live:
        return
    ids = [i["InstanceId"] for i in live]
    command = f"aws ec2 terminate-instances --region {ctx.region} --instance-ids {' '.join(ids)}"
    if dry_run:
        report.actions += [Action("instance", i["InstanceId"], f"would terminate ({i['State']['Name']})", command)
                           for i in live]
        return
    changes = ctx.call("ec2", "terminate_instances", InstanceIds=ids)["TerminatingInstances"]
    for change in changes:
        report.actions.append(Action("instance", change["InstanceId"],
                                     f"terminated (was {change['PreviousState']['Name']})", command))


def _end_launch_templates(ctx: AwsContext, templates: list[dict[str, Any]], dry_run: bool, report: EndReport) -> None:
    for template in templates:
        tid = template["LaunchTemplateId"]
        command = f"aws ec2 delete-launch-template --region {ctx.region} --launch-template-id {tid}"
        if dry_run:
            report.actions.append(Action("launch template", tid, "would delete", command))
            continue
        try:
            ctx.call("ec2", "delete_launch_template", LaunchTemplateId=tid)
            report.actions.append(Action("launch template", tid, "deleted", command))
        except AwsRequestError as e:
            if not e.code.startswith(("InvalidLaunchTemplateId", "InvalidLaunchTemplateName")):
                raise
            report.actions.append(Action("launch template", tid, "already deleted", command))


def _trainctl_instance(ctx: AwsContext, instance_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """The instance (None if gone) and its fleet; refuses a machine trainctl did not start."""
    try:
        reservations = ctx.call("ec2", "describe_instances", InstanceIds=[instance_id])["Reservations"]
    except AwsRequestError as e:
        if e.code.startswith("InvalidInstanceID"):
            return None, None
        raise
    instances = [i for r in reservations for i in r["Instances"]]
    if not instances:
        return None, None
    tags = tag_dict(instances[0].get("Tags"))
    if TAG_SESSION not in tags:
        raise UsageError(f"{instance_id} is not a trainctl machine (it has no {TAG_SESSION} tag).",
                         "trainctl only ends what it started; end it in the EC2 console or with: "
                         f"aws ec2 terminate-instances --instance-ids {instance_id} --region {ctx.region}")
    fleet_id = tags.get("aws:ec2:fleet-id")
    if fleet_id is None:
        fleet_id = next((f["FleetId"] for f in session_fleets(ctx, tags[TAG_SESSION])
                         if instance_id in fleet_instance_ids(ctx, f["FleetId"])), None)
    return instances[0], fleet_id


def terminate(ctx: AwsContext, target: str, *, dry_run: bool = False) -> EndReport:
    """End a session's machines now (``target`` = session id or instance id); safe to repeat.

    A fleet is deleted with its machines first, so AWS can't start a replacement; then any
    remaining machine is terminated and the session's launch templates are deleted.
    """
    report = EndReport(target=target, region=ctx.region, dry_run=dry_run)
    if target.startswith("i-"):
        instance, fleet_id = _trainctl_instance(ctx, target)
        if instance is None:
            report.actions.append(Action("instance", target, "not found (already gone)"))
            return report
        if fleet_id:  # a maintain fleet would replace the machine: end the fleet first
            _end_fleet(ctx, fleet_id, True, dry_run, report)
            if not dry_run:
                instance = _trainctl_instance(ctx, target)[0] or instance
        _end_instances(ctx, [instance], dry_run, report)
        return report
    for fleet in session_fleets(ctx, target):
        _end_fleet(ctx, fleet["FleetId"], True, dry_run, report)
    instances = session_instances(ctx, target)
    _end_instances(ctx, instances, dry_run, report)
    _end_launch_templates(ctx, session_launch_templates(ctx, target), dry_run, report)
    if any(TAG_NODE in tag_dict(i.get("Tags")) for i in instances):  # a multi-node session
        end_node_network(ctx, target, dry_run=dry_run, report=report)
    return report


def stop_session(ctx: AwsContext, target: str, *, workdir: str = "/opt/trainctl",
                 dry_run: bool = False) -> EndReport:
    """Stop like a preemption: no replacement, the agent checkpoints, syncs and powers off.

    The session's fleet is deleted without terminating (AWS must not replace the machine),
    then the agent gets SIGTERM through SSM Run Command. Returns at once; a caller that wants
    a grace period waits, then calls ``terminate`` if a machine still runs.
    """
    from .userdata import AGENT_PID_FILE

    report = EndReport(target=target, region=ctx.region, dry_run=dry_run)
    if target.startswith("i-"):
        instance, fleet_id = _trainctl_instance(ctx, target)
        fleets = [fleet_id] if fleet_id else []
        instances = ([target] if instance and instance["State"]["Name"] not in INSTANCE_GONE_STATES else [])
        if instance is None:
            report.actions.append(Action("instance", target, "not found (already gone)"))
    else:
        fleets = [f["FleetId"] for f in session_fleets(ctx, target)]
        instances = [i["InstanceId"] for i in session_instances(ctx, target)
                     if i["State"]["Name"] not in INSTANCE_GONE_STATES]
    for fleet_id in fleets:
        _end_fleet(ctx, fleet_id, False, dry_run, report)
    pid_file = f"{workdir}/{AGENT_PID_FILE}"
    script = f'kill -TERM "$(cat {pid_file})"'
    for iid in instances:
        command = (f"aws ssm send-command --region {ctx.region} --instance-ids {iid} "
                   f"--document-name AWS-RunShellScript --parameters 'commands=[\"{script}\"]'")
        if dry_run:
            report.actions.append(Action("instance", iid, "would ask the agent to stop", command))
            continue
        try:
            sent = ctx.call("ssm", "send_command", InstanceIds=[iid], DocumentName="AWS-RunShellScript",
                            Comment=f"trainctl stop {target}"[:100], TimeoutSeconds=60,
                            Parameters={"commands": [script]})
        except AwsError as e:
            report.actions.append(Action("instance", iid, f"could not reach its agent through SSM ({e.message}); "
                                         f"end it now with: trainctl aws terminate {iid}", command))
            continue
        report.actions.append(Action("instance", iid, "asked to stop: emergency checkpoint, final sync, then it "
                                     f"powers off (SSM command {sent['Command']['CommandId']})", command))
    return report
