"""The AWS launch plan is pure: facts in, exact EC2 requests and a refusal reason out."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.aws_fixtures import golden
from trainctl.cloud.aws.errors import (
    AccessDeniedError,
    BudgetExceededError,
    LaunchRefusedError,
    QuotaExceededError,
    SetupMissingError,
)
from trainctl.cloud.aws.facts import (
    AmiFact,
    Facts,
    InstanceTypeInfo,
    NetworkFact,
    PriceFact,
    QuotaFact,
)
from trainctl.cloud.aws.plan import LaunchRequest, plan_launch
from trainctl.cloud.aws.userdata import BootSpec, render_boot_script
from trainctl.errors import UsageError

GOLDEN = Path(__file__).parent / "fixtures" / "aws"
NOW = datetime(2026, 11, 30, 7, 0, 0, tzinfo=timezone.utc)
G5 = InstanceTypeInfo("g5.xlarge", 4, 16384, "A10G", "NVIDIA", 1, 22888, ("x86_64",))
G5_2X = InstanceTypeInfo("g5.2xlarge", 8, 32768, "A10G", "NVIDIA", 1, 22888, ("x86_64",))
G6 = InstanceTypeInfo("g6.xlarge", 4, 16384, "L4", "NVIDIA", 1, 22888, ("x86_64",))
AGENT = ("/opt/pytorch/bin/python", "-m", "trainctl", "agent", "--session", "20261130-070000-ab12")


def facts(**changes) -> Facts:
    base = Facts(
        region="us-east-1", now=NOW, instance_types=(G5,),
        offered_zones={"g5.xlarge": ("us-east-1a", "us-east-1b", "us-east-1e"),
                       "g5.2xlarge": ("us-east-1a", "us-east-1b")},
        price=PriceFact(1.006, "on-demand", "AWS Price List API", "2026-11-01"),
        on_demand_price=None,
        quota=QuotaFact("on-demand", "L-DB2E81BA", "Running On-Demand G and VT instances", 64.0, "applied"),
        ami=AmiFact("ami-0123456789abcdef0", "Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.10 (Ubuntu 24.04) 20261101",
                    "x86_64", "/dev/sda1",
                    "auto: newest of 4 PyTorch DLAMIs (/aws/service/deeplearning/ami/x86_64/"
                    "oss-nvidia-driver-gpu-pytorch-2.10-ubuntu-24.04/latest/ami-id)"),
        network=NetworkFact("vpc-0a1", (("us-east-1a", "subnet-0a"), ("us-east-1b", "subnet-0b"),
                                        ("us-east-1c", "subnet-0c")), "sg-0trainctl"),
        instance_profile_arn="arn:aws:iam::123456789012:instance-profile/trainctl-demo-machine",
        account_id="123456789012")
    return replace(base, **changes)


def request(**changes) -> LaunchRequest:
    base = LaunchRequest(session_id="20261130-070000-ab12", project="demo", instance_type="g5.xlarge",
                         max_hours=12, budget_usd=50.0, storage_uri="s3://demo-bucket/trainctl/demo/20261130-070000-ab12/",
                         agent_command=AGENT, secrets=("WANDB_API_KEY",))
    return replace(base, **changes)


def spot_facts() -> Facts:
    return facts(instance_types=(G5, G5_2X),
                 price=PriceFact(0.5002, "spot", "EC2 spot price history", "2026-11-30T06:00:00Z", "us-east-1a",
                                 (("g5.2xlarge", "us-east-1a", 0.5002), ("g5.xlarge", "us-east-1a", 0.4123),
                                  ("g5.xlarge", "us-east-1b", 0.3911))),
                 on_demand_price=PriceFact(1.006, "on-demand", "AWS Price List API", "2026-11-01"),
                 quota=QuotaFact("spot", "L-3819A6DF", "All G and VT Spot Instance Requests", 8.0, "applied"))


def test_dry_run_plan_of_a_spot_fleet_matches_the_golden_files():
    plan = plan_launch(request(market="spot", also_instance_types=("g5.2xlarge",),
                               display=(("code", "42 files, 1.3 MB (largest: train.py 12 kB)"),
                                        ("resume", "none: a new run"))), spot_facts())
    assert plan.ok, plan.problems
    golden(GOLDEN / "plan_spot.txt", plan.render_text())
    golden(GOLDEN / "plan_spot.json", plan.to_json() + "\n")


def test_plan_is_pure_and_repeatable():
    a = plan_launch(request(), facts())
    b = plan_launch(request(), facts())
    assert a.to_dict() == b.to_dict()
    assert json.loads(a.to_json())["requests"] == a.redacted_requests()


def test_on_demand_plan_holds_the_exact_run_instances_request():
    plan = plan_launch(request(), facts())
    (item,) = plan.requests
    assert item["operation"] == "RunInstances"
    assert item["zones"] == ["us-east-1a", "us-east-1b"]  # 1e offers the type but has no default subnet
    params = item["params"]
    tags = [{"Key": "trainctl:managed", "Value": "true"}, {"Key": "trainctl:project", "Value": "demo"},
            {"Key": "trainctl:session", "Value": "20261130-070000-ab12"},
            {"Key": "trainctl:attempt", "Value": "0"}, {"Key": "Name", "Value": "trainctl 20261130-070000-ab12"}]
    assert params == {
        "ImageId": "ami-0123456789abcdef0", "InstanceType": "g5.xlarge", "MinCount": 1, "MaxCount": 1,
        "SubnetId": "subnet-0a", "SecurityGroupIds": ["sg-0trainctl"],
        "IamInstanceProfile": {"Arn": "arn:aws:iam::123456789012:instance-profile/trainctl-demo-machine"},
        "UserData": plan.boot_script,  # boto3 encodes RunInstances user data itself
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2,
                            "InstanceMetadataTags": "enabled"},
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 100, "VolumeType": "gp3",
                                                                   "DeleteOnTermination": True, "Encrypted": True}}],
        "TagSpecifications": [{"ResourceType": r, "Tags": tags} for r in ("instance", "volume", "network-interface")],
        "ClientToken": "20261130-070000-ab12-0-us-east-1a",
    }
    assert plan.projected_cost_usd == pytest.approx(1.006 * 12)
    assert plan.deadline == NOW + timedelta(hours=12)


def test_spot_plan_uses_a_maintain_fleet_that_aws_ends_at_the_deadline():
    plan = plan_launch(request(market="spot", also_instance_types=("g5.2xlarge",)), spot_facts())
    assert [r["operation"] for r in plan.requests] == ["CreateLaunchTemplate", "CreateFleet"]
    fleet = plan.request_params("CreateFleet")
    assert fleet["Type"] == "maintain"
    assert fleet["SpotOptions"]["AllocationStrategy"] == "price-capacity-optimized"
    assert fleet["ValidUntil"] == "2026-11-30T19:00:00Z" and fleet["TerminateInstancesWithExpiration"] is True
    assert fleet["TargetCapacitySpecification"]["DefaultTargetCapacityType"] == "spot"
    overrides = fleet["LaunchTemplateConfigs"][0]["Overrides"]
    assert {(o["InstanceType"], o["SubnetId"]) for o in overrides} == {
        ("g5.xlarge", "subnet-0a"), ("g5.xlarge", "subnet-0b"), ("g5.2xlarge", "subnet-0a"), ("g5.2xlarge", "subnet-0b")}
    template = plan.request_params("CreateLaunchTemplate")["LaunchTemplateData"]
    assert base64.b64decode(template["UserData"]).decode() == plan.boot_script  # templates take base64
    assert "InstanceMarketOptions" not in template  # the fleet sets the market; a template with one is refused
    # A maintain fleet can't tag its instances: the template must.
    assert {t["ResourceType"] for t in template["TagSpecifications"]} >= {"instance", "volume"}
    # Budgeted with the highest price among the fleet's types and zones.
    assert plan.price.usd_per_hour == 0.5002 and plan.projected_cost_usd == pytest.approx(0.5002 * 12)


def test_user_data_is_redacted_for_display_and_holds_no_secret_values():
    plan = plan_launch(request(env={"WANDB_PROJECT": "demo"}), facts())
    shown = json.dumps(plan.redacted_requests())
    assert "#!/bin/bash" not in shown and "the boot script below" in shown
    assert "WANDB_API_KEY" in plan.boot_script  # the name, so the agent reads it from SSM ...
    assert "TRAINCTL_SSM_PATH=/trainctl/demo/" in plan.boot_script  # ... under the project's path
    with pytest.raises(UsageError, match="HF_TOKEN looks like a secret"):
        plan_launch(request(env={"HF_TOKEN": "hf_abc"}), facts())


@pytest.mark.parametrize(("req", "fact", "error", "message"), [
    ({"max_hours": 60}, {}, BudgetExceededError, r"Projected cost \$60.36 \(60 h x \$1.0060/h\) exceeds the budget of \$50.00"),
    ({}, {"quota": QuotaFact("on-demand", "L-DB2E81BA", "Running On-Demand G and VT instances", 0.0, "applied")},
     QuotaExceededError, r"quota 'Running On-Demand G and VT instances' \(L-DB2E81BA\) is 0 vCPUs \(new accounts often start at 0\); g5.xlarge needs 4"),
    ({"market": "spot"}, {"quota": QuotaFact("spot", "L-3819A6DF", "All G and VT Spot Instance Requests", 2.0, "applied")},
     QuotaExceededError, r"spot quota 'All G and VT Spot Instance Requests' \(L-3819A6DF\) is 2 vCPUs"),
    ({}, {"network": NetworkFact("vpc-0a1", (("us-east-1a", "subnet-0a"),), None)}, SetupMissingError,
     "security group for project 'demo' is missing"),
    ({}, {"instance_profile_arn": None}, SetupMissingError, "instance profile trainctl-demo-machine is missing"),
    ({}, {"missing_permissions": ("iam:PassRole",)}, AccessDeniedError, "lacks iam:PassRole"),
    ({"prepare": ("echo " + "x" * 17000,)}, {}, LaunchRefusedError, "EC2 takes at most 16384 bytes of user data"),
    ({"market": "spot", "also_instance_types": ("g5.2xlarge",)},
     {"instance_types": (G5, G5_2X), "quota": QuotaFact("spot", "L-3819A6DF", "All G and VT Spot Instance Requests", 4.0, "applied")},
     QuotaExceededError, r"is 4 vCPUs; g5.2xlarge needs 8"),
    ({"market": "spot", "also_instance_types": ("g6.xlarge",)}, {"instance_types": (G5, G6)}, LaunchRefusedError,
     "a replacement must have the same GPUs"),
    ({}, {"ami": AmiFact("ami-arm", "arm image", "arm64", "/dev/sda1", "given")}, LaunchRefusedError,
     "AMI ami-arm is arm64"),
])
def test_plan_refuses_what_aws_or_the_budget_would(req, fact, error, message):
    plan = plan_launch(request(**req), facts(**fact))
    assert not plan.ok
    with pytest.raises(error, match=message) as caught:
        plan.check()
    assert caught.value.hint and "\n" not in caught.value.message
    assert "REFUSED" in plan.render_text()


def test_quota_refusal_names_the_quota_and_how_to_raise_it():
    plan = plan_launch(request(market="spot"), facts(quota=QuotaFact(
        "spot", "L-3819A6DF", "All G and VT Spot Instance Requests", 0.0, "applied")))
    with pytest.raises(QuotaExceededError) as caught:
        plan.check()
    assert ("aws service-quotas request-service-quota-increase --region us-east-1 --service-code ec2 "
            "--quota-code L-3819A6DF --desired-value 4") in caught.value.hint


def test_unknown_price_and_quota_are_said_never_made_up():
    plan = plan_launch(request(), facts(
        price=PriceFact.unknown("on-demand", "Price List API failed (Access denied)"),
        quota=QuotaFact("on-demand", "L-DB2E81BA", "Running On-Demand G and VT instances", None,
                        "unknown: servicequotas:GetServiceQuota denied")))
    assert plan.ok  # unknown is not a refusal; the deadline still caps the spend
    assert plan.projected_cost_usd is None
    text = plan.render_text()
    assert "unknown for 12 h (price unknown)" in text
    assert "budget ($50.00) can't be checked" in text
    assert "servicequotas:GetServiceQuota denied" in text
    assert "$" not in text.split("projected", 1)[1].split("\n", 1)[0].replace("$50.00", "")


@pytest.mark.parametrize(("changes", "message"), [
    ({"market": "reserved"}, "Unknown market 'reserved'"),
    ({"max_hours": 0}, "--max-hours must be positive"),
    ({"disk_gb": 4}, "--disk-gb must be at least 8"),
    ({"ami": "ubuntu"}, "--ami takes 'auto' or an AMI id"),
    ({"also_instance_types": ("g5.2xlarge",)}, "apply to spot fleets only"),
    ({"agent_command": ()}, "needs the agent's command"),
])
def test_bad_requests_are_refused_with_one_line(changes, message):
    with pytest.raises(UsageError, match=message):
        plan_launch(request(**changes), facts())


# ----------------------------------------------------------------------------- boot script

def boot_spec(tmp_path: Path, deadline: datetime, agent: tuple[str, ...], prepare: tuple[str, ...] = ()) -> BootSpec:
    return BootSpec(session_id="s1", deadline=deadline, agent_command=agent, env={"TRAINCTL_PROJECT": "demo"},
                    prepare=prepare, workdir=str(tmp_path / "work"), log_path=str(tmp_path / "boot.log"))


def test_boot_script_matches_the_golden_file():
    script = render_boot_script(BootSpec(session_id="20261130-070000-ab12", deadline=NOW + timedelta(hours=12),
                                         agent_command=AGENT, env={"TRAINCTL_STORAGE_URI": "s3://b/p/"},
                                         prepare=("/opt/pytorch/bin/python -m pip install /opt/trainctl/wheel/*.whl",)))
    golden(GOLDEN / "boot_script.sh", script)
    assert len(script.encode()) < 16 * 1024


def run_boot_script(tmp_path: Path, spec: BootSpec) -> tuple[list[str], str]:
    """Run the script with the OS's power commands replaced by recorders; return (calls, log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    for name in ("systemctl", "shutdown", "systemd-run"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {shlex.quote(str(calls))}\n')
        tool.chmod(0o755)
    script = tmp_path / "boot.sh"
    script.write_text(render_boot_script(spec).replace("/bin/systemctl", "systemctl"))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    subprocess.run(["bash", str(script)], env=env, timeout=60, check=True)
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return recorded, (tmp_path / "boot.log").read_text()


