"""`trainctl aws launch --nodes N`: one job over several EC2 machines, against moto's server.

The real CLI in its own process talks to moto through the loopback proxy of aws_fixtures;
moto 5 does not serve placement groups, so the proxy answers CreatePlacementGroup,
DescribePlacementGroups and DeletePlacementGroup from a small stateful fake here, and keeps
every request it got so a test can read what AWS would have been asked.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.aws_fixtures import REGION, Cloud, Project, make_project
from tests.servers import Rule

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


class PlacementGroups:
    """EC2's placement groups, as much as trainctl uses: made, listed by tag, deleted."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, Any]] = {}
        self.created: list[dict[str, str]] = []  # each CreatePlacementGroup request's parameters

    @staticmethod
    def _form(body: bytes) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(body.decode()).items()}

    @staticmethod
    def _xml(action: str, inner: str) -> tuple[int, dict[str, str], bytes]:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><{action}Response xmlns="{EC2_NS}">'
                f"<requestId>trainctl-test</requestId>{inner}</{action}Response>")
        return 200, {"Content-Type": "text/xml"}, body.encode()

    @staticmethod
    def _item(group: dict[str, Any]) -> str:
        tags = "".join(f"<item><key>{k}</key><value>{v}</value></item>" for k, v in group["tags"].items())
        return (f"<groupName>{group['name']}</groupName><strategy>{group['strategy']}</strategy>"
                f"<state>available</state><tagSet>{tags}</tagSet>")

    def create(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        form = self._form(body)
        self.created.append(form)
        name = form["GroupName"]
        if name in self.groups:
            return 400, {"Content-Type": "text/xml"}, (
                f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>InvalidPlacementGroup.Duplicate'
                f"</Code><Message>The placement group '{name}' already exists.</Message></Error></Errors>"
                "<RequestID>trainctl-test</RequestID></Response>").encode()
        tags = {form[k]: form[k[:-3] + "Value"] for k in form if re.fullmatch(r"TagSpecification\.1\.Tag\.\d+\.Key", k)}
        self.groups[name] = {"name": name, "strategy": form.get("Strategy"), "tags": tags}
        return self._xml("CreatePlacementGroup", f"<placementGroup>{self._item(self.groups[name])}</placementGroup>")

    def describe(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        form = self._form(body)
        wanted = {form[k][4:]: form[k[:-4] + "Value.1"] for k in form
                  if re.fullmatch(r"Filter\.\d+\.Name", k) and form[k].startswith("tag:")}
        found = [g for g in self.groups.values() if all(g["tags"].get(k) == v for k, v in wanted.items())]
        items = "".join(f"<item>{self._item(g)}</item>" for g in found)
        return self._xml("DescribePlacementGroups", f"<placementGroupSet>{items}</placementGroupSet>")

    def delete(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.groups.pop(self._form(body)["GroupName"], None)
        return self._xml("DeletePlacementGroup", "<return>true</return>")


class Seen(Rule):
    """A rule that only writes down the requests it matches (as forms) and lets them through to
    moto: what RunInstances was asked, where moto keeps less than AWS (a placement group name)."""

    def __init__(self, action: str) -> None:
        super().__init__("reply", form=rf"(^|&)Action={action}(&|$)")
        self.forms: list[dict[str, str]] = []

    def matches(self, method: str, path: str, query: str, target: str = "", body: bytes = b"") -> bool:
        if super().matches(method, path, query, target, body):
            self.forms.append({k: v[0] for k, v in parse_qs(body.decode()).items()})
        return False


@pytest.fixture(scope="module")
def placement(cloud: Cloud) -> PlacementGroups:
    fake = PlacementGroups()
    for action, reply in (("CreatePlacementGroup", fake.create), ("DescribePlacementGroups", fake.describe),
                          ("DeletePlacementGroup", fake.delete)):
        cloud.front.add(Rule("reply", form=rf"(^|&)Action={action}(&|$)", times=None, reply=reply))
    return fake


@pytest.fixture(scope="module")
def run_instances(cloud: Cloud) -> Seen:
    return cloud.front.add(Seen("RunInstances"))


@pytest.fixture
def project(tmp_path: Path, cloud: Cloud, placement: PlacementGroups) -> Project:
    return make_project(tmp_path / "demo", cloud)


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def templates_of(cloud: Cloud, sid: str) -> list[dict[str, Any]]:
    return cloud.ec2().describe_launch_templates(
        Filters=[{"Name": "tag:trainctl:session", "Values": [sid]}])["LaunchTemplates"]


def user_data(cloud: Cloud, instance_id: str) -> str:
    answer = cloud.ec2().describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(answer["UserData"]["Value"]).decode()


def test_dry_run_shows_n_machines_their_price_and_the_total(project: Project, cloud: Cloud,
                                                            placement: PlacementGroups):
    made = len(placement.created)
    machines = {i["InstanceId"] for i in cloud.instances("*")}  # the module's earlier tests may have left some
    r = project.run("aws", "launch", "-t", "g5.xlarge", "--nodes", "2", "--nproc-per-node", "1", "--max-hours", "6",
                    "--dry-run", "train.py")
    out = r.stdout
    assert "2 x $1.0060/h = $2.0120/h for the job" in out
    assert "$12.07 for 6 h, 2 machines" in out  # 2 x 1.006 x 6
    assert "needs 8" in out  # the vCPU quota must hold both machines
    assert "2 machines in one cluster placement group in one zone" in out
    requests = re.findall(r"^  (\w+)( node \d)?", out.split("Requests (in order):")[1].split("Boot script")[0], re.M)
    assert [op + node for op, node in requests] == ["CreatePlacementGroup", "CreateSecurityGroup",
                                                     "AuthorizeSecurityGroupIngress", "RunInstances node 0",
                                                     "RunInstances node 1"]
    assert '"Strategy": "cluster"' in out
    plan = json.loads(project.run("aws", "launch", "-t", "g5.xlarge", "--nodes", "2", "--dry-run", "--json",
                                  "train.py").stdout)
    assert plan["nodes"] == 2 and plan["projected_cost_usd"] == round(1.006 * 24 * 2, 4)
    boots = plan["node_boot_scripts"]
    assert ["export TRAINCTL_NODE_RANK=0" in boots[0], "export TRAINCTL_NODE_RANK=1" in boots[1]] == [True, True]
    assert all("export TRAINCTL_NNODES=2" in b for b in boots)
    assert len(placement.created) == made  # a dry run creates nothing
    assert {i["InstanceId"] for i in cloud.instances("*")} == machines


@pytest.mark.slow
def test_launch_makes_the_group_the_network_and_one_tagged_machine_per_node(project: Project, cloud: Cloud,
                                                                           placement: PlacementGroups,
                                                                           run_instances: Seen):
    sid = project.launch("-t", "g5.xlarge", "--nodes", "2", "--nproc-per-node", "1", "--max-hours", "2", "train.py")
    (request,) = [c for c in placement.created if sid in c["GroupName"]]
    assert request["Strategy"] == "cluster"
    assert {request[f"TagSpecification.1.Tag.{n}.Key"] for n in range(1, 6)} >= {"trainctl:session"}

    instances = cloud.instances(sid)
    assert len(instances) == 2
    by_rank = {int(tags_of(i)["trainctl:node"]): i for i in instances}
    assert sorted(by_rank) == [0, 1]
    assert len({i["Placement"]["AvailabilityZone"] for i in instances}) == 1  # one zone
    for rank, instance in by_rank.items():
        tags = tags_of(instance)
        assert tags["trainctl:session"] == sid and tags["trainctl:project"] == "demo"
        assert tags["Name"] == f"trainctl {sid} node {rank}/2"
        boot = user_data(cloud, instance["InstanceId"])
        assert f"export TRAINCTL_NODE_RANK={rank}" in boot and "export TRAINCTL_NNODES=2" in boot
        assert f"export TRAINCTL_SESSION_ID={sid}" in boot and "--nproc-per-node 1" in boot

    # every node asked for in the group, in the zone the machines are in (moto keeps no group name)
    asked = [f for f in run_instances.forms if f.get("Placement.GroupName") == request["GroupName"]
             and f.get("DryRun") != "true"]
    assert len(asked) == 2
    assert {f["Placement.AvailabilityZone"] for f in asked} == {instances[0]["Placement"]["AvailabilityZone"]}

    # the session's own security group: its members reach each other on all TCP, nothing else
    (group,) = cloud.ec2().describe_security_groups(
        Filters=[{"Name": "tag:trainctl:session", "Values": [sid]}])["SecurityGroups"]
    (rule,) = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 0, 65535)
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [group["GroupId"]] and rule["IpRanges"] == []
    for instance in instances:
        assert group["GroupId"] in {g["GroupId"] for g in instance["SecurityGroups"]}

    record = project.record(sid)
    ids = record["handle"]["ids"]
    assert ids["nodes"] == 2 and ids["instance_ids"] == [by_rank[0]["InstanceId"], by_rank[1]["InstanceId"]]
    assert [m["usd_per_hour"] for m in record["cloud"]["machines"]] == [1.006, 1.006]

    listing = project.run("aws", "list").stdout
    rows = [line for line in listing.splitlines() if sid in line]
    assert len(rows) == 3 and rows[2].split()[:3] == [f"{sid}", "total", "2"], listing
    assert "2.0120" in rows[2]  # one figure for the session: both machines
    status = project.run("aws", "status", sid).stdout
    assert "(2 machine" in status
    assert f"{by_rank[0]['InstanceId']}  node 0" in status and f"{by_rank[1]['InstanceId']}  node 1" in status

    ended = project.run("aws", "terminate", sid, "--yes").stdout
    assert f"security group {group['GroupId']}: deleted" in ended
    assert f"placement group {request['GroupName']}: deleted" in ended
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}
    assert request["GroupName"] not in placement.groups
    # the job continues with the same world size: as many machines as it started on
    resumed = project.run("aws", "resume", sid, "--dry-run").stdout
    assert "2 x $1.0060/h = $2.0120/h for the job" in resumed and "RunInstances node 1" in resumed


def test_spot_nodes_plan_one_maintain_fleet_per_node_and_the_total(project: Project, cloud: Cloud,
                                                                  placement: PlacementGroups):
    made = len(placement.created)
    r = project.run("aws", "launch", "-t", "g5.xlarge", "--nodes", "2", "--spot", "--nproc-per-node", "1",
                    "--max-hours", "6", "--dry-run", "train.py")
    out = r.stdout
    assert "one EC2 Fleet of type maintain per node: AWS replaces a reclaimed node" in out
    assert "the job resumes with 2 nodes from the newest verified checkpoint" in out
    price = float(re.search(r"2 x \$(\d+\.\d{4})/h = \$(\d+\.\d{4})/h for the job", out).group(1))
    assert f"2 x ${price:.4f}/h = ${2 * price:.4f}/h for the job" in out
    assert f"${2 * price * 6:.2f} for 6 h, 2 machines" in out
    requests = re.findall(r"^  (\w+)( node \d)?", out.split("Requests (in order):")[1].split("Boot script")[0], re.M)
    assert [op + node for op, node in requests] == [
        "CreatePlacementGroup", "CreateSecurityGroup", "AuthorizeSecurityGroupIngress", "CreateLaunchTemplate node 0",
        "CreateLaunchTemplate node 1", "CreateFleet node 0", "CreateFleet node 1"]
    plan = json.loads(project.run("aws", "launch", "-t", "g5.xlarge", "--nodes", "2", "--spot", "--dry-run", "--json",
                                  "train.py").stdout)
    assert plan["mechanism"] == "ec2-fleet-maintain" and plan["nodes"] == 2
    templates = [r for r in plan["requests"] if r["operation"] == "CreateLaunchTemplate"]
    fleets = [r for r in plan["requests"] if r["operation"] == "CreateFleet"]
    for rank, (template, fleet) in enumerate(zip(templates, fleets, strict=True)):
        data = template["params"]["LaunchTemplateData"]
        assert data["Placement"]["GroupName"].startswith("trainctl-")
        assert "<the session's node security group>" in data["SecurityGroupIds"]
        assert {"Key": "trainctl:node", "Value": str(rank)} in data["TagSpecifications"][0]["Tags"]
        params = fleet["params"]
        assert (params["Type"], params["TargetCapacitySpecification"]["TotalTargetCapacity"]) == ("maintain", 1)
        assert params["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]["LaunchTemplateName"] == (
            template["params"]["LaunchTemplateName"])
        assert {"Key": "trainctl:node", "Value": str(rank)} in params["TagSpecifications"][0]["Tags"]
    assert len(placement.created) == made  # a dry run creates nothing


@pytest.mark.slow
def test_spot_nodes_launch_a_template_and_a_fleet_per_node_and_terminate_ends_them_all(
        project: Project, cloud: Cloud, placement: PlacementGroups):
    sid = project.launch("-t", "g5.xlarge", "--nodes", "2", "--spot", "--nproc-per-node", "1", "--max-hours", "2",
                         "train.py")
    (request,) = [c for c in placement.created if sid in c["GroupName"]]
    templates = templates_of(cloud, sid)
    assert len(templates) == 2
    by_rank = {int(tags_of(i)["trainctl:node"]): i for i in cloud.instances(sid)}
    assert sorted(by_rank) == [0, 1]
    (group,) = cloud.ec2().describe_security_groups(
        Filters=[{"Name": "tag:trainctl:session", "Values": [sid]}])["SecurityGroups"]
    for rank, instance in by_rank.items():
        assert instance.get("InstanceLifecycle") == "spot"
        boot = user_data(cloud, instance["InstanceId"])
        assert f"export TRAINCTL_NODE_RANK={rank}" in boot and "export TRAINCTL_NNODES=2" in boot
        assert tags_of(instance)["trainctl:attempt"] == "0"
    ids = project.record(sid)["handle"]["ids"]
    assert ids["mechanism"] == "ec2-fleet-maintain" and len(ids["fleet_ids"]) == 2
    assert ids["instance_ids"] == [by_rank[0]["InstanceId"], by_rank[1]["InstanceId"]]
    fleets = cloud.ec2().describe_fleets(FleetIds=ids["fleet_ids"])["Fleets"]
    for rank, fleet_id in enumerate(ids["fleet_ids"]):
        (fleet,) = [f for f in fleets if f["FleetId"] == fleet_id]
        assert fleet["Type"] == "maintain" and tags_of(fleet)["trainctl:node"] == str(rank)
        template_id = fleet["LaunchTemplateConfigs"][0]["LaunchTemplateSpecification"]
        data = cloud.ec2().describe_launch_template_versions(
            LaunchTemplateName=template_id["LaunchTemplateName"])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        assert f"TRAINCTL_NODE_RANK={rank}" in base64.b64decode(data["UserData"]).decode()
        assert data["Placement"]["GroupName"] == request["GroupName"]
        assert group["GroupId"] in data["SecurityGroupIds"]  # (moto's fleet machines keep only the first group)
    status = project.run("aws", "status", sid).stdout
    assert "(2 machine" in status and f"{by_rank[1]['InstanceId']}  node 1" in status

    ended = project.run("aws", "terminate", sid, "--yes").stdout
    for fleet_id in ids["fleet_ids"]:
        assert f"fleet {fleet_id}: deleted" in ended
    assert f"security group {group['GroupId']}: deleted" in ended
    assert f"placement group {request['GroupName']}: deleted" in ended
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}
    assert templates_of(cloud, sid) == [] and request["GroupName"] not in placement.groups
    again = project.run("aws", "terminate", sid, "--yes").stdout  # safe to repeat
    assert "deleted (was" not in again and "terminated (was" not in again


