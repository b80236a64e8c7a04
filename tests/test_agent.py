"""`trainctl agent` end to end, on this machine: each test plays a rented machine in a temp folder
(the agent a real subprocess, moto's S3 server on 127.0.0.1 as storage, a fake IMDSv2 for spot
notices, the machine's end a recorded shell command) and checks what a user would see in the
bucket and on the machine."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from trainctl.storage import build_bundle, build_wheel
from trainctl.storage.remote import RemoteSession

from .conftest import EXAMPLES, clean_env, run_cli
from .servers import loopback_env, make_s3_store, wait_for
from .test_interruptions import assert_same_training_state

TRAIN = ["--epochs", "2", "--steps-per-epoch", "20"]


@dataclass
class Cloud:
    """One session in a bucket on moto, the project it was launched from, and how to play machines."""

    tmp: Path
    project: Path
    bucket: str
    endpoint: str  # what agents talk to (the fault proxy, so requests are logged)
    session_id: str
    remote: RemoteSession

    def machine(self, name: str) -> Path:
        return self.tmp / "machines" / name

    def ends(self, name: str) -> list[str]:
        """The recorded calls of the end hook on machine `name`."""
        path = self.machine(name) / "ended-machine.log"
        return path.read_text().splitlines() if path.exists() else []

    def command(self, name: str, *extra: str, script: tuple[str, ...] = ("train.py", *TRAIN)) -> list[str]:
        machine = self.machine(name)
        machine.mkdir(parents=True, exist_ok=True)
        end = f"printf '%s\\n' \"$TRAINCTL_END_REASON\" >> {shlex.quote(str(machine / 'ended-machine.log'))}"
        return [sys.executable, "-m", "trainctl", "agent", "--storage", f"s3://{self.bucket}/root",
                "--project", "proj", "--session", self.session_id, "--endpoint-url", self.endpoint,
                "--region", "us-east-1", "--machine-dir", str(machine), "--python", sys.executable,
                "--setup", "none", "--sync-interval", "0.5", "--heartbeat-interval", "1", "--lease-ttl", "5",
                "--lease-wait", "0", "--end", "command", "--end-command", end, "--no-preflight", *extra,
                *script]

    def start(self, name: str, *extra: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(name, *extra, **kw), cwd=self.machine(name), env=env or loopback_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, name: str, *extra: str, env: dict[str, str] | None = None, timeout: float = 240,
            **kw) -> subprocess.CompletedProcess[str]:
        self.machine(name).mkdir(parents=True, exist_ok=True)
        return subprocess.run(self.command(name, *extra, **kw), cwd=self.machine(name), env=env or loopback_env(),
                              capture_output=True, text=True, timeout=timeout)

    def store_bytes(self, key: str) -> bytes:
        return self.remote.store.get_bytes(key)[0]

    def segment_keys(self, folder: str) -> list[str]:
        return [o.key for o in self.remote.store.list(folder)]

    def machine_id(self, name: str) -> str:
        return json.loads((self.machine(name) / "boot.json").read_text())["machine"]["id"]


def publish(project: Path, remote: RemoteSession, out: Path) -> None:
    """What a launcher does before starting a machine: the bundle and the wheel, then bundle.json."""
    bundle = build_bundle(project, out / "bundle.tar.gz")
    wheel, _ = build_wheel(out)
    remote.put_code(bundle, wheel)


def make_cloud(tmp_path: Path, moto_server, bucket: str, endpoint: str, files: dict[str, str] | None = None) -> Cloud:
    project = tmp_path / "laptop-project"
    project.mkdir()
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    (project / "train.py").write_text((EXAMPLES / "quickstart.py").read_text())
    for name, text in (files or {}).items():
        (project / name).write_text(text)
    session_id = "20260101-000000-abcdef"
    store = make_s3_store(moto_server.endpoint_url, bucket, tmp_path / "laptop-uploads",
                          prefix=f"root/proj/{session_id}")
    remote = RemoteSession(store)
    publish(project, remote, tmp_path / "laptop-out")
    return Cloud(tmp_path, project, bucket, endpoint, session_id, remote)


@pytest.fixture
def cloud(tmp_path, moto_server, s3_bucket, fault_proxy) -> Cloud:
    return make_cloud(tmp_path, moto_server, s3_bucket, fault_proxy.url)


def reference_run(tmp_path: Path, *args: str) -> dict:
    """The same training, uninterrupted, with `trainctl local` on this machine: its final state."""
    project = tmp_path / "reference"
    project.mkdir()
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    done = run_cli(["local", "--no-preflight", str(EXAMPLES / "quickstart.py"), *args], project, timeout=300)
    assert done.returncode == 0, done.stderr
    newest = sorted((project / "checkpoints").glob("*/ckpt-step*.pt"))[-1]
    return torch.load(newest, weights_only=True)


def remote_state(cloud: Cloud, dest: Path) -> dict:
    return torch.load(cloud.remote.fetch_checkpoint(dest), weights_only=True)


def writes(proxy, session_id: str) -> list[tuple[str, str]]:
    """The writes to the session's objects that the store applied, in order: a PUT of a whole
    object, or the completion of a multipart upload."""
    marker = f"/root/proj/{session_id}/"
    return [(r.operation, r.path.split(marker, 1)[1]) for r in list(proxy.log)
            if r.status == 200 and marker in r.path
            and ((r.method == "PUT" and "uploadId=" not in r.query) or r.operation == "CompleteMultipartUpload")]


def local_session(machine: Path) -> Path:
    found = sorted((machine / "project" / ".trainctl" / "sessions").iterdir())
    assert len(found) == 1
    return found[0]


# --- the whole story ---------------------------------------------------------------------------------

def test_agent_fetches_trains_and_uploads_checkpoint_manifest_latest_in_that_order(cloud, fault_proxy):
    done = cloud.run("m1", script=("train.py", "--epochs", "3", "--steps-per-epoch", "10", "--step-delay", "0.1"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert cloud.ends("m1") == ["training completed"]

    # every checkpoint that went up: the file (whole), then its manifest, then latest.json
    order = writes(fault_proxy, cloud.session_id)
    uploaded = [path.split("/", 1)[1] for op, path in order if path.startswith("checkpoints/") and path.endswith(".pt")]
    assert "ckpt-step00000030.pt" in uploaded and len(uploaded) >= 2
    for name in uploaded:
        file_at = next(i for i, (_, p) in enumerate(order) if p == f"checkpoints/{name}")
        manifest_at = next(i for i, (_, p) in enumerate(order) if p == f"checkpoints/{name}.json")
        latest_at = next(i for i, (_, p) in enumerate(order) if p == "latest.json" and i > manifest_at)
        assert file_at < manifest_at < latest_at
    latest = cloud.remote.latest_checkpoint()
    assert latest["file"] == "ckpt-step00000030.pt" and latest["step"] == 30

    # the events log and the output in storage are the machine's, whole
    session_dir = local_session(cloud.machine("m1"))
    assert b"".join(cloud.store_bytes(p) for p in cloud.segment_keys("events/")) == (session_dir / "events.jsonl").read_bytes()
    events = cloud.remote.read_events()
    assert [e["step"] for e in events if e["kind"] == "metric" and "loss" in e["values"]] == list(range(1, 31))
    phases = [e["phase"] for e in events if e["kind"] == "startup"]
    assert phases == ["boot", "bundle", "environment", "first_step"]
    output = cloud.remote.read_output()
    assert "epoch 3/3 step 30/30" in output and "[trainctl agent] fetching the code bundle" in output

    record = cloud.remote.read_session()
    assert record["status"] == "completed" and record["machine"]["boot"] == 1
    assert cloud.remote.ended()["reason"] == "training completed"
    beat = cloud.remote.read_heartbeat()
    assert beat["released"] and beat["step"] == 30 and beat["latest"] == "ckpt-step00000030.pt"

    # from the laptop: the session pulled, its time to first step shown phase by phase
    laptop = cloud.tmp / "laptop"
    laptop.mkdir()
    (laptop / "trainctl.toml").write_text(f'[cloud]\nendpoint_url = "{cloud.endpoint}"\n')
    env = loopback_env(clean_env())
    assert run_cli(["sessions", "pull", f"s3://{cloud.bucket}/root/proj/{cloud.session_id}"], laptop,
                   env=env).returncode == 0
    shown = run_cli(["sessions", "show", cloud.session_id], laptop, env=env).stdout
    start = next(line for line in shown.splitlines() if line.startswith("start "))
    assert "bundle " in start and "environment " in start and "after the machine started" in start


@pytest.mark.slow
def test_spot_notice_uploads_the_emergency_checkpoint_and_a_new_machine_ends_bit_identical(cloud, imds, tmp_path):
    args = ("--epochs", "3", "--steps-per-epoch", "20")
    env = loopback_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
    first = cloud.start("spot", "--watch", "aws", "--watch-interval", "0.2", env=env,
                        script=("train.py", *args, "--step-delay", "0.1"))
    try:
        wait_for(lambda: (cloud.remote.latest_checkpoint() or {}).get("step") == 20 or first.poll() is not None,
                 timeout_s=180, interval_s=0.2)
        assert first.poll() is None, first.communicate()[0]
        notice = imds.set_spot_action("terminate", in_s=120)
        out, _ = first.communicate(timeout=150)
    finally:
        first.kill()
    deadline = time.mktime(time.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert first.returncode == 75, out
    latest = cloud.remote.latest_checkpoint()
    # the emergency checkpoint (or, when the notice found one just written, that one) went up
    newest = max((cloud.machine("spot") / "project" / "checkpoints").glob("*/*.pt"), key=lambda p: p.stat().st_mtime)
    assert latest["file"] == newest.name and 20 < latest["step"] < 60
    assert latest["t"] < deadline  # moved before the machine would have gone
    assert cloud.ends("spot") == []  # the platform ends a preempted machine, not the agent
    assert cloud.remote.ended() is None
    assert cloud.remote.read_session()["status"] == "preempted"
    assert [e["action"] for e in cloud.remote.read_events() if e["kind"] == "notice"] == ["terminate"]

    # the replacement machine resumes from the bucket and finishes
    second = cloud.run("replacement", script=("train.py", *args))
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming from {latest['file']}" in second.stderr
    assert cloud.remote.boots() == 2 and cloud.ends("replacement") == ["training completed"]
    phases = [e["phase"] for e in cloud.remote.read_events() if e["kind"] == "startup"]
    assert phases.count("checkpoint") == 1 and phases.count("first_step") == 2
    assert_same_training_state(remote_state(cloud, tmp_path / "final"), reference_run(tmp_path, *args))


def test_sigterm_on_ec2_is_a_stop_request_that_ends_the_machine_but_not_the_session(cloud, imds):
    env = loopback_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
    proc = cloud.start("stop", "--watch", "aws", "--watch-interval", "0.2", env=env,
                       script=("train.py", "--epochs", "3", "--steps-per-epoch", "20", "--step-delay", "0.1"))
    try:
        wait_for(lambda: (cloud.remote.read_heartbeat() or {}).get("step") or proc.poll() is not None, timeout_s=120,
                 interval_s=0.2)
        proc.send_signal(signal.SIGTERM)  # what `trainctl aws stop` sends through SSM
        out, _ = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 75, out  # like a preemption, for the launcher that asked
    assert cloud.ends("stop") == ["stopped on request"]  # and the machine ends itself all the same
    assert cloud.remote.ended() is None  # the session can be resumed
    assert cloud.remote.read_session()["status"] == "stopped"
    newest = max((cloud.machine("stop") / "project" / "checkpoints").glob("*/*.pt"), key=lambda p: p.stat().st_mtime)
    assert cloud.remote.latest_checkpoint()["file"] == newest.name


@pytest.mark.slow
def test_upload_failures_are_retried_and_nothing_is_lost(cloud, fault_proxy, tmp_path):
    # a 20 MB checkpoint goes up in two parts: the second part's connection drops once, the
    # file's first PUTs fail with 500s, a segment write and latest.json fail once each
    dropped = fault_proxy.drop(method="PUT", query="partNumber=2", times=1)
    failed_part = fault_proxy.fail(method="PUT", path=r"/checkpoints/ckpt-[^/]*\.pt$", query="partNumber=1", times=2)
    failed_events = fault_proxy.fail(method="PUT", path=r"/events/", times=3)
    failed_latest = fault_proxy.fail(method="PUT", path=r"/latest\.json$", times=1)
    done = cloud.run("flaky", script=("train.py", "--epochs", "2", "--steps-per-epoch", "10", "--hidden", "80000",
                                      "--step-delay", "0.2"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (dropped.applied, failed_part.applied, failed_events.applied, failed_latest.applied) == (1, 2, 3, 1)
    session_dir = local_session(cloud.machine("flaky"))
    final = sorted((cloud.machine("flaky") / "project" / "checkpoints").glob("*/ckpt-step00000020.pt"))[0]
    latest = cloud.remote.latest_checkpoint()
    assert latest["file"] == final.name and latest["bytes"] == final.stat().st_size > 16 << 20
    fetched = cloud.remote.fetch_checkpoint(tmp_path / "fetched")
    assert fetched.read_bytes() == final.read_bytes()
    events = b"".join(cloud.store_bytes(k) for k in cloud.segment_keys("events/"))
    assert events == (session_dir / "events.jsonl").read_bytes()
    assert cloud.ends("flaky") == ["training completed"]


def test_two_agents_on_one_session_exactly_one_writes(cloud):
    agents = [cloud.start(name, "--lease-wait", "1") for name in ("a", "b")]
    outputs = [p.communicate(timeout=240)[0] for p in agents]
    codes = sorted(p.returncode for p in agents)
    assert codes == [0, 1], outputs
    winner, loser = ("a", "b") if agents[0].returncode == 0 else ("b", "a")
    assert cloud.ends(winner) == ["training completed"]
    assert len(cloud.ends(loser)) == 1 and "another machine writes this session" in cloud.ends(loser)[0]
    assert [o.key for o in cloud.remote.store.list("leases/")] == ["leases/000000.json"]
    assert not (cloud.machine(loser) / "project").exists()  # it never even fetched the code
    writers = {e.get("machine") for e in cloud.remote.read_events() if e.get("source") == "agent"}
    assert writers == {cloud.machine_id(winner)}
    assert cloud.remote.read_session()["machine"]["id"] == cloud.machine_id(winner)
    assert cloud.remote.boots() == 2


def test_past_k_failed_boots_the_job_ends_for_good(cloud):
    # two machines die before training starts (killed right after counting their boot)
    for n, name in enumerate(("dies-1", "dies-2"), 1):
        proc = cloud.start(name, "--max-failed-boots", "2")
        wait_for(lambda n=n: cloud.remote.boots() >= n, timeout_s=60, interval_s=0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the dead machines' heartbeats go stale (a live writer would mean extra machines, not a stuck session)
    wait_for(lambda: time.time() - ((cloud.remote.read_heartbeat() or {}).get("t") or 0) > 2, timeout_s=60,
             interval_s=0.2)
    third = cloud.run("third", "--max-failed-boots", "2", "--lease-ttl", "2")
    assert third.returncode == 0, third.stderr
    assert "2 boots in a row failed" in cloud.ends("third")[0]
    assert "2 boots in a row failed" in cloud.remote.ended()["reason"]
    assert cloud.remote.latest_checkpoint() is None
    # once ended, a fourth machine ends at once
    fourth = cloud.run("fourth")
    assert fourth.returncode == 0 and "the session already ended" in cloud.ends("fourth")[0]
    assert cloud.remote.boots() == 3  # an ended session counts no more boots


def test_setup_failure_ends_the_machine_and_says_why(tmp_path, moto_server, s3_bucket):
    cloud = make_cloud(tmp_path, moto_server, s3_bucket, moto_server.endpoint_url,
                       files={"requirements.txt": "numpy\ntorch==1.0.0\n"})
    done = cloud.run("bad-reqs", "--setup", "venv", "--pip-arg=--no-index")
    assert done.returncode == 1
    assert "requirements.txt:2: 'torch==1.0.0' would replace the image's torch" in done.stderr
    [reason] = cloud.ends("bad-reqs")
    assert reason.startswith("setup failed: requirements.txt:2")
    assert cloud.remote.ended()["reason"] == reason
    assert "setup failed" in cloud.remote.read_output()
    assert [e["status"] for e in cloud.remote.read_events() if e["kind"] == "status"] == ["failed"]
    assert cloud.remote.read_session()["status"] == "failed"


def test_agent_crash_ends_the_machine(cloud):
    cloud.remote.store.put_bytes("boots.json", b"{not json")  # state the agent cannot read
    done = cloud.run("crash")
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    [reason] = cloud.ends("crash")
    assert reason.startswith("the agent failed: IntegrityError")


@pytest.mark.slow
def test_max_hours_deadline_stops_with_a_checkpoint_and_ends_the_machine(cloud):
    deadline = time.time() + 60
    done = cloud.run("deadline", "--deadline", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(deadline)),
                     "--deadline-margin", "30",
                     script=("train.py", "--epochs", "50", "--steps-per-epoch", "20", "--step-delay", "0.05"))
    assert done.returncode == 0, done.stderr
    assert cloud.ends("deadline") == ["the max-hours deadline was reached"]
    assert cloud.remote.ended()["reason"] == "the max-hours deadline was reached"
    # the last checkpoint the script wrote (an emergency one, unless the stop found one just written) went up
    newest = max((cloud.machine("deadline") / "project" / "checkpoints").glob("*/*.pt"), key=lambda p: p.stat().st_mtime)
    assert cloud.remote.latest_checkpoint()["file"] == newest.name
    assert cloud.remote.read_session()["status"] == "killed"


def test_deadline_passed_before_boot_ends_at_once(cloud):
    done = cloud.run("late", "--deadline", "2020-01-01T00:00:00Z")
    assert done.returncode == 0
    assert cloud.ends("late") == ["the deadline passed before this machine booted"]
    assert cloud.remote.boots() == 0 and not (cloud.machine("late") / "project").exists()


@pytest.mark.slow
def test_keep_on_failure_keeps_the_machine_until_the_deadline_only(tmp_path, moto_server, s3_bucket):
    cloud = make_cloud(tmp_path, moto_server, s3_bucket, moto_server.endpoint_url,
                       files={"fail.py": "import sys\nprint('boom')\nsys.exit(3)\n"})
    deadline = time.time() + 35
    done = cloud.run("debug", "--keep-on-failure", "--deadline", str(deadline), "--deadline-margin", "1",
                     script=("fail.py",))
    ended_at = time.time()
    assert done.returncode == 1
    [reason] = cloud.ends("debug")
    assert reason.startswith("training failed (exit code 3)")
    assert ended_at >= deadline  # kept for debugging, and not past the deadline
    assert "keeping the machine for debugging until the deadline" in done.stderr


@pytest.mark.slow
def test_rebalance_notice_checkpoints_and_training_goes_on(cloud, imds):
    env = loopback_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
    proc = cloud.start("rebalance", "--watch", "aws", "--watch-interval", "0.2", env=env,
                       script=("train.py", "--epochs", "2", "--steps-per-epoch", "30", "--step-delay", "0.1"))
    try:
        wait_for(lambda: (cloud.remote.read_heartbeat() or {}).get("step") or proc.poll() is not None, timeout_s=120,
                 interval_s=0.2)
        imds.set_rebalance()
        out, _ = proc.communicate(timeout=200)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    events = cloud.remote.read_events()
    assert [e.get("checkpoint_requested") for e in events if e["kind"] == "notice"] == [True]
    requested = [e for e in events if e["kind"] == "checkpoint" and e["path"].endswith("-requested.pt")]
    assert len(requested) == 1 and 0 < requested[0]["step"] < 60
    uploaded = [e["file"] for e in events if e["kind"] == "sync" and e.get("what") == "checkpoint" and e["uploaded"]]
    assert uploaded[-1] == "ckpt-step00000060.pt"
    assert cloud.ends("rebalance") == ["training completed"]


SECRET_SCRIPT = textwrap.dedent("""
    import hashlib, os, sys
    import trainctl
    run = trainctl.init()
    value = os.environ.get("HF_TOKEN", "")
    print("secret digest", hashlib.sha256(value.encode()).hexdigest()[:16])
    run.log({"loss": 1.0}, step=1)
    run.finish()
