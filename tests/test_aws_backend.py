"""The AWS backend in this process: the machine's end hook (what the agent calls on EC2) and the
purity of plan, against moto's server behind the loopback proxy."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.aws_fixtures import BUCKET, REGION, Cloud, Project, make_project
from tests.servers import FakeIMDS
from trainctl.backends.aws import AwsMachineEnd
from trainctl.backends.base import EndFailedError


@pytest.fixture
def project(tmp_path: Path, cloud: Cloud) -> Project:
    return make_project(tmp_path / "demo", cloud)


@pytest.fixture
def machine_env(monkeypatch: pytest.MonkeyPatch):
    """What the boot script exports on a machine of session `sid`, and an IMDS answering `iid`."""
    servers = []

    def boot(sid: str, iid: str) -> FakeIMDS:
        imds = FakeIMDS(instance_id=iid, region=REGION).start()
        servers.append(imds)
        for name, value in {"TRAINCTL_STORAGE_URI": f"s3://{BUCKET}/trainctl", "TRAINCTL_PROJECT": "demo",
                            "TRAINCTL_SESSION_ID": sid, "TRAINCTL_REGION": REGION,
                            "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.endpoint}.items():
            monkeypatch.setenv(name, value)
        return imds

    yield boot
    for imds in servers:
        imds.stop()


def storage(cloud: Cloud, sid: str):
    from trainctl.storage.remote import RemoteSession
    from trainctl.storage.s3 import S3Store

    return RemoteSession(S3Store(BUCKET, f"trainctl/demo/{sid}", endpoint_url=cloud.moto.endpoint_url, region=REGION))


def states(cloud: Cloud, sid: str, fleet_id: str) -> tuple[set[str], str, int]:
    fleet = cloud.ec2().describe_fleets(FleetIds=[fleet_id])["Fleets"][0]["FleetState"]
    templates = cloud.ec2().describe_launch_templates(
        Filters=[{"Name": "tag:trainctl:session", "Values": [sid]}])["LaunchTemplates"]
    return {i["State"]["Name"] for i in cloud.instances(sid)}, fleet, len(templates)


def test_the_end_of_a_session_deletes_its_fleet_then_terminates_the_machine(project: Project, cloud: Cloud,
                                                                           machine_env):
    sid = project.launch("-t", "g5.xlarge", "--spot", "train.py")
    fleet_id = project.record(sid)["handle"]["ids"]["fleet_id"]
    (instance,) = cloud.instances(sid)
    machine_env(sid, instance["InstanceId"])
    storage(cloud, sid).mark_ended("training completed", status="completed")  # the agent's tombstone
    hook = AwsMachineEnd(endpoint_url=cloud.front.url)
    hook.end_machine("training completed")
    assert hook.actions[0] == f"fleet {fleet_id}: deleted (was active); its machine left to power itself off"
    assert hook.actions[-1] == f"instance {instance['InstanceId']}: terminated (training completed)"
    assert states(cloud, sid, fleet_id) == ({"terminated"}, "deleted_running", 0)
    again = AwsMachineEnd(endpoint_url=cloud.front.url)
    again.end_machine("training completed")  # a second call finds it ending: nothing to do, no error
    assert again.actions == [f"instance {instance['InstanceId']}: already ending"]


def test_a_machine_that_lost_its_session_ends_alone(project: Project, cloud: Cloud, machine_env):
    sid = project.launch("-t", "g5.xlarge", "--spot", "train.py")
    fleet_id = project.record(sid)["handle"]["ids"]["fleet_id"]
    (instance,) = cloud.instances(sid)
    machine_env(sid, instance["InstanceId"])
    hook = AwsMachineEnd(endpoint_url=cloud.front.url)
    hook.end_machine("another machine writes this session")  # no tombstone: the session goes on
    assert states(cloud, sid, fleet_id) == ({"terminated"}, "active", 1)
    project.run("aws", "terminate", sid, "--yes")


def test_an_end_that_cannot_reach_ec2_says_so_in_one_line(cloud: Cloud, machine_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    machine_env("20261130-000000-abcdef", "i-0123456789abcdef0")
    with pytest.raises(EndFailedError) as caught:
        AwsMachineEnd(endpoint_url=closed).end_machine("training completed")
    assert str(caught.value).startswith("Could not end this machine through the EC2 API (Could not reach AWS at")
    assert "\n" not in str(caught.value) and "powers it off" in caught.value.hint


def timeless(aws_plan) -> str:
    """The plan as JSON without the moment it was made (the deadline counts from it)."""
    import re

    text = re.sub(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\dZ?( UTC)?", "TIME", aws_plan.to_json())
    text = re.sub(r"DEADLINE_EPOCH=\d+|shutdown -h [^\n]*", "DEADLINE", text)
    return re.sub(r"sha256 [0-9a-f]+", "sha256 DIGEST", text)


def test_plan_is_repeatable_and_creates_nothing(project: Project, cloud: Cloud):
    from trainctl import config
    from trainctl.backends.aws import AwsBackend
    from trainctl.backends.base import RunSpec

    cfg = config.load(project.root)
    spec = RunSpec(script=project.root / "train.py", args=("--epochs", "2"), session_id="20261130-000000-abcdef",
                   cwd=project.root, resources={"instance_type": "g5.xlarge", "spot": True, "max_hours": 2})
    before = cloud.keys(), len(cloud.instances("*"))
    first, second = (AwsBackend(cfg=cfg).plan(spec) for _ in range(2))
    assert timeless(first.details["aws_plan"]) == timeless(second.details["aws_plan"])
    assert first.command == second.command
    assert first.checkpoint_location == f"s3://{BUCKET}/trainctl/demo/{spec.session_id}/checkpoints/"
    assert first.cost_per_hour == 0.5002 and (cloud.keys(), len(cloud.instances("*"))) == before


def test_output_is_read_from_its_offset_whoever_pulled_it_in(project: Project, cloud: Cloud):
    """describe brings output into the local folder as it looks; log_iter still hands on every
    byte from the offset asked for (a follower lost what a look had pulled before)."""
    from trainctl import config
    from trainctl.backends.aws import AwsBackend
    from trainctl.backends.base import Handle

    sid = project.launch("-t", "g5.xlarge", "train.py")
    output = storage(cloud, sid).output_writer()
    output.append(b"first line\n")
    output.flush()
    backend = AwsBackend(cfg=config.load(project.root))
    handle = Handle.from_json(project.record(sid)["handle"])
    assert backend.describe(handle).running  # this look pulled the first line in
    output.append(b"second line\n")
    output.flush()
    assert b"".join(c.data for c in backend.log_iter(handle, since=0)) == b"first line\nsecond line\n"
    assert b"".join(c.data for c in backend.log_iter(handle, since=6)) == b"line\nsecond line\n"
    local = project.root / ".trainctl" / "sessions" / sid / "output.log"
    assert local.read_bytes() == b"first line\nsecond line\n"  # in once, though two looks pulled
    project.run("aws", "terminate", sid, "--yes")