@pytest.mark.slow
def test_spot_fallback_moves_a_node_reclaimed_n_times_to_on_demand_in_its_group(
        project: Project, cloud: Cloud, placement: PlacementGroups, run_instances: Seen):
    from tests.aws_fixtures import reclaim

    sid = project.launch("-t", "g5.xlarge", "--nodes", "2", "--spot", "--spot-fallback", "1", "train.py")
    ids = project.record(sid)["handle"]["ids"]
    first = {int(tags_of(i)["trainctl:node"]): i["InstanceId"] for i in cloud.instances(sid)}
    reclaim(cloud, first[1])
    status = project.run("aws", "status", sid).stdout  # trainctl looks at the session: one interruption is enough
    moved = [i for i in cloud.instances(sid) if i["InstanceId"] not in first.values()]
    (on_demand,) = moved
    assert "InstanceLifecycle" not in on_demand and tags_of(on_demand)["trainctl:node"] == "1"
    assert tags_of(on_demand)["trainctl:attempt"] == "0"  # the same node of the same attempt: it checks in as node 1
    assert "export TRAINCTL_NODE_RANK=1" in user_data(cloud, on_demand["InstanceId"])
    (asked,) = [f for f in run_instances.forms if f.get("LaunchTemplate.LaunchTemplateName", "").endswith("-n1")]
    zone = cloud.instances(sid)[0]["Placement"]["AvailabilityZone"]
    assert on_demand["Placement"]["AvailabilityZone"] == zone and "SubnetId" in asked
    fleets = {f["FleetId"]: f["FleetState"] for f in cloud.ec2().describe_fleets(FleetIds=ids["fleet_ids"])["Fleets"]}
    assert fleets[ids["fleet_ids"][0]] == "active" and fleets[ids["fleet_ids"][1]] != "active"
    status = project.run("aws", "status", sid).stdout
    assert (f"fallback   node 1 continues on on-demand ({on_demand['InstanceId']}) after 1 spot interruption(s)"
            in status), status
    assert f"{on_demand['InstanceId']}  node 1" in status and "(3 machine" in status
    assert [m["node"] for m in project.record(sid)["cloud"]["node_fallbacks"]] == [1]
    project.run("aws", "status", sid)  # a second look starts nothing more
    assert len(cloud.instances(sid)) == 3
    project.run("aws", "terminate", sid, "--yes")
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}