""")


def test_secrets_reach_the_script_and_nothing_records_them(tmp_path, moto_server, s3_bucket):
    import hashlib

    cloud = make_cloud(tmp_path, moto_server, s3_bucket, moto_server.endpoint_url, files={"secret.py": SECRET_SCRIPT})
    value = "hf_" + os.urandom(12).hex()
    from trainctl.agent.secrets import FolderSecretStore

    secrets = FolderSecretStore(tmp_path / "secret-store")
    secrets.put("HF_TOKEN", value)
    done = cloud.run("sec", "--secret", "HF_TOKEN", "--secret-store", f"folder:{tmp_path / 'secret-store'}",
                     script=("secret.py",))
    assert done.returncode == 0, done.stderr
    assert f"secret digest {hashlib.sha256(value.encode()).hexdigest()[:16]}" in cloud.remote.read_output()
    assert value not in done.stdout + done.stderr
    for info in cloud.remote.store.list(""):
        assert value.encode() not in cloud.store_bytes(info.key), info.key
    for path in cloud.machine("sec").rglob("*"):
        if path.is_file():
            assert value.encode() not in path.read_bytes(), path


VENV_SCRIPT = textwrap.dedent("""
    import sys, torch, trainctl
    run = trainctl.init()
    print("python", sys.executable, "torch", torch.__version__)
    run.log({"loss": 1.0}, step=1)
    run.finish()
""")


def test_setup_venv_keeps_the_image_torch_and_installs_the_wheel(tmp_path, moto_server, s3_bucket):
    cloud = make_cloud(tmp_path, moto_server, s3_bucket, moto_server.endpoint_url,
                       files={"where.py": VENV_SCRIPT, "requirements.txt": "torch>=2.0\nnumpy\n"})
    done = cloud.run("venv", "--setup", "venv", "--pip-arg=--no-index", script=("where.py",))
    assert done.returncode == 0, done.stderr
    venv = cloud.machine("venv") / "env" / "venv"
    output = cloud.remote.read_output()
    assert f"python {venv / 'bin' / 'python'} torch {torch.__version__}" in output
    assert list((venv / "lib").glob("python*/site-packages/trainctl-*.dist-info"))
    constraints = (cloud.machine("venv") / "env" / "constraints.txt").read_text()
    assert f"torch=={torch.__version__}" in constraints.splitlines()
    [env_event] = [e for e in cloud.remote.read_events() if e["kind"] == "startup" and e["phase"] == "environment"]
    assert env_event["mode"] == "venv" and env_event["python"] == str(venv / "bin" / "python")