@pytest.mark.parametrize(("exit_code", "powers_off", "said"), [
    (0, True, "the agent finished"),
    (3, True, "the agent failed (exit 3)"),
    (75, False, "preempted: the platform reclaims this machine"),
])
def test_boot_script_powers_off_unless_preempted(tmp_path, exit_code, powers_off, said):
    deadline = datetime.now(timezone.utc) + timedelta(hours=2)
    agent = ("bash", "-c", f'echo "agent sees $TRAINCTL_SESSION_ID $TRAINCTL_PROJECT in $PWD"; echo $$ > me; exit {exit_code}')
    calls, log = run_boot_script(tmp_path, boot_spec(tmp_path, deadline, agent))
    assert f"agent sees s1 demo in {tmp_path / 'work'}" in log
    # the pid a stop request signals is the agent's own
    assert (tmp_path / "work" / "agent.pid").read_text() == (tmp_path / "work" / "me").read_text()
    assert said in log
    assert ("systemctl poweroff" in calls) is powers_off
    # The deadline is scheduled at the OS level whatever happens next, as an absolute time.
    assert any(c.startswith("systemd-run --unit=trainctl-deadline --on-calendar="
                            + deadline.strftime("%Y-%m-%d %H:%M:%S UTC")) for c in calls)
    minutes = [c for c in calls if c.startswith("shutdown -h +")]
    assert minutes and 119 <= int(minutes[0].split("+")[1].split()[0]) <= 121


def test_boot_script_powers_off_at_once_past_the_deadline(tmp_path):
    deadline = datetime.now(timezone.utc) - timedelta(minutes=1)
    marker = tmp_path / "agent-ran"
    calls, log = run_boot_script(tmp_path, boot_spec(tmp_path, deadline, ("touch", str(marker))))
    assert "deadline passed before boot" in log and calls == ["systemctl poweroff"]
    assert not marker.exists()


def test_boot_script_powers_off_when_preparation_fails(tmp_path):
    deadline = datetime.now(timezone.utc) + timedelta(hours=1)
    marker = tmp_path / "agent-ran"
    calls, log = run_boot_script(tmp_path, boot_spec(tmp_path, deadline, ("touch", str(marker)),
                                                     prepare=("echo preparing", "false", "echo not reached")))
    assert "preparing" in log and "not reached" not in log and "preparation failed" in log
    assert "systemctl poweroff" in calls and not marker.exists()
