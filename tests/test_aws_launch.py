"""Launch, look, cost and end against moto's server: what AWS would get, and would refuse."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from tests.aws_fixtures import Account, error_answer, quota_hook
from trainctl.cloud.aws.errors import CapacityUnavailableError, QuotaExceededError
from trainctl.cloud.aws.facts import gather_facts
from trainctl.cloud.aws.inventory import list_resources, session_status
from trainctl.cloud.aws.launch import end_fleet, launch, terminate
from trainctl.cloud.aws.names import USER_DATA_LIMIT_BYTES
from trainctl.cloud.aws.plan import LaunchRequest, plan_launch
from trainctl.errors import UsageError

NOW = datetime(2026, 11, 30, 7, 0, tzinfo=timezone.utc)
AGENT = ("/opt/pytorch/bin/python", "-m", "trainctl", "agent")


def request(session: str, **changes: Any) -> LaunchRequest:
    values: dict[str, Any] = {"session_id": session, "project": "demo", "instance_type": "g5.xlarge",
                              "max_hours": 6, "agent_command": AGENT,
                              "storage_uri": f"s3://demo-bucket-us-east-1/trainctl/demo/{session}/"}
    values.update(changes)
    return LaunchRequest(**values)


def start(ctx: Any, req: LaunchRequest) -> Any:
    plan = plan_launch(req, gather_facts(ctx, req, now=datetime.now(timezone.utc).replace(microsecond=0)))
    return plan, launch(ctx, plan)


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def assert_session_tags(resource: dict[str, Any], session: str) -> None:
    tags = tags_of(resource)
    assert tags["trainctl:session"] == session and tags["trainctl:project"] == "demo", tags
    assert tags["trainctl:managed"] == "true" and tags["Name"] == f"trainctl {session}"


def test_facts_come_from_the_account(account: Account, sid: str):
    facts = gather_facts(account.context(), request(sid), now=NOW)
    g5 = facts.instance_types[0]
    assert (g5.gpu_count, g5.gpu_model, g5.vcpus, g5.memory_mib) == (1, "A10G", 4, 16384)
    assert facts.price.usd_per_hour == 1.006 and facts.price.source == "AWS Price List API"
    assert facts.price.as_of == "2026-11-01"
    assert (facts.quota.code, facts.quota.value_vcpus, facts.quota.source) == ("L-DB2E81BA", 64.0, "applied")
    # auto: the highest PyTorch version wins; among equals, the newest Ubuntu
    assert facts.ami.image_id == account.seeded["oss-nvidia-driver-gpu-pytorch-2.10-ubuntu-24.04"]
    assert "newest of 4 PyTorch DLAMIs" in facts.ami.source and "2.10-ubuntu-24.04" in facts.ami.source
    assert facts.network.security_group_id and len(facts.network.subnets) >= 3
    assert facts.instance_profile_arn.endswith(":instance-profile/trainctl-demo-machine")
    assert facts.missing_permissions == ()


def test_spot_facts_use_the_spot_quota_and_price_history(account: Account, sid: str):
    facts = gather_facts(account.context(), request(sid, market="spot"), now=NOW)
    assert facts.quota.code == "L-3819A6DF"
    assert facts.price.market == "spot" and facts.price.usd_per_hour == 0.4123
    assert facts.price.zone == "us-east-1a" and facts.price.as_of == "2026-11-30T06:00:00Z"
    assert facts.on_demand_price.usd_per_hour == 1.006


def test_quota_without_an_applied_value_falls_back_to_the_default(account: Account, sid: str):
    ctx = account.context({"before-call.service-quotas.GetServiceQuota": quota_hook({}),
                           "before-call.service-quotas.GetAWSDefaultServiceQuota": quota_hook({"L-DB2E81BA": 0})})
    facts = gather_facts(ctx, request(sid), now=NOW)
    assert (facts.quota.value_vcpus, facts.quota.source) == (0.0, "default")
    plan = plan_launch(request(sid), facts)
    with pytest.raises(QuotaExceededError, match="new accounts often start at 0"):
        launch(ctx, plan)
    assert account.instances(sid) == []


def test_pricing_that_fails_is_unknown_not_invented(account: Account, sid: str):
    ctx = account.context({"before-call.pricing.GetProducts": lambda **_: error_answer(
        "AccessDeniedException", "User is not authorized to perform: pricing:GetProducts")})
    facts = gather_facts(ctx, request(sid), now=NOW)
    assert facts.price.usd_per_hour is None
    assert "pricing:GetProducts" in facts.price.source
    assert "unknown" in plan_launch(request(sid), facts).render_text()


def test_on_demand_launch_starts_the_machine_aws_would_accept(account: Account, sid: str):
    plan, result = start(account.context(), request(sid))
    (iid,) = result.instance_ids
    assert result.mechanism == "run-instances" and result.zone == "us-east-1a" and result.usd_per_hour == 1.006
    ec2 = account.moto.client("ec2")
    (instance,) = account.instances(sid)
    assert instance["InstanceId"] == iid
    assert instance["State"]["Name"] == "running" and instance["InstanceType"] == "g5.xlarge"
    assert instance["ImageId"] == plan.ami.image_id
    assert_session_tags(instance, sid)
    assert instance["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
    assert instance["IamInstanceProfile"]["Arn"].endswith("instance-profile/trainctl-demo-machine")
    assert [g["GroupName"] for g in instance["SecurityGroups"]] == ["trainctl-demo"]
    behaviour = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    user_data = base64.b64decode(ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")["UserData"]["Value"])
    assert user_data.decode() == plan.boot_script and len(user_data) <= USER_DATA_LIMIT_BYTES
    assert "agent" in user_data.decode() and "testing" not in user_data.decode()  # no credentials in it
    (mapping,) = [m for m in instance["BlockDeviceMappings"] if m["DeviceName"] == plan.ami.root_device_name]
    assert mapping["Ebs"]["DeleteOnTermination"] is True  # the disk goes with the machine
    (root,) = ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"]
    assert root["Size"] == 100
    assert_session_tags(root, sid)


def test_on_demand_launch_tries_the_next_zone_when_one_has_no_capacity(account: Account, sid: str):
    subnets = {s["AvailabilityZone"]: s["SubnetId"] for s in account.moto.client("ec2").describe_subnets()["Subnets"]}
    refused: list[str] = []

    def no_capacity_in_1a(params: dict[str, Any], **_: Any) -> Any:
        if params["body"].get("SubnetId") == subnets["us-east-1a"] and not params["body"].get("DryRun"):
            refused.append("us-east-1a")
            return error_answer("InsufficientInstanceCapacity", "We currently do not have sufficient g5.xlarge "
                                "capacity in the Availability Zone you requested (us-east-1a).", 500)
        return None

    _, result = start(account.context({"before-call.ec2.RunInstances": no_capacity_in_1a}), request(sid))
    assert refused == ["us-east-1a"] and result.zone == "us-east-1b"
    assert any("after no capacity in us-east-1a" in note for note in result.notes)


def test_no_capacity_in_any_zone_fails_with_the_zones_and_leaves_nothing(account: Account, sid: str):
    ctx = account.context({"before-call.ec2.RunInstances": lambda params, **_: None if params["body"].get("DryRun")
                           else error_answer("InsufficientInstanceCapacity", "no capacity", 500)})
    plan = plan_launch(request(sid), gather_facts(ctx, request(sid), now=NOW))
    with pytest.raises(CapacityUnavailableError) as caught:
        launch(ctx, plan)
    assert caught.value.zones == plan.zones and len(plan.zones) >= 2
    assert str(caught.value).startswith("AWS has no on-demand capacity for g5.xlarge in us-east-1a, ")
    assert "Nothing was created" in caught.value.hint and "--spot" in caught.value.hint
    assert account.instances(sid) == []


def test_spot_launch_makes_a_maintain_fleet_from_a_tagged_template(account: Account, sid: str):
    plan, result = start(account.context(), request(sid, market="spot"))
    assert result.mechanism == "ec2-fleet-maintain" and result.fleet_id and result.launch_template_id
    ec2 = account.moto.client("ec2")
    (fleet,) = ec2.describe_fleets(FleetIds=[result.fleet_id])["Fleets"]
    assert fleet["Type"] == "maintain" and fleet["TerminateInstancesWithExpiration"] is True
    assert fleet["ValidUntil"] == plan.deadline == datetime.fromisoformat(result.deadline.replace("Z", "+00:00"))
    assert fleet["TargetCapacitySpecification"]["DefaultTargetCapacityType"] == "spot"
    assert fleet["SpotOptions"]["AllocationStrategy"] == "price-capacity-optimized"
    assert_session_tags(fleet, sid)
    # moto doesn't apply a template's metadata options or shutdown behaviour to fleet machines:
    # check the template itself, which is what AWS applies.
    (template,) = account.templates(sid)
    assert template["LaunchTemplateId"] == result.launch_template_id
    assert_session_tags(template, sid)
    data = ec2.describe_launch_template_versions(LaunchTemplateId=result.launch_template_id)[
        "LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert data["ImageId"] == plan.ami.image_id  # resolved id: replacements boot the same image
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["IamInstanceProfile"]["Arn"].endswith("instance-profile/trainctl-demo-machine")
    assert data["BlockDeviceMappings"][0]["Ebs"]["DeleteOnTermination"] is True
    assert {s["ResourceType"] for s in data["TagSpecifications"]} >= {"instance", "volume", "network-interface"}
    assert base64.b64decode(data["UserData"]).decode() == plan.boot_script
    assert "InstanceMarketOptions" not in data
    (instance,) = account.instances(sid)
    assert instance["InstanceId"] == result.instance_ids[0] and instance["InstanceLifecycle"] == "spot"
    assert_session_tags(instance, sid)


def test_a_fleet_that_fails_removes_its_launch_template_and_says_so(account: Account, sid: str):
    ctx = account.context({"before-call.ec2.CreateFleet": lambda **_: error_answer(
        "MaxSpotInstanceCountExceeded", "Max spot instance count exceeded")})
    plan = plan_launch(request(sid, market="spot"), gather_facts(ctx, request(sid, market="spot"), now=NOW))
    with pytest.raises(QuotaExceededError) as caught:
        launch(ctx, plan)
    assert "L-3819A6DF" in caught.value.hint and "All G and VT Spot Instance Requests" in str(caught.value)
    assert "Cleaned up what the launch had made: launch template lt-" in caught.value.hint
    assert account.templates(sid) == [] and account.instances(sid) == []


def test_a_retried_launch_reuses_its_own_template(account: Account, sid: str):
    ctx = account.context()
    plan = plan_launch(request(sid, market="spot"), gather_facts(ctx, request(sid, market="spot"), now=NOW))
    first = launch(ctx, plan)
    end_fleet(ctx, first.fleet_id, terminate_instances=True)
    again = launch(ctx, plan)
    assert again.launch_template_id == first.launch_template_id
    assert len(account.templates(sid)) == 1


def test_end_fleet_keeps_the_machine_for_its_own_power_off_and_is_idempotent(account: Account, sid: str):
    ctx = account.context()
    _, result = start(ctx, request(sid, market="spot"))
    report = end_fleet(ctx, result.fleet_id)
    assert [a.result for a in report.actions] == ["deleted (was active); its machine left to power itself off"]
    ec2 = account.moto.client("ec2")
    assert ec2.describe_fleets(FleetIds=[result.fleet_id])["Fleets"][0]["FleetState"] == "deleted_running"
    assert [i["State"]["Name"] for i in account.instances(sid)] == ["running"]
    again = end_fleet(ctx, result.fleet_id)
    assert [a.result for a in again.actions] == ["already deleted (deleted_running)"] and again.changed == []


def test_terminate_a_session_ends_fleet_machines_and_templates_then_nothing(account: Account, sid: str):
    ctx = account.context()
    _, result = start(ctx, request(sid, market="spot"))
    dry = terminate(ctx, sid, dry_run=True)
    assert {a.kind for a in dry.actions} == {"fleet", "instance", "launch template"}
    assert all(a.result.startswith("would") for a in dry.actions) and all(a.command for a in dry.actions)
    assert [i["State"]["Name"] for i in account.instances(sid)] == ["running"]  # a dry run ends nothing
    report = terminate(ctx, sid)
    assert report.actions[0].describe() == f"fleet {result.fleet_id}: deleted (was active); its machines terminated"
    assert any(a.kind == "launch template" and a.result == "deleted" for a in report.actions)
    assert {i["State"]["Name"] for i in account.instances(sid)} == {"terminated"}
    again = terminate(ctx, sid)
    assert again.changed == [] and {a.result.split(" ")[0] for a in again.actions} == {"already"}
    assert terminate(ctx, "s-unknown").render_text() == "Nothing to end for s-unknown in us-east-1.\n"


def test_terminate_an_instance_by_id_is_idempotent_and_refuses_strangers(account: Account, sid: str):
    ctx = account.context()
    _, result = start(ctx, request(sid))
    (iid,) = result.instance_ids
    assert terminate(ctx, iid).actions[0].result == "terminated (was running)"
    assert terminate(ctx, iid).actions[0].result == "already terminated"
    ec2 = account.moto.client("ec2")
    image = next(iter(account.seeded.values()))
    stranger = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    with pytest.raises(UsageError, match="is not a trainctl machine"):
        terminate(ctx, stranger)
    assert terminate(ctx, "i-0123456789abcdef0").actions[0].result == "not found (already gone)"


def test_list_flags_leaks_with_the_command_that_ends_them(account: Account, sid: str):
    ctx = account.context()
    live, done, stranger, left = (f"{sid}-live", f"{sid}-done", f"{sid}-stranger", f"{sid}-left")
    start(ctx, request(live))
    start(ctx, request(done))
    start(ctx, request(stranger, market="spot"))
    _, finished = start(ctx, request(left, market="spot"))
    end_fleet(ctx, finished.fleet_id)  # deleted without terminating: its machine still runs
    ec2, s3 = account.moto.client("ec2"), account.moto.client("s3")
    volume = ec2.create_volume(Size=50, AvailabilityZone="us-east-1a", TagSpecifications=[{
        "ResourceType": "volume", "Tags": [{"Key": "trainctl:session", "Value": done}]}])["VolumeId"]
    key = f"trainctl/demo/{done}/checkpoints/last.pt"
    upload = s3.create_multipart_upload(Bucket="demo-bucket-us-east-1", Key=key)["UploadId"]
    statuses = {live: "running", done: "completed", left: "completed"}
    inventory = list_resources(ctx, session_status=lambda s: statuses.get(s) if s.startswith(sid) else "running",
                               bucket="demo-bucket-us-east-1", prefix="trainctl")

    mine = [m for m in inventory.machines if (m.session_id or "").startswith(sid)]
    assert {m.session_id for m in mine} == {live, done, stranger, left}
    machine = next(m for m in mine if m.session_id == live)
    assert machine.leak is None and machine.market == "on-demand" and machine.usd_per_hour == 1.006
    assert machine.cost_usd is not None and machine.cost_usd >= 1.006 / 60  # at least the one-minute minimum
    leaks = {(leak.kind, leak.session_id): leak for leak in inventory.leaks if (leak.session_id or "").startswith(sid)}
    assert "has ended (completed)" in leaks[("instance", done)].reason
    assert leaks[("instance", done)].end_command == f"trainctl aws terminate {done} --region us-east-1"
    assert "unknown here" in leaks[("instance", stranger)].reason
    assert "keeps replacing its machine" in leaks[("fleet", stranger)].reason
    assert "deleted without terminating" in leaks[("fleet", left)].reason
    assert leaks[("volume", done)].end_command == f"aws ec2 delete-volume --volume-id {volume} --region us-east-1"
    assert ("launch template", left) in leaks and ("launch template", stranger) not in leaks
    assert leaks[("multipart upload", done)].end_command == (
        f"aws s3api abort-multipart-upload --bucket demo-bucket-us-east-1 --key {key} --upload-id {upload}")
    assert ("instance", live) not in leaks
    text = inventory.render_text()
    assert "Possible leaks" in text and "COST SO FAR" in text
    assert inventory.to_dict()["leaks"][0]["end_command"]


def test_cost_sums_every_machine_of_a_session_spot_and_on_demand(account: Account, sid: str):
    ctx = account.context()
    _, first = start(ctx, request(sid, market="spot"))
    ec2 = account.moto.client("ec2")
    # The test plays AWS: it reclaims the spot machine, and the run continues on on-demand.
    ec2.terminate_instances(InstanceIds=first.instance_ids)
    _, second = start(ctx, request(sid, attempt=1))
    machines = {i["InstanceId"]: i for i in account.instances(sid)}
    now = machines[second.instance_ids[0]]["LaunchTime"] + timedelta(hours=2)
    status = session_status(ctx, sid, now=now, recorded_prices={first.instance_ids[0]: 0.40,
                                                                second.instance_ids[0]: 1.006})
    assert status.state == "running" and [m.market for m in status.machines] == ["spot", "on-demand"]
    spot_s = status.cost.machines[0][1]
    assert spot_s < 60  # reclaimed within the minute: billed the one-minute minimum
    expected = 0.40 * 60 / 3600 + 1.006 * 2
    assert status.cost.total_usd == pytest.approx(expected)
    assert status.cost.describe() == f"~${expected:.2f} (2 machines; 2.00 machine-hours; spot: estimate)"
    terminate(ctx, sid)
    assert session_status(ctx, sid, now=now).state == "ended"


def test_a_replacement_belongs_to_the_session_and_the_expiry_leaves_nothing(account: Account, sid: str):
    from moto.ec2.models import ec2_backends

    from tests.aws_fixtures import ACCOUNT, REGION

    ctx = account.context()
    _, result = start(ctx, request(sid, market="spot"))
    ec2 = account.moto.client("ec2")
    # The test plays AWS (moto never replaces): the spot machine is reclaimed and the maintain
    # fleet starts a replacement from the session's launch template.
    ec2.terminate_instances(InstanceIds=result.instance_ids)
    replacement = ec2.run_instances(MinCount=1, MaxCount=1, InstanceMarketOptions={"MarketType": "spot"},
                                    LaunchTemplate={"LaunchTemplateId": result.launch_template_id, "Version": "1"},
                                    )["Instances"][0]
    assert_session_tags(replacement, sid)  # tagged by the template: the fleet can't tag it itself
    status = session_status(ctx, sid)
    assert status.state == "running" and len(status.machines) == 2
    assert [m.state for m in status.machines] == ["terminated", "running"]
    # ValidUntil passes: AWS deletes the fleet and terminates what it ran.
    ec2_backends[ACCOUNT][REGION].fleets[result.fleet_id].state = "deleted"
    ec2.terminate_instances(InstanceIds=[replacement["InstanceId"]])
    inventory = list_resources(ctx, session_status={sid: "running"}.get)
    assert [leak for leak in inventory.leaks if leak.session_id == sid] == []
    assert session_status(ctx, sid).state == "ended"
