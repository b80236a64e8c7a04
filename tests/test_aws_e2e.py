"""AWS end to end, no account: `trainctl aws launch` against moto's server, then the test plays
the machine. It reads the boot script EC2 holds for the instance and runs its agent command (with
its exported variables) in a temp folder, on this interpreter, with a fake IMDSv2 answering
that instance's id; the agent trains, syncs to the bucket and ends its own machine through
EC2. A spot reclaim is played too: an IMDS notice, then the test terminates the instance and
starts the replacement AWS would start, whose agent continues from the bucket."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.aws_fixtures import BUCKET, REGION, Cloud, Project, make_project, reclaim
from tests.servers import FakeIMDS, loopback_env, wait_for
from tests.test_interruptions import assert_same_training_state

from .conftest import EXAMPLES, REPO, clean_env, run_cli, write_entry_point

pytest.importorskip("trainctl.agent.agent", reason="the machine's side, trainctl agent, is not in this tree yet")

ARGS = ("--epochs", "3", "--steps-per-epoch", "20")
# how fast a played machine syncs and watches (a real one: every 10 s and 5 s)
MACHINE_OPTIONS = ("--python", sys.executable, "--setup", "none", "--sync-interval", "0.5", "--heartbeat-interval",
                   "1", "--watch-interval", "0.2", "--lease-wait", "0", "--no-preflight")


def boot_script(cloud: Cloud, instance_id: str) -> str:
    """The user data EC2 holds for the instance (what the machine would run at boot)."""
    answer = cloud.ec2().describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(answer["UserData"]["Value"]).decode()


def agent_of(script: str) -> tuple[dict[str, str], list[str]]:
    """The boot script's exported variables and its agent command line."""
    exports = dict(shlex.split(line[len("export "):])[0].split("=", 1)
                   for line in script.splitlines() if line.startswith("export "))
    (line,) = [line for line in script.splitlines() if " agent " in line and line.endswith(" &")]
    return exports, shlex.split(line[:-2])