class NoCapacityForNode(Rule):
    """EC2 without capacity for node `rank` in `zone` (every other request goes to moto)."""

    def __init__(self, zone: str, rank: int) -> None:
        super().__init__("reply", form=r"(^|&)Action=RunInstances(&|$)", times=None, reply=self.refuse)
        self.zone, self.rank = zone, rank

    def matches(self, method: str, path: str, query: str, target: str = "", body: bytes = b"") -> bool:
        if not super().matches(method, path, query, target, body):
            return False
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        tags = {form[k]: form[k[:-3] + "Value"] for k in form if re.fullmatch(r"TagSpecification\.1\.Tag\.\d+\.Key", k)}
        return (form.get("Placement.AvailabilityZone") == self.zone and tags.get("trainctl:node") == str(self.rank)
                and form.get("DryRun") != "true")

    @staticmethod
    def refuse(body: bytes) -> tuple[int, dict[str, str], bytes]:
        return 500, {"Content-Type": "text/xml"}, (
            b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>InsufficientInstanceCapacity</Code>'
            b"<Message>We currently do not have sufficient g5.xlarge capacity in the Availability Zone you requested."
            b"</Message></Error></Errors><RequestID>trainctl-test</RequestID></Response>")


def test_a_zone_without_room_for_every_node_gives_back_what_started_there(project: Project, cloud: Cloud):
    rule = cloud.front.add(NoCapacityForNode("us-east-1a", 1))
    try:
        r = project.run("aws", "launch", "--yes", "--detach", "-t", "g5.xlarge", "--nodes", "2", "train.py")
    finally:
        cloud.front.rules.remove(rule)
    sid = re.search(r"Started session (\S+) on AWS", r.stdout).group(1)
    assert "us-east-1b" in r.stdout and "after 1 of 2 nodes; those were ended" in r.stdout, r.stdout
    states = {(i["Placement"]["AvailabilityZone"], tags_of(i)["trainctl:node"]): i["State"]["Name"]
              for i in cloud.instances(sid)}
    assert states == {("us-east-1a", "0"): "terminated", ("us-east-1b", "0"): "running",
                      ("us-east-1b", "1"): "running"}
    project.run("aws", "terminate", sid, "--yes")


