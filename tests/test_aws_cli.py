"""`trainctl aws ...` end to end: the real CLI in its own process, the real boto3 client, moto's
server on 127.0.0.1 behind a loopback proxy that answers what moto lacks (Pricing, Service
Quotas, spot prices) like a paid account."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tests.aws_fixtures import BUCKET, REGION, Cloud, Project, golden, make_project, reclaim

from .conftest import REPO, clean_env

GOLDEN = Path(__file__).parent / "fixtures" / "aws"
SESSION_ID = re.compile(r"\b\d{8}-\d{6}-[0-9a-f]{6}\b")


@pytest.fixture
def project(tmp_path: Path, cloud: Cloud) -> Project:
    """The project 'demo', set up (its bucket, role and security group are shared by the module)."""
    return make_project(tmp_path / "demo", cloud)


# ----------------------------------------------------------------------------------- setup

def test_setup_twice_creates_everything_once_and_records_the_settings(tmp_path: Path, cloud: Cloud):
    project = make_project(tmp_path / "fresh", cloud, setup=False)
    dry = project.run("aws", "setup", "--bucket", "fresh-bucket")
    assert "will create  bucket fresh-bucket" in dry.stdout and "Nothing was created" in dry.stdout
    assert "bucket = " not in (project.root / "trainctl.toml").read_text()  # nothing recorded without --yes
    first = project.run("aws", "setup", "--bucket", "fresh-bucket", "--yes")
    for made in ("created  bucket fresh-bucket", "created  IAM role trainctl-fresh-machine",
                 "created  instance profile trainctl-fresh-machine", "created  security group trainctl-fresh"):
        assert made in first.stdout, first.stdout
    assert "Saved [aws] region, bucket and prefix" in first.stdout
    toml = (project.root / "trainctl.toml").read_text()
    assert 'bucket = "fresh-bucket"' in toml and f'region = "{REGION}"' in toml
    second = project.run("aws", "setup")  # the bucket now comes from trainctl.toml
    assert "created" not in second.stdout and "Everything is in place; nothing to do." in second.stdout
    assert toml == (project.root / "trainctl.toml").read_text()


# ----------------------------------------------------------------------------------- launch

def normalized(text: str, cloud: Cloud) -> str:
    """The plan without what changes from run to run: ids AWS makes, the session, the time."""
    text = text.replace(cloud.front.url, "http://127.0.0.1:PORT")
    text = SESSION_ID.sub("SESSION", text)
    for prefix in ("ami", "subnet", "sg", "vpc"):
        text = re.sub(rf"\b{prefix}-[0-9a-f]{{8,17}}\b", f"{prefix}-ID", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "DEADLINE", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "DEADLINE", text)
    text = re.sub(r"DEADLINE_EPOCH=\d+", "DEADLINE_EPOCH=EPOCH", text)
    text = re.sub(r"\d+ of 16384 bytes", "N of 16384 bytes", text)
    text = re.sub(r"boot script below: \d+ bytes, sha256 [0-9a-f]+", "boot script below: N bytes, sha256 DIGEST", text)
    return text


def test_dry_run_prints_the_whole_plan_and_creates_nothing(project: Project, cloud: Cloud):
    before = cloud.keys(), len(cloud.instances("*"))
    r = project.run("aws", "launch", "--instance-type", "g5.xlarge", "--max-hours", "6", "--dry-run",
                    "train.py", "--epochs", "3")
    golden(GOLDEN / "cli_launch_dry_run.txt", normalized(r.stdout, cloud))
    # the facts a user checks before paying: price with source and date, cost, quota, AMI, code
    assert "$1.0060/h on-demand (AWS Price List API, 2026-11-01)" in r.stdout
    assert "$6.04 for 6 h" in r.stdout and "(L-DB2E81BA): 64 vCPUs (applied); needs 4" in r.stdout
    assert "newest of 4 PyTorch DLAMIs" in r.stdout and "code bundle   2 files" in r.stdout
    assert (cloud.keys(), len(cloud.instances("*"))) == before
    assert not (project.root / ".trainctl" / "sessions").exists()
    as_json = json.loads(project.run("aws", "launch", "-t", "g5.xlarge", "--spot", "--dry-run", "--json",
                                     "train.py").stdout)
    assert as_json["mechanism"] == "ec2-fleet-maintain" and as_json["price"]["usd_per_hour"] == 0.5002
    # same GPUs, and the plan budgets with the highest price among the types AWS may start
    assert [t["name"] for t in as_json["instance_types"]] == ["g5.xlarge", "g5.2xlarge"]
    assert [r["operation"] for r in as_json["requests"]] == ["CreateLaunchTemplate", "CreateFleet"]


def test_launch_starts_the_machine_with_the_bundle_in_the_bucket(project: Project, cloud: Cloud):
    sid = project.launch("--instance-type", "g5.xlarge", "--max-hours", "2", "--name", "first", "train.py",
                         "--epochs", "2")
    (instance,) = cloud.instances(sid)
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["trainctl:session"] == sid and tags["trainctl:project"] == "demo" and tags["Name"] == "first"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["IamInstanceProfile"]["Arn"].endswith(":instance-profile/trainctl-demo-machine")
    assert "InstanceLifecycle" not in instance  # on-demand
    ec2 = cloud.ec2()
    iid = instance["InstanceId"]
    assert ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")[
        "InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    user_data = base64.b64decode(ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")[
        "UserData"]["Value"]).decode()
    assert f"export TRAINCTL_SESSION_ID={sid}" in user_data and "trainctl agent --end aws" in user_data
    prefix = f"trainctl/demo/{sid}/"
    assert cloud.keys(prefix) == [prefix + k for k in ("code/bundle.json", "code/bundle.tar.gz",
                                                       "code/trainctl-0.1.0-py3-none-any.whl", "session.json")]
    s3 = cloud.moto.client("s3")
    code = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "code/bundle.json")["Body"].read())
    assert code["run"]["script"] == "train.py" and code["run"]["args"] == ["--epochs", "2"]
    assert code["summary"]["files"] == 2
    record = project.record(sid)
    assert record["backend"] == "aws" and record["status"] == "running" and record["name"] == "first"
    assert record["handle"]["ids"]["instance_ids"] == [iid] and record["handle"]["ids"]["region"] == REGION
    assert record["cloud"]["machines"][0]["usd_per_hour"] == 1.006
    assert record["checkpoint_location"] == f"s3://{BUCKET}/{prefix}checkpoints/"
    project.run("aws", "terminate", sid, "--yes")


def test_spot_launch_is_a_maintain_fleet_that_ends_at_the_deadline(project: Project, cloud: Cloud):
    sid = project.launch("-t", "g5.xlarge", "--spot", "--max-hours", "3", "train.py")
    record = project.record(sid)
    fleet_id = record["handle"]["ids"]["fleet_id"]
    (fleet,) = cloud.ec2().describe_fleets(FleetIds=[fleet_id])["Fleets"]
    assert fleet["Type"] == "maintain" and fleet["TerminateInstancesWithExpiration"] is True
    deadline = datetime.fromisoformat(record["cloud"]["deadline"].replace("Z", "+00:00"))
    assert fleet["ValidUntil"] == deadline
    (instance,) = cloud.instances(sid)
    assert instance["InstanceLifecycle"] == "spot"
    assert record["cloud"]["machines"][0]["usd_per_hour"] == 0.5002  # the highest among the fleet's types
    first = project.run("aws", "terminate", sid, "--yes")
    assert f"fleet {fleet_id}: deleted (was active); its machines terminated" in first.stdout
    again = project.run("aws", "terminate", sid, "--yes")
    assert "terminated (was" not in again.stdout and "already" in again.stdout
    assert project.record(sid)["status"] == "killed"


# ----------------------------------------------------------------------------------- manage

@pytest.mark.slow
def test_stop_is_a_preemption_then_resume_continues_the_session(project: Project, cloud: Cloud):
    sid = project.launch("-t", "g5.xlarge", "--spot", "train.py")
    fleet_id = project.record(sid)["handle"]["ids"]["fleet_id"]
    refused = project.run("aws", "resume", sid, "--yes", "--detach", check=False)
    assert refused.returncode == 2 and f"Stop it first: trainctl aws stop {sid}" in refused.stderr
    # No agent answers here: the grace period passes, then the machine is terminated.
    stopped = project.run("aws", "stop", sid, "--grace-period", "1")
    assert f"Session {sid} stopped" in stopped.stdout and f"trainctl aws resume {sid}" in stopped.stdout
    ssm = cloud.moto.client("ssm").list_commands()["Commands"]
    assert any(c["Parameters"]["commands"] == ['kill -TERM "$(cat /opt/trainctl/agent.pid)"'] for c in ssm)
    assert cloud.ec2().describe_fleets(FleetIds=[fleet_id])["Fleets"][0]["FleetState"] != "active"
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}
    assert project.record(sid)["status"] == "stopped"
    again = project.run("aws", "stop", sid)
    assert "is not running (stopped); nothing to stop" in again.stdout

    dry = project.run("aws", "resume", sid, "-t", "g5.2xlarge", "--dry-run")
    assert "code bundle   the session's own: 2 files" in dry.stdout
    assert "resume        none in storage yet: the machine starts from scratch" in dry.stdout
    project.run("aws", "resume", sid, "-t", "g5.2xlarge", "--yes", "--detach")
    record = project.record(sid)
    assert record["status"] == "running" and [a["attempt"] for a in record["attempts"]] == [0, 1]
    second = cloud.instances(sid)[-1]
    assert second["InstanceType"] == "g5.2xlarge" and second["State"]["Name"] == "running"
    assert {t["Key"]: t["Value"] for t in second["Tags"]}["trainctl:attempt"] == "1"
    project.run("aws", "terminate", sid, "--yes")


@pytest.mark.slow
def test_status_list_and_leaks(project: Project, cloud: Cloud):
    live = project.launch("-t", "g5.xlarge", "train.py")
    done = project.launch("-t", "g5.xlarge", "train.py")
    record_path = project.root / ".trainctl" / "sessions" / done / "session.json"
    data = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**data, "status": "completed"}))  # ended here, its machine still runs
    status = project.run("aws", "status", live)
    assert f"session {live} on AWS {REGION}: running" in status.stdout and "on-demand" in status.stdout
    assert "cost       $0.02 (1 machine" in status.stdout  # the one-minute minimum at $1.006/h
    listing = project.run("aws", "list")
    assert "Possible leaks" in listing.stdout
    assert f"session {done} has ended (completed)" in listing.stdout
    assert f"end it: trainctl aws terminate {done} --region {REGION}" in listing.stdout
    assert f"session {live} " not in listing.stdout.split("Possible leaks")[1]
    as_json = json.loads(project.run("aws", "list", "--json").stdout)
    assert {leak["session_id"] for leak in as_json[0]["leaks"]} >= {done}
    elsewhere = make_project(project.root.parent / "elsewhere", cloud, setup=False)  # not recorded there
    assert f"session {live} on AWS {REGION}: running" in elsewhere.run("aws", "status", live).stdout
    shell = project.run("aws", "ssh", live, "--print-command")
    assert shell.stdout.strip() == (f"aws ssm start-session --target {cloud.instances(live)[0]['InstanceId']} "
                                    f"--region {REGION}")
    for sid in (live, done):
        project.run("aws", "terminate", sid, "--yes")


def test_cost_so_far_sums_every_machine_of_the_session(project: Project, cloud: Cloud):
    from trainctl.backends.cloud import recorded_cost

    sid = project.launch("-t", "g5.xlarge", "--spot", "train.py")
    ids = project.record(sid)["handle"]["ids"]
    (first,) = cloud.instances(sid)
    # The test plays AWS: it reclaims the spot machine, and the fleet starts a replacement.
    reclaim(cloud, first["InstanceId"])
    cloud.ec2().run_instances(MinCount=1, MaxCount=1, InstanceMarketOptions={"MarketType": "spot"},
                              LaunchTemplate={"LaunchTemplateId": ids["launch_template_id"], "Version": "1"})
    status = project.run("aws", "status", sid)
    assert status.stdout.count(" spot ") == 2 and "terminated" in status.stdout
    record = project.record(sid)
    machines = record["cloud"]["machines"]
    assert [m["state"] for m in machines] == ["terminated", "running"]
    # the first at the price its launch planned with (the fleet's highest), the replacement at
    # the spot price of its own type and zone now
    assert [m["usd_per_hour"] for m in machines] == [0.5002, 0.4123]
    later = machines[1]["started_at"] + 2 * 3600
    cost = recorded_cost(record, now=later)
    first_s = max(machines[0]["ended_at"] - machines[0]["started_at"], 60)  # billed a minute at least
    assert cost.total_usd == pytest.approx(0.5002 * first_s / 3600 + 0.4123 * 2)
    assert cost.machines == 2 and cost.estimate
    listing = project.run("sessions", "list")
    assert "COST" in listing.stdout.splitlines()[0] and "~$" in listing.stdout
    shown = project.run("sessions", "show", sid)
    assert re.search(r"cost so far +~\$\d+\.\d\d \(2 machines; [\d.]+ machine-hours; spot: estimate\)", shown.stdout)
    project.run("aws", "terminate", sid, "--yes")
    ended = project.record(sid)
    assert ended["status"] == "killed"
    assert all(m["ended_at"] for m in ended["cloud"]["machines"])


@pytest.mark.parametrize("new_id", ["i-0000aaaa", "i-ffffffff"])
def test_a_replacement_started_in_the_same_second_lists_after_the_machine_it_replaced(new_id: str):
    """EC2's LaunchTime has whole seconds: the spot reclaim and the fleet's replacement can
    share one, and the record kept them in instance-id order (either way round)."""
    from trainctl.backends.aws import _merge_machines

    known = [{"id": "i-77777777", "state": "running", "started_at": 1700000000.6, "usd_per_hour": 0.5}]
    seen = [{"id": new_id, "state": "running", "started_at": 1700000000.0},
            {"id": "i-77777777", "state": "terminated", "started_at": 1700000000.0}]
    merged = _merge_machines(known, seen)
    assert [(m["id"], m["state"]) for m in merged] == [("i-77777777", "terminated"), (new_id, "running")]
    assert merged[0]["usd_per_hour"] == 0.5


def test_spot_fallback_continues_on_on_demand_after_n_interruptions(project: Project, cloud: Cloud):
    sid = project.launch("-t", "g5.xlarge", "--spot", "--spot-fallback", "1", "train.py")
    fleet_id = project.record(sid)["handle"]["ids"]["fleet_id"]
    reclaim(cloud, cloud.instances(sid)[0]["InstanceId"])
    project.run("aws", "status", sid)  # trainctl looks at the session: one interruption is enough
    spot, on_demand = cloud.instances(sid)
    assert spot["State"]["Name"] == "terminated" and on_demand["State"]["Name"] == "running"
    assert "InstanceLifecycle" not in on_demand
    assert cloud.ec2().describe_fleets(FleetIds=[fleet_id])["Fleets"][0]["FleetState"] != "active"
    record = project.record(sid)
    assert [a.get("market") for a in record["attempts"]] == ["spot", "on-demand"]
    assert record["attempts"][1]["note"] == "after 1 spot interruption(s)"
    assert record["handle"]["ids"]["instance_ids"] == [on_demand["InstanceId"]]
    project.run("aws", "terminate", sid, "--yes")


def test_secrets_reach_the_machine_through_ssm_only(project: Project, cloud: Cloud):
    value = "s3cr3t-wandb-value"
    sid = project.launch("-t", "g5.xlarge", "--secret", "WANDB_API_KEY", "train.py", WANDB_API_KEY=value)
    ssm = cloud.moto.client("ssm")
    param = ssm.get_parameter(Name="/trainctl/demo/WANDB_API_KEY", WithDecryption=True)["Parameter"]
    assert param["Type"] == "SecureString" and param["Value"] == value
    (instance,) = cloud.instances(sid)
    user_data = base64.b64decode(cloud.ec2().describe_instance_attribute(
        InstanceId=instance["InstanceId"], Attribute="userData")["UserData"]["Value"]).decode()
    assert "export TRAINCTL_FORWARD_VARS=WANDB_API_KEY" in user_data and value not in user_data
    s3 = cloud.moto.client("s3")
    for key in cloud.keys(f"trainctl/demo/{sid}/"):
        assert value.encode() not in s3.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key
    for path in (project.root / ".trainctl").rglob("*"):
        assert not path.is_file() or value.encode() not in path.read_bytes(), path
    project.run("aws", "terminate", sid, "--yes")


def test_region_auto_picks_a_region_and_says_which(project: Project):
    r = project.run("aws", "launch", "-t", "g5.xlarge", "--region", "auto", "--dry-run", "train.py")
    assert "warning: --region auto picked us-east-1: $1.0060/h on-demand" in r.stdout


# ----------------------------------------------------------------------------------- bad input

BAD = [
    # (arguments, extra trainctl.toml, exit code, message fragment, hint fragment)
    (["aws", "launch", "train.py"], "", 2, "Missing option '--instance-type'", None),
    (["aws", "launch", "-t", "g5.xlarge", "--spot-fallback", "2", "train.py"], "", 2,
     "--spot-fallback applies to spot sessions", "Add --spot"),
    (["aws", "launch", "-t", "g5.xlarge", "--region", "us-east-7", "--dry-run", "train.py"], "", 2,
     "Unknown AWS region 'us-east-7'.", "Did you mean: us-east-2, us-east-1"),
    (["aws", "launch", "-t", "g5.xlarg", "--dry-run", "train.py"], "", 2,
     "Unknown instance type 'g5.xlarg'.", "Did you mean: g5.xlarge"),
    (["aws", "launch", "-t", "g5.xlarge", "--yes", "train.py", "--api-key", "hunter2"], "", 2,
     "looks like a secret", "--secret NAME"),
    (["aws", "launch", "-t", "g5.xlarge", "--secret", "TRAINCTL_TEST_UNSET", "--yes", "train.py"], "", 2,
     "TRAINCTL_TEST_UNSET is not set here", "export TRAINCTL_TEST_UNSET="),
    (["aws", "launch", "-t", "g5.xlarge", "--yes", "../elsewhere.py"], "", 3, "does not exist", None),
    (["aws", "launch", "-t", "g5.xlarge", "--max-hours", "48", "--yes", "train.py"], "[cloud]\nbudget_usd = 10\n", 2,
     "Projected cost $48.29 (48 h x $1.0060/h) exceeds the budget of $10.00.", "Lower --max-hours to 9.94"),
    (["aws", "launch", "-t", "g5.xlarge", "train.py"], "", 2,
     "Refusing to start a billed machine without confirmation.", "Pass --yes"),
    (["aws", "status", "nope"], "", 3, "No session 'nope' in this project.", None),
    (["aws", "setup"], "", 2, "No bucket is named for the sessions.", "--bucket"),
]


@pytest.mark.parametrize(("args", "toml", "code", "message", "hint"), BAD,
                         ids=["no-type", "fallback", "region", "type", "secret-arg", "secret-unset", "script",
                              "budget", "confirm", "status", "setup"])
def test_bad_input_is_one_line_with_the_fix_and_creates_nothing(tmp_path: Path, cloud: Cloud, args, toml, code,
                                                                message, hint):
    project = make_project(tmp_path / "demo", cloud, setup=False)
    config = project.root / "trainctl.toml"
    if args[:2] != ["aws", "setup"]:
        config.write_text(config.read_text() + f'bucket = "{BUCKET}"\n')
    if toml:
        config.write_text(config.read_text() + toml)
    before = cloud.keys()
    r = project.run(*args, check=False)
    assert r.returncode == code, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("error:") == 1 or "Missing option" in r.stderr
    if hint:
        assert hint in r.stderr
    assert cloud.keys() == before and not (project.root / ".trainctl" / "sessions").exists()


def test_no_credentials_is_one_line_with_how_to_set_them(tmp_path: Path, cloud: Cloud):
    project = make_project(tmp_path / "demo", cloud, setup=False)
    r = project.run("aws", "setup", "--bucket", BUCKET, check=False, AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    assert r.returncode == 5 and "error: No AWS credentials found." in r.stderr
    assert "hint: Set them with: aws configure" in r.stderr and "Traceback" not in r.stderr


def test_a_launch_aws_refuses_cleans_up_what_it_made_and_says_so(project: Project, cloud: Cloud):
    from tests.servers import Rule

    def no_spot(_body: bytes):
        xml = ("<Response><Errors><Error><Code>MaxSpotInstanceCountExceeded</Code><Message>Max spot instance "
               "count exceeded</Message></Error></Errors><RequestID>test</RequestID></Response>")
        return 400, {"Content-Type": "text/xml"}, xml.encode()

    rule = cloud.front.add(Rule("reply", form=r"(^|&)Action=CreateFleet(&|$)", reply=no_spot))
    r = project.run("aws", "launch", "-t", "g5.xlarge", "--spot", "--yes", "--detach", "train.py", check=False)
    assert rule.applied == 1
    assert r.returncode == 5, r.stderr
    assert "error: The account's spot vCPU quota 'All G and VT Spot Instance Requests' (L-3819A6DF)" in r.stderr
    assert "Cleaned up what the launch had made: launch template lt-" in r.stderr and "Traceback" not in r.stderr
    (sid,) = [p.name for p in (project.root / ".trainctl" / "sessions").iterdir()]
    record = project.record(sid)
    assert record["status"] == "failed" and record["error"].startswith("launch failed: The account's spot vCPU quota")
    assert cloud.instances(sid) == [] and cloud.ec2().describe_launch_templates(
        Filters=[{"Name": "tag:trainctl:session", "Values": [sid]}])["LaunchTemplates"] == []


def test_a_refused_launch_prints_the_plan_first(tmp_path: Path, cloud: Cloud):
    project = make_project(tmp_path / "demo", cloud)
    config = project.root / "trainctl.toml"
    config.write_text(config.read_text() + "[cloud]\nbudget_usd = 1\n")
    r = project.run("aws", "launch", "-t", "g5.xlarge", "--max-hours", "5", "--dry-run", "train.py", check=False)
    assert r.returncode == 2 and r.stdout.startswith("Launch plan (REFUSED)")
    assert "projected     $5.03 for 5 h; budget $1.00" in r.stdout


def test_the_exit_code_table_lists_the_provider_refusal():
    from trainctl.errors import EXIT_PROVIDER

    readme = (REPO / "README.md").read_text()
    assert f"| {EXIT_PROVIDER} | the cloud provider refused" in readme


def test_commands_stay_light():
    code = ("import sys, trainctl.cli.aws, trainctl.backends.aws, trainctl.backends.cloud; "
            "print(sorted(m for m in ('boto3', 'botocore', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert r.stdout.strip() == "[]", r.stderr