class Machine:
    """One machine the test plays: the boot script's agent, in a folder of its own."""

    def __init__(self, cloud: Cloud, instance_id: str, folder: Path, guard_log: Path) -> None:
        self.instance_id = instance_id
        self.folder = folder
        folder.mkdir(parents=True)
        self.imds = FakeIMDS(instance_id=instance_id, region=REGION).start()
        exports, command = agent_of(boot_script(cloud, instance_id))
        assert Path(command[0]).name == "trainctl" and command[1] == "agent"
        env = loopback_env(clean_env(**exports), guard_log=guard_log,
                           AWS_EC2_METADATA_SERVICE_ENDPOINT=self.imds.endpoint)
        env.pop("AWS_EC2_METADATA_DISABLED")  # a machine reads IMDS
        self.process = subprocess.Popen([sys.executable, "-m", "trainctl", *command[1:], *MACHINE_OPTIONS],
                                        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        try:
            out, _ = self.process.communicate(timeout=timeout)
        finally:
            self.process.kill()
            self.imds.stop()
        return self.process.returncode, out


def session_of(project: Project, proc: subprocess.Popen[str] | None = None) -> str:
    """The id of the session `aws launch` created, once its machine was asked for."""
    def launched() -> str | None:
        folder = project.root / ".trainctl" / "sessions"
        for path in sorted(folder.glob("*/session.json")) if folder.exists() else []:
            if json.loads(path.read_text()).get("handle"):
                return path.parent.name
        assert proc is None or proc.poll() is None, proc.communicate()[0]
        return None

    return wait_for(launched, timeout_s=120, interval_s=0.1)


def remote(cloud: Cloud, session: str) -> Any:
    from trainctl.storage.remote import RemoteSession
    from trainctl.storage.s3 import S3Store

    return RemoteSession(S3Store(BUCKET, f"trainctl/demo/{session}", endpoint_url=cloud.moto.endpoint_url,
                                 region=REGION))


def reference_state(tmp_path: Path) -> dict[str, Any]:
    """The same training, uninterrupted, with trainctl local: its final checkpoint."""
    folder = tmp_path / "reference"
    folder.mkdir()
    (folder / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    done = run_cli(["local", "--no-preflight", str(EXAMPLES / "quickstart.py"), *ARGS], folder, timeout=300)
    assert done.returncode == 0, done.stderr
    return torch.load(sorted((folder / "checkpoints").glob("*/ckpt-step*.pt"))[-1], weights_only=True)


def quickstart_project(tmp_path: Path, cloud: Cloud) -> Project:
    project = make_project(tmp_path / "demo", cloud)
    (project.root / "train.py").write_text((EXAMPLES / "quickstart.py").read_text())
    return project


@pytest.mark.slow
def test_launch_follows_the_machine_to_the_end_and_the_machine_ends_itself(tmp_path: Path, cloud: Cloud):
    project = quickstart_project(tmp_path, cloud)
    environ = loopback_env(clean_env(COLUMNS="200"), guard_log=project.guard_log)
    launcher = subprocess.Popen([sys.executable, "-m", "trainctl", "aws", "launch", "-t", "g5.xlarge", "--yes",
                                 "--max-hours", "2", "train.py", "--epochs", "2", "--steps-per-epoch", "10"],
                                cwd=project.root, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        sid = session_of(project, launcher)
        (instance,) = cloud.instances(sid)
        machine = Machine(cloud, instance["InstanceId"], tmp_path / "machine", project.guard_log)
        code, machine_out = machine.finish()
        out, err = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    assert code == 0, machine_out
    # what the laptop showed while following: the script's own lines and the agent's, then the end
    assert launcher.returncode == 0, out[-3000:] + err[-3000:]
    assert "epoch 2/2 step 20/20" in out and "[trainctl agent] fetching the code bundle" in out
    assert "completed" in err
    # the machine ended itself through EC2; nothing of the session bills any more
    assert [i["State"]["Name"] for i in cloud.instances(sid)] == ["terminated"]
    assert remote(cloud, sid).ended()["reason"] == "training completed"
    record = project.record(sid)
    assert record["status"] == "completed" and record["summary"]["last"]["loss"] > 0
    shown = project.run("sessions", "show", sid).stdout
    assert re.search(r"cost so far +\$0\.\d\d \(1 machine;", shown)
    listing = project.run("aws", "list").stdout
    assert sid not in listing.split("Possible leaks")[-1] or "No leaks found." in listing
    logs = project.run("sessions", "logs", sid).stdout
    assert logs == (project.root / ".trainctl" / "sessions" / sid / "output.log").read_text()
    assert logs.count("epoch 2/2 step 20/20") == 1
    # its checkpoints come down verified, with their manifests, for checkpoint list/info/resume
    pulled = project.run("sessions", "pull", sid, "--checkpoints").stdout
    assert f"Session {sid} (aws) is up to date here: completed" in pulled and "checkpoint(s) fetched" in pulled
    folder = project.root / ".trainctl" / "sessions" / sid / "checkpoints"
    listed = project.run("checkpoint", "list", str(folder)).stdout
    assert "ckpt-step00000020.pt" in listed and "valid" in listed
    assert "0 checkpoint(s) fetched" in project.run("sessions", "pull", sid, "--checkpoints").stdout


@pytest.mark.slow
def test_a_spot_reclaim_mid_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path: Path, cloud: Cloud):
    project = quickstart_project(tmp_path, cloud)
    sid = project.launch("-t", "g5.xlarge", "--spot", "--max-hours", "2", "train.py", *ARGS, "--step-delay", "0.1")
    ids = project.record(sid)["handle"]["ids"]
    (first,) = cloud.instances(sid)
    storage = remote(cloud, sid)
    machine = Machine(cloud, first["InstanceId"], tmp_path / "spot-1", project.guard_log)
    try:
        wait_for(lambda: (storage.latest_checkpoint() or {}).get("step") == 20 or machine.process.poll() is not None,
                 timeout_s=240, interval_s=0.2)
        assert machine.process.poll() is None, machine.process.communicate()[0]
        machine.imds.set_spot_action("terminate", in_s=120)  # AWS's two-minute notice
    finally:
        code, out = machine.finish()
    assert code == 75, out  # preempted: the platform ends this machine, not the agent
    assert storage.read_session()["status"] == "preempted" and storage.ended() is None
    assert [i["State"]["Name"] for i in cloud.instances(sid)] == ["running"]

    # The test plays AWS: the machine is reclaimed, the maintain fleet starts its replacement.
    reclaim(cloud, first["InstanceId"])
    replacement = cloud.ec2().run_instances(
        MinCount=1, MaxCount=1, InstanceMarketOptions={"MarketType": "spot"},
        LaunchTemplate={"LaunchTemplateId": ids["launch_template_id"], "Version": "1"})["Instances"][0]
    second = Machine(cloud, replacement["InstanceId"], tmp_path / "spot-2", project.guard_log)
    code, out = second.finish()
    assert code == 0, out
    assert "resuming from ckpt-step" in out

    final = torch.load(storage.fetch_checkpoint(tmp_path / "final"), weights_only=True)
    assert_same_training_state(final, reference_state(tmp_path))
    # the second machine ended the session: fleet deleted (no third machine), itself terminated,
    # the launch template gone
    assert cloud.ec2().describe_fleets(FleetIds=[ids["fleet_id"]])["Fleets"][0]["FleetState"].startswith("deleted")
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}
    assert cloud.ec2().describe_launch_templates(
        Filters=[{"Name": "tag:trainctl:session", "Values": [sid]}])["LaunchTemplates"] == []
    status = project.run("aws", "status", sid).stdout
    assert f"session {sid} on AWS {REGION}: completed" in status
    record = project.record(sid)
    assert [m["market"] for m in record["cloud"]["machines"]] == ["spot", "spot"]
    listing = json.loads(project.run("aws", "list", "--json").stdout)
    assert [leak for leak in listing[0]["leaks"] if leak["session_id"] == sid] == []



SECRET_SCRIPT = """\
import hashlib, os
import trainctl
run = trainctl.init()
print("secret digest", hashlib.sha256(os.environ.get("HF_TOKEN", "").encode()).hexdigest()[:16])
run.log({"loss": 1.0}, step=1)
run.finish()
"""


@pytest.mark.slow
def test_a_forwarded_secret_reaches_the_script_through_ssm_and_is_recorded_nowhere(tmp_path: Path, cloud: Cloud):
    """`aws launch --secret HF_TOKEN` puts the value in SSM; the machine's agent reads it with the
    instance role into the script's environment alone: not in user data, output, events, storage,
    the machine's folder or the laptop's records."""
    import hashlib

    project = make_project(tmp_path / "demo", cloud)
    (project.root / "secret.py").write_text(SECRET_SCRIPT)
    value = "hf_" + os.urandom(12).hex()
    sid = project.launch("-t", "g5.xlarge", "--max-hours", "1", "--secret", "HF_TOKEN", "secret.py", HF_TOKEN=value)
    parameter = cloud.moto.client("ssm").get_parameter(Name="/trainctl/demo/HF_TOKEN", WithDecryption=True)
    assert parameter["Parameter"]["Type"] == "SecureString" and parameter["Parameter"]["Value"] == value
    (instance,) = cloud.instances(sid)
    assert value not in boot_script(cloud, instance["InstanceId"])
    machine = Machine(cloud, instance["InstanceId"], tmp_path / "machine", project.guard_log)
    code, out = machine.finish()
    assert code == 0, out
    storage = remote(cloud, sid)
    assert f"secret digest {hashlib.sha256(value.encode()).hexdigest()[:16]}" in storage.read_output()
    assert "1 secret(s) for the script: HF_TOKEN" in out and value not in out
    assert storage.read_session()["status"] == "completed"
    # monitor brings the session over through its backend as it looks (nothing else did yet)
    monitored = project.run("monitor", sid, "--json")
    assert json.loads(monitored.stdout)["status"] == "completed", monitored.stdout
    pulled = project.run("sessions", "pull", sid, "--checkpoints")
    shown = project.run("sessions", "show", sid)
    assert value not in monitored.stdout + pulled.stdout + pulled.stderr + shown.stdout + shown.stderr
    s3 = cloud.moto.client("s3")
    for key in cloud.keys("trainctl/"):
        assert value.encode() not in s3.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key
    for path in tmp_path.rglob("*"):  # the laptop's project and records, the machine's folder
        if path.is_file():
            assert value.encode() not in path.read_bytes(), path


def readme_aws_commands() -> list[str]:
    """The `trainctl ...` lines of README.md's AWS section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## AWS\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
        for line in block.splitlines():
            command = re.split(r"\s{2,}#", line)[0].strip()
            if command.startswith("trainctl "):
                commands.append(command)
    return commands


@pytest.mark.slow
def test_the_readme_aws_section_works_as_written(tmp_path: Path, cloud: Cloud):
    """Every command of the AWS section, in order, against moto; the test plays each machine
    (and SSM's delivery of the stop request to the agent)."""
    commands = readme_aws_commands()
    assert [c.split()[1:3] for c in commands][:3] == [["aws", "setup"], ["aws", "setup"], ["aws", "launch"]]
    root = tmp_path / "readme"
    (root / "examples").mkdir(parents=True)
    (root / "examples" / "quickstart.py").write_text((EXAMPLES / "quickstart.py").read_text())
    (root / "trainctl.toml").write_text(f'[aws]\nendpoint_url = "{cloud.front.url}"\n')
    guard_log = tmp_path / "netguard.log"
    bin_dir = write_entry_point(tmp_path / "bin")
    env = loopback_env(clean_env(COLUMNS="200", PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]])),
                       guard_log=guard_log)
    machines: list[Machine] = []
    ssm = cloud.moto.client("ssm")

    def newest_instance() -> str:
        sid = sorted(p.name for p in (root / ".trainctl" / "sessions").iterdir())[-1]
        return cloud.instances(sid)[-1]["InstanceId"]

    for command in commands:
        proc = subprocess.Popen(["bash", "-c", command], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if command.startswith("trainctl aws stop"):
            # SSM Run Command delivers `kill -TERM $(cat agent.pid)` on the machine: the test does
            wait_for(lambda: ssm.list_commands(InstanceId=machines[-1].instance_id)["Commands"], timeout_s=120)
            machines[-1].process.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "Traceback" not in err, f"{command}\n{out[-3000:]}\n{err[-3000:]}"
        assert not guard_log.exists(), guard_log.read_text()
        if "--detach" in command:  # a machine was asked for: the test boots it
            machines.append(Machine(cloud, newest_instance(), tmp_path / f"machine-{len(machines)}", guard_log))
        if command.startswith("trainctl aws stop"):
            assert machines[-1].finish()[0] == 75  # stopped like a preemption, after its checkpoint
            assert "stopped" in out
    code, out = machines[-1].finish()
    assert code == 0, out
    sid = sorted(p.name for p in (root / ".trainctl" / "sessions").iterdir())[-1]
    data = json.loads((root / ".trainctl" / "sessions" / sid / "session.json").read_text())
    assert data["status"] == "completed" and len(data["attempts"]) == 2
    assert {i["State"]["Name"] for i in cloud.instances(sid)} == {"terminated"}