@pytest.mark.parametrize(("args", "message"), [
    (("--nodes", "0"), "error: --nodes must be 1 or more, not 0."),
    (("--nodes", "2", "--spot", "--efa"), "error: --efa: g5.xlarge does not support EFA (its EfaSupported is false)."),
    (("--efa",), "error: --efa is for jobs over several machines."),
    (("--nodes", "2", "--max-restarts", "2"), "error: --max-restarts restarts one machine's part alone"),
    (("--nodes", "2", "--efa"), "error: --efa: g5.xlarge does not support EFA (its EfaSupported is false)."),
])
def test_bad_input_is_one_line_and_starts_nothing(project: Project, cloud: Cloud, placement: PlacementGroups,
                                                  args: tuple[str, ...], message: str):
    made, machines = len(placement.created), len(cloud.instances("*"))
    r = project.run("aws", "launch", "-t", "g5.xlarge", "--yes", "--detach", *args, "train.py", check=False)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), r.stderr
    assert any(line.startswith("hint:") for line in r.stderr.splitlines()), r.stderr
    assert "Traceback" not in r.stderr
    assert (len(placement.created), len(cloud.instances("*"))) == (made, machines)


def test_efa_asks_for_an_efa_interface_and_all_traffic_within_the_group(project: Project, cloud: Cloud):
    r = project.run("aws", "launch", "-t", "p4d.24xlarge", "--nodes", "2", "--efa", "--dry-run", "--json", "train.py",
                    check=False)
    # the account's 96 vCPUs of P quota hold one p4d.24xlarge, not two: the plan says so and stops
    assert r.returncode != 0 and "2 x p4d.24xlarge need 192" in r.stderr
    plan = json.loads(r.stdout)
    ops = {r["operation"]: r["params"] for r in plan["requests"] if "node" not in r}
    (ingress,) = ops["AuthorizeSecurityGroupIngress"]["IpPermissions"]
    (egress,) = ops["AuthorizeSecurityGroupEgress"]["IpPermissions"]
    assert ingress["IpProtocol"] == egress["IpProtocol"] == "-1"
    nodes = [r["params"] for r in plan["requests"] if "node" in r]
    assert len(nodes) == 2
    for params in nodes:
        (interface,) = params["NetworkInterfaces"]
        assert interface["InterfaceType"] == "efa" and interface["DeviceIndex"] == 0
        assert "SecurityGroupIds" not in params and "SubnetId" not in params  # they go on the interface


# ------------------------------------------------------------------ both machines, played here

def start_node(cloud: Cloud, instance_id: str, folder: Path, guard_log: Path, port: int,
               *options: str) -> tuple[Any, Any]:
    """One machine of the job: its own boot script's agent, in a folder of its own, with a fake
    IMDS that answers its instance id and its private address (loopback: both machines are here)."""
    from tests.conftest import clean_env
    from tests.servers import FakeIMDS, loopback_env
    from tests.test_aws_e2e import MACHINE_OPTIONS, agent_of

    folder.mkdir(parents=True)
    imds = FakeIMDS(instance_id=instance_id, region=REGION, local_ipv4="127.0.0.1").start()
    exports, command = agent_of(user_data(cloud, instance_id))
    env = loopback_env(clean_env(**exports), guard_log=guard_log, AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
    env.pop("AWS_EC2_METADATA_DISABLED")  # a machine reads IMDS
    process = subprocess.Popen([sys.executable, "-m", "trainctl", *command[1:], *MACHINE_OPTIONS,
                                "--rdzv-port", str(port), "--head-wait", "120", "--replace-wait", "120", *options],
                               cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, imds


@pytest.mark.slow
def test_a_node_never_guesses_the_head_it_gives_up_and_ends_its_machine(tmp_path: Path, cloud: Cloud,
                                                                        placement: PlacementGroups):
    from tests.test_aws_e2e import MACHINE_OPTIONS, agent_of, remote

    from .conftest import clean_env
    from .servers import FakeIMDS, loopback_env

    project = make_project(tmp_path / "demo", cloud)
    sid = project.launch("-t", "g5.xlarge", "--nodes", "2", "--max-hours", "1", "train.py")
    by_rank = {int(tags_of(i)["trainctl:node"]): i["InstanceId"] for i in cloud.instances(sid)}
    # a head of an earlier attempt is not this attempt's head
    remote(cloud, sid).publish_head(attempt=7, address="10.9.9.9", port=29400)
    imds = FakeIMDS(instance_id=by_rank[1], region=REGION).start()
    exports, command = agent_of(user_data(cloud, by_rank[1]))
    env = loopback_env(clean_env(**exports), guard_log=project.guard_log,
                       AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
    env.pop("AWS_EC2_METADATA_DISABLED")
    (tmp_path / "node1").mkdir()
    try:
        done = subprocess.run([sys.executable, "-m", "trainctl", *command[1:], *MACHINE_OPTIONS, "--head-wait", "2"],
                              cwd=tmp_path / "node1", env=env, capture_output=True, text=True, timeout=120)
    finally:
        imds.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "node 0 (the head) did not publish its address in 2 s" in done.stderr
    assert "10.9.9.9" not in done.stdout + done.stderr
    assert {i["InstanceId"]: i["State"]["Name"] for i in cloud.instances(sid)}[by_rank[1]] == "terminated"
    assert remote(cloud, sid).ended() is None  # a node other than the head never ends the session
    project.run("aws", "terminate", sid, "--yes")


FAST = ("--grace-period", "5")  # a tiny model's emergency checkpoint takes well under that


def play_job(cloud: Cloud, sid: str, attempt: int, tmp_path: Path, guard_log: Path, *,
             until: Any = None, first: int = 0) -> tuple[dict[int, str], dict[int, Any], dict[int, str]]:
    """Plays the machines of one attempt (node `first` boots first), calls `until()` once they
    run, and waits for both agents: (instance ids, processes, outputs) by node rank."""
    from tests.test_multinode import free_port

    by_rank = {int(tags_of(i)["trainctl:node"]): i["InstanceId"] for i in cloud.instances(sid)
               if tags_of(i)["trainctl:attempt"] == str(attempt)}
    port = free_port()
    nodes = {}
    outputs = {}
    try:
        for rank in (first, 1 - first):
            nodes[rank] = start_node(cloud, by_rank[rank], tmp_path / f"a{attempt}-node{rank}", guard_log, port)
        if until is not None:
            until(by_rank)
        for rank in (0, 1):
            outputs[rank] = nodes[rank][0].communicate(timeout=180)[0]
    finally:
        for process, imds in nodes.values():
            process.kill()
            imds.stop()
    return by_rank, {rank: n[0] for rank, n in nodes.items()}, outputs


@pytest.mark.slow
def test_a_lost_node_stops_the_job_everywhere_and_it_completes_on_as_many_new_machines(
        tmp_path: Path, cloud: Cloud, placement: PlacementGroups):
    from tests.conftest import REPO
    from tests.servers import wait_for
    from tests.test_aws_e2e import remote

    project = make_project(tmp_path / "demo", cloud)
    (project.root / "train.py").write_text((REPO / "tests" / "scripts" / "ddp_train.py").read_text())
    sid = project.launch("-t", "g5.xlarge", "--nodes", "2", "--nproc-per-node", "1", "--max-hours", "1",
                         "train.py", "--steps", "150", "--checkpoint-every", "5", "--step-delay", "0.05")
    stored = remote(cloud, sid)

    def lose_node_1(by_rank: dict[int, str]) -> None:
        wait_for(lambda: (stored.latest_checkpoint() or {}).get("step"), timeout_s=180, interval_s=0.2)
        cloud.ec2().terminate_instances(InstanceIds=[by_rank[1]])  # the test plays AWS losing the machine

    # the worker boots first: it waits for the head's address in storage, it never guesses one
    by_rank, processes, outputs = play_job(cloud, sid, 0, tmp_path, project.guard_log, until=lose_node_1, first=1)
    assert "waiting for the head's address" in outputs[1] and "joining the head at 127.0.0.1" in outputs[1]
    assert processes[0].returncode == 1, outputs[0][-4000:]
    assert f"node 1 of 2 ({by_rank[1]}) is terminated: stopping the job on every node" in outputs[0]
    assert f"trainctl aws resume {sid}" in outputs[0]
    # the worker's part stopped with the job (its rank agreed on the stop, or it saw the session end)
    assert processes[1].returncode in (0, 1) and "ending this machine" in outputs[1], outputs[1][-4000:]
    ended = stored.ended()
    assert ended["status"] == "failed" and f"node 1 of 2 ({by_rank[1]}) is terminated" in ended["reason"]
    latest = stored.latest_checkpoint()
    assert 0 < latest["step"] < 150  # the emergency checkpoint, when the ranks could still agree on it
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}

    # the job continues on two new machines, from the newest verified checkpoint, and completes
    resumed = project.run("aws", "resume", sid, "--yes", "--detach")
    (row,) = [line for line in resumed.stdout.splitlines() if line.startswith("  resume ")]
    assert f"(step {latest['step']}, " in row and "the newest verified checkpoint in storage" in row
    by_rank, processes, outputs = play_job(cloud, sid, 1, tmp_path, project.guard_log)
    for rank in (0, 1):
        assert processes[rank].returncode == 0, outputs[rank][-4000:]
    # node 0 holds global rank 0 (the static rendezvous): its agent synced what rank 0 wrote;
    # every rank started from the same checkpoint
    head_rank = json.loads((tmp_path / "a1-node0" / "project" / "rank0.json").read_text())
    worker_rank = json.loads((tmp_path / "a1-node1" / "project" / "rank1.json").read_text())
    assert (head_rank["is_main"], worker_rank["is_main"]) == (True, False)
    assert head_rank["start"] == worker_rank["start"] == latest["step"]
    assert stored.read_head()["attempt"] == 1 and stored.read_head()["address"] == "127.0.0.1"
    assert stored.ended()["reason"] == "training completed" and stored.latest_checkpoint()["step"] == 150
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}  # each machine ended itself
    # one session, one cost over the four machines; the laptop's look ends the session's network
    status = project.run("aws", "status", sid).stdout
    assert f"session {sid} on AWS {REGION}: completed" in status and "(4 machine" in status, status
    assert not cloud.ec2().describe_security_groups(
        Filters=[{"Name": "tag:trainctl:session", "Values": [sid]}])["SecurityGroups"]
    assert not [g for g in placement.groups if sid in g]


def test_the_nodes_watch_names_the_first_machine_gone_and_tells_once():
    import queue

    from trainctl.agent.nodes import NODE_LOST, NodesWatch

    machines = {0: ("i-head", "running"), 1: ("i-one", "running"), 2: ("i-two", "pending")}
    head = NodesWatch(lambda: machines, 3)
    assert head.poll() is None  # a machine still starting is not lost
    machines[2] = ("i-two", "shutting-down")
    lost = head.poll()
    assert (lost.kind, lost.action) == (NODE_LOST, "node 2 of 3 (i-two) is shutting-down")
    del machines[1]  # EC2 no longer lists it
    assert head.poll().action == "node 1 of 3 (?) is missing"
    # the other nodes watch the head's machine only
    worker = NodesWatch(lambda: machines, 3, ranks=(0,))
    assert worker.poll() is None
    machines[0] = ("i-head", "terminated")
    assert worker.poll().action == "node 0 of 3 (i-head) is terminated"

    def failing() -> dict[int, tuple[str, str]]:
        raise OSError("could not describe the job's machines (throttled)")

    notices: queue.SimpleQueue = queue.SimpleQueue()
    flaky = NodesWatch(failing, 2, interval_s=0.01)
    flaky.start(notices)
    try:
        from tests.servers import wait_for

        wait_for(lambda: flaky.errors >= 3, timeout_s=30, interval_s=0.01)
    finally:
        flaky.stop()
    assert notices.empty() and "throttled" in flaky.last_error  # a failed look is no lost node
    gone = NodesWatch(lambda: {0: ("i-head", "running")}, 2, interval_s=0.01)
    gone.start(notices)
    try:
        assert notices.get(timeout=30).action == "node 1 of 2 (?) is missing"
    finally:
        gone.stop()
    assert notices.empty()  # told once


def spot_pair(tmp_path: Path, cloud: Cloud, *, steps: int) -> tuple[Any, ...]:
    """`aws launch --nodes 2 --spot` of the DDP test script, and an agent playing each machine."""
    from tests.conftest import REPO
    from tests.test_aws_e2e import remote
    from tests.test_multinode import free_port

    project = make_project(tmp_path / "demo", cloud)
    (project.root / "train.py").write_text((REPO / "tests" / "scripts" / "ddp_train.py").read_text())
    sid = project.launch("-t", "g5.xlarge", "--nodes", "2", "--spot", "--nproc-per-node", "1", "--max-hours", "1",
                         "train.py", "--steps", str(steps), "--checkpoint-every", "5", "--step-delay", "0.05")
    ids = project.record(sid)["handle"]["ids"]
    first = {int(tags_of(i)["trainctl:node"]): i["InstanceId"] for i in cloud.instances(sid)}
    port = free_port()
    machines = {"head": start_node(cloud, first[0], tmp_path / "node0", project.guard_log, port, *FAST),
                "node1": start_node(cloud, first[1], tmp_path / "node1", project.guard_log, port, *FAST)}
    return project, sid, remote(cloud, sid), ids, first, port, machines


# two rounds of agents on two CPUs shared with other work: more than the default limit
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_reclaimed_spot_node_is_replaced_by_its_fleet_and_the_job_resumes_by_itself(
        tmp_path: Path, cloud: Cloud, placement: PlacementGroups):
    from tests.aws_fixtures import reclaim
    from tests.servers import wait_for

    project, sid, stored, ids, first, port, machines = spot_pair(tmp_path, cloud, steps=150)
    outputs: dict[str, str] = {}
    try:
        wait_for(lambda: (stored.latest_checkpoint() or {}).get("step"), timeout_s=180, interval_s=0.2)
        # the test plays AWS: it reclaims node 1 (its agent is told to stop, as the machine goes)...
        reclaim(cloud, first[1])
        machines["node1"][0].terminate()
        outputs["node1"] = machines["node1"][0].communicate(timeout=120)[0]
        # ...and node 1's fleet starts its replacement from node 1's launch template
        (replacement,) = cloud.ec2().run_instances(
            MinCount=1, MaxCount=1, InstanceMarketOptions={"MarketType": "spot"},
            LaunchTemplate={"LaunchTemplateId": ids["launch_template_ids"][1], "Version": "1"})["Instances"]
        new = replacement["InstanceId"]
        machines["new"] = start_node(cloud, new, tmp_path / "node1-new", project.guard_log, port, *FAST)
        for name in ("head", "new"):
            outputs[name] = machines[name][0].communicate(timeout=300)[0]
    finally:
        for process, imds in machines.values():
            process.kill()
            imds.stop()
    head, worker = machines["head"][0], machines["new"][0]
    assert head.returncode == 0, outputs["head"][-5000:]
    assert worker.returncode == 0, outputs["new"][-5000:]
    assert f"node 1 of 2 ({first[1]}) is" in outputs["head"] and "waiting for its replacement" in outputs["head"]
    assert f"round 1: every node checked in (node 1 {new}); starting" in outputs["head"]
    assert "trainctl aws resume" not in outputs["head"]
    assert "checked in for round 1" in outputs["new"] and "joining the head at 127.0.0.1" in outputs["new"]
    # both nodes of round 1 started from the same checkpoint: the newest in storage when it began
    head_rank = json.loads((tmp_path / "node0" / "project" / "rank0.json").read_text())
    worker_rank = json.loads((tmp_path / "node1-new" / "project" / "rank1.json").read_text())
    assert (head_rank["is_main"], worker_rank["is_main"]) == (True, False)
    assert 0 < head_rank["start"] == worker_rank["start"] < 150
    assert stored.ended()["reason"] == "training completed" and stored.latest_checkpoint()["step"] == 150
    head_json = stored.read_head()
    assert (head_json["round"], head_json["state"], head_json["machines"]) == (1, "ready", {"1": new})
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}  # each machine ended itself
    fleets = cloud.ec2().describe_fleets(FleetIds=ids["fleet_ids"])["Fleets"]
    assert all(f["FleetState"] != "active" for f in fleets)  # the head's end ended every node's fleet
    # one session, completed, with every machine it ran on (node 1 twice) in its cost
    status = project.run("aws", "status", sid).stdout
    assert f"session {sid} on AWS {REGION}: completed" in status and "(3 machine" in status, status
    record = project.record(sid)
    assert record["status"] == "completed"
    assert {m["id"] for m in record["cloud"]["machines"]} == {first[0], first[1], new}
    shown = project.run("sessions", "show", sid).stdout
    assert f"{first[1]} (node 1, g5.xlarge spot, terminated)" in shown and f"{new} (node 1, g5.xlarge spot," in shown
    assert [p.name for p in (project.root / ".trainctl" / "sessions").iterdir()] == [sid]
    assert templates_of(cloud, sid) == []
    assert not cloud.ec2().describe_security_groups(
        Filters=[{"Name": "tag:trainctl:session", "Values": [sid]}])["SecurityGroups"]


# two rounds of agents on two CPUs shared with other work: more than the default limit
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_reclaimed_spot_head_is_replaced_and_the_other_nodes_wait_for_it(
        tmp_path: Path, cloud: Cloud, placement: PlacementGroups):
    from tests.aws_fixtures import reclaim
    from tests.servers import wait_for

    project, sid, stored, ids, first, port, machines = spot_pair(tmp_path, cloud, steps=80)
    outputs: dict[str, str] = {}
    try:
        wait_for(lambda: (stored.latest_checkpoint() or {}).get("step"), timeout_s=180, interval_s=0.2)
        # the test plays AWS: the head gets its spot interruption notice, then the machine goes...
        machines["head"][1].set_spot_action("terminate", in_s=30)
        outputs["head"] = machines["head"][0].communicate(timeout=120)[0]
        reclaim(cloud, first[0])
        # ...and node 0's fleet starts its replacement, which boots as the head
        (replacement,) = cloud.ec2().run_instances(
            MinCount=1, MaxCount=1, InstanceMarketOptions={"MarketType": "spot"},
            LaunchTemplate={"LaunchTemplateId": ids["launch_template_ids"][0], "Version": "1"})["Instances"]
        new = replacement["InstanceId"]
        machines["new"] = start_node(cloud, new, tmp_path / "node0-new", project.guard_log, port, *FAST)
        for name in ("new", "node1"):
            outputs[name] = machines[name][0].communicate(timeout=300)[0]
    finally:
        for process, imds in machines.values():
            process.kill()
            imds.stop()
    assert machines["head"][0].returncode == 75, outputs["head"][-5000:]  # left to the platform, as a preemption
    assert machines["new"][0].returncode == 0, outputs["new"][-5000:]
    assert machines["node1"][0].returncode == 0, outputs["node1"][-5000:]
    # the worker kept its machine: it waited for the new head's round, checked in and joined it
    assert "round 0 stopped; waiting for the head's next round" in outputs["node1"], outputs["node1"][-5000:]
    assert "checked in for round 1" in outputs["node1"]
    assert f"round 1: every node checked in (node 1 {first[1]}); starting" in outputs["new"]
    head_rank = json.loads((tmp_path / "node0-new" / "project" / "rank0.json").read_text())
    worker_rank = json.loads((tmp_path / "node1" / "project" / "rank1.json").read_text())
    assert 0 < head_rank["start"] == worker_rank["start"] < 80
    assert stored.ended()["reason"] == "training completed" and stored.latest_checkpoint()["step"] == 80
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}
    status = project.run("aws", "status", sid).stdout
    assert f"session {sid} on AWS {REGION}: completed" in status and "(3 machine" in status, status
