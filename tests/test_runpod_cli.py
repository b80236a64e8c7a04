"""`trainctl runpod` as a user runs it: the real CLI in a subprocess, the fake RunPod API on
loopback, moto's S3 as storage, HOME in a temp folder. Launch, list, status, stop, terminate,
resume, ssh; the dry-run plan (golden); hostile values; each error as one line with its fix."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env
from tests.fake_runpod import API_KEY, assert_golden, fake
from tests.runpod_world import World, launched_session, world
from tests.test_runpod_api import HOSTILE
from trainctl.errors import EXIT_NOT_FOUND, EXIT_PROVIDER, EXIT_USAGE

__all__ = ["fake", "world"]  # fixtures

GOLDEN = Path(__file__).parent / "golden" / "runpod"


def normalized(text: str, world: World) -> str:
    """The plan without what changes from run to run: times, the session id, ports, the bucket."""
    text = re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d( UTC|Z)", "<time>", text)
    text = re.sub(r"\d{8}-\d{6}-[0-9a-f]{6}", "<session>", text)
    text = text.replace(world.bucket, "<bucket>").replace(world.endpoint, "<endpoint>")
    text = re.sub(r"trainctl\.toml \d+B", "trainctl.toml <size>", text)  # it names the port
    return re.sub(r"(max hours +)\d\.\d\d h", r"\1<hours> h", text)


def launch(world: World, *args: str) -> str:
    r = world.run("runpod", "launch", "--yes", "--detach", *args, "train.py", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    return launched_session(r)


def test_dry_run_prints_the_plan_and_creates_nothing(world: World):
    r = world.run("runpod", "launch", "--dry-run", "train.py", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert_golden(GOLDEN / "cli_dry_run.txt", normalized(r.stderr, world))
    assert world.fake.pods == {} and world.session_ids() == []
    assert world.fake.operations() == ["gpuTypes", "myself"]
    assert world.run("sessions", "list").stdout.startswith("No sessions yet")
    as_json = world.run("runpod", "launch", "--dry-run", "--json", "train.py")
    plan = json.loads(as_json.stdout)
    assert plan["backend"] == "runpod" and plan["details"]["pod"]["request"]["operation"] == \
        "podFindAndDeployOnDemand"
    assert plan["env"]["AWS_SECRET_ACCESS_KEY"] == "***"


def test_launch_detached_records_the_session_and_its_pod(world: World):
    sid = launch(world, "--name", "first")
    pod_id = world.only_pod()
    data = world.session(sid)
    assert data["backend"] == "runpod" and data["status"] == "pending" and data["name"] == "first"
    assert data["handle"]["ids"]["pod_id"] == pod_id and data["processes"] == []
    assert data["storage"].endswith(f"/trainctl/proj/{sid}")
    remote = world.remote(sid)
    assert {o.key for o in remote.store.list("code/")} == {
        "code/bundle.json", "code/bundle.tar.gz", "code/trainctl-0.1.0-py3-none-any.whl"}
    sent = world.fake.pods[pod_id].input
    env = {e["key"]: e["value"] for e in sent["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == "{{ RUNPOD_SECRET_aws_secret }}"
    assert API_KEY not in json.dumps(sent) and "RUNPOD_API_KEY" not in env
    assert sent["name"] == "trainctl-first-a0"
    status = world.run("runpod", "status", sid)
    assert status.returncode == 0, status.stderr
    assert f"{pod_id} (attempt 0): 1 x NVIDIA RTX A4000, secure on-demand, $0.170/h, running" in status.stdout
    assert "ssh root@203.0.113.7 -p 40022" in status.stdout
    assert world.session(sid)["status"] == "running"
    shown = world.run("sessions", "show", sid)
    assert "backend         runpod" in shown.stdout


def test_list_shows_trainctls_pods_and_flags_the_ones_billing_for_nothing(world: World):
    sid = launch(world)
    alive = world.only_pod()
    world.fake.interrupt(alive)  # stopped: still billing its volume
    assert world.run("runpod", "status", sid).returncode == 0  # records the session preempted
    orphan = world.fake._create("podFindAndDeployOnDemand", {
        "name": "trainctl-gone-a0", "imageName": "img", "gpuTypeId": "NVIDIA RTX A4000", "cloudType": "SECURE",
        "env": [{"key": "TRAIN_OPS_SESSION_ID", "value": "20200101-000000-aaaaaa"}]})["id"]
    r = world.run("runpod", "list")
    assert r.returncode == 0, r.stderr
    assert f"possible leak: pod {alive} (stopped): session {sid} ended (preempted). " \
           f"End it with: trainctl runpod terminate {alive}" in r.stdout
    assert f"possible leak: pod {orphan} (running, $0.17/h): session 20200101-000000-aaaaaa is not in this " \
           "project" in r.stdout
    listed = json.loads(world.run("runpod", "list", "--json").stdout)
    assert {p["id"]: p["end_command"] for p in listed} == {
        alive: f"trainctl runpod terminate {alive}", orphan: f"trainctl runpod terminate {orphan}"}
    by_id = world.run("runpod", "status", orphan)
    assert "possible leak" in by_id.stdout


@pytest.mark.slow
def test_stop_then_resume_on_another_gpu_and_terminate(world: World):
    sid = launch(world)
    first = world.only_pod()
    stopped = world.run("runpod", "stop", sid, "--keep-volume")
    assert stopped.returncode == 0, stopped.stderr
    assert f"pod {first} stopped: its volume keeps billing until: trainctl runpod terminate {first}" \
        in stopped.stdout
    assert world.fake.pods[first].desired == "EXITED" and world.session(sid)["status"] == "stopped"
    again = world.run("runpod", "stop", sid)
    assert "is not running (stopped); nothing to stop" in again.stdout
    dry = world.run("runpod", "resume", sid, "--gpu", "NVIDIA A40", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "1 x NVIDIA A40 (48 GB)" in dry.stderr and f"-a1 (session {sid}, attempt 1)" in dry.stderr
    assert first in world.fake.pods  # a dry run changes nothing
    resumed = world.run("runpod", "resume", sid, "--gpu", "NVIDIA A40", "--cloud", "secure", "--yes", "--detach")
    assert resumed.returncode == 0, resumed.stderr
    assert (first, "user") in world.fake.terminated  # the stopped pod is not restarted: it is ended
    second = world.only_pod()
    assert world.fake.pods[second].input["gpuTypeId"] == "NVIDIA A40"
    data = world.session(sid)
    assert [a["attempt"] for a in data["attempts"]] == [0, 1] and data["status"] == "pending"
    assert data["handle"]["ids"]["pod_id"] == second
    machines = data["cloud"]["machines"]  # what a listing prices without asking RunPod
    assert [(m["id"], m["type"], m["usd_per_hour"]) for m in machines] == [
        (first, "1 x NVIDIA RTX A4000", 0.17), (second, "1 x NVIDIA A40", 0.4)]
    assert machines[0]["ended_at"] and machines[0]["state"] == "terminated" and not machines[1]["ended_at"]
    busy = world.run("runpod", "resume", sid, "--yes")
    assert busy.returncode == EXIT_USAGE and f"still running on pod {second}" in busy.stderr
    for _ in range(2):  # idempotent
        done = world.run("runpod", "terminate", sid)
        assert done.returncode == 0, done.stderr
    assert world.fake.pods == {} and world.session(sid)["status"] == "killed"
    assert "(the session had ended: killed)" in done.stdout
    gone = world.run("runpod", "terminate", second)
    assert f"pod {second} was already terminated" in gone.stdout


def test_stop_gives_the_pod_an_emergency_checkpoint_window_then_terminates(world: World):
    sid = launch(world)
    pod = world.only_pod()
    r = world.run("runpod", "stop", sid, "--now")
    assert r.returncode == 0, r.stderr
    assert f"pod {pod} terminated: nothing of it bills any more" in r.stdout
    assert world.fake.terminated == [(pod, "user")] and world.session(sid)["status"] == "stopped"


def test_a_completed_session_is_not_resumed(world: World):
    sid = launch(world)
    pod = world.only_pod()
    remote = world.remote(sid)
    remote.write_session({**remote.read_session(), "status": "completed", "exit_code": 0})
    remote.mark_ended("training completed", status="completed")
    world.fake._podTerminate({"podId": pod}, f"pod:{pod}")
    shown = world.run("runpod", "status", sid)
    assert "completed: the agent ended the session: training completed" in shown.stdout
    r = world.run("runpod", "resume", sid, "--yes")
    assert r.returncode == EXIT_USAGE
    assert "completed on its pod (training completed); nothing restarts it" in r.stderr
    assert "trainctl runpod launch" in r.stderr


def test_ssh_prints_the_pods_endpoint(world: World):
    sid = launch(world)
    r = world.run("runpod", "ssh", sid, "--print")
    assert r.stdout.strip() == "ssh root@203.0.113.7 -p 40022"
    world.fake.provision_ticks = None
    world.fake.pods.clear()
    world.fake._create("podFindAndDeployOnDemand", {"name": "trainctl-x-a0", "imageName": "i", "cloudType": "SECURE",
                                                    "gpuTypeId": "NVIDIA RTX A4000"})
    provisioning = world.only_pod()
    r = world.run("runpod", "ssh", provisioning, "--print")
    assert r.returncode == EXIT_USAGE and "has no SSH endpoint (provisioning)" in r.stderr


def test_gpus_lists_types_with_both_clouds_and_markets(world: World):
    r = world.run("runpod", "gpus")
    assert r.returncode == 0, r.stderr
    assert re.search(r"NVIDIA RTX A4000\s+16 GB\s+\$0\.17 High\s+\$0\.09 High\s+\$0\.10 High\s+\$0\.06 High",
                     r.stdout)
    rows = json.loads(world.run("runpod", "gpus", "--json", "--gpu-count", "2").stdout)
    assert rows[0]["gpu"] == "NVIDIA RTX A4000"
    assert world.fake.requests[-1]["variables"]["secure"]["gpuCount"] == 2


def test_hostile_names_and_arguments_reach_the_pod_intact(world: World):
    sid = launch(world, "--name", HOSTILE[2])
    pod = world.fake.pods[world.only_pod()]
    assert pod.input["name"] == f"trainctl-{HOSTILE[2]}-a0"
    r = world.run("runpod", "launch", "--yes", "--detach", "train.py", *HOSTILE)
    assert r.returncode == 0, r.stderr
    from trainctl.cloud.runpod.startscript import script_from_docker_args

    latest = world.fake.pods[sorted(world.fake.pods)[-1]]
    script = script_from_docker_args(latest.input["dockerArgs"])
    assert world.remote(launched_session(r)).store.get_json("code/bundle.json")["run"]["args"] == HOSTILE
    import shlex

    argv = shlex.split(script[script.index("python3 -c "):script.index(" &\nAGENT_PID=$!")])
    assert argv[-len(HOSTILE):] == HOSTILE and argv[-len(HOSTILE) - 1] == "train.py"
    assert world.session(sid)["name"] == HOSTILE[2]


# --- errors: one line, the fix, a stable exit code, nothing half-created ---------------------------

ERRORS = [
    # (what is wrong, how it is set up, the command, exit code, in the message, in the hint)
    ("no API key", {"env": {"RUNPOD_API_KEY": ""}}, ["launch", "--dry-run"], EXIT_USAGE,
     "No RunPod API key", "RUNPOD_API_KEY=... or run: runpod config"),
    ("a rejected key", {"env": {"RUNPOD_API_KEY": "wrong"}}, ["gpus"], EXIT_PROVIDER,
     "rejected the API key from RUNPOD_API_KEY (HTTP 401)", "console.runpod.io"),
    ("no storage", {"config": {"storage": None}}, ["launch", "--dry-run"], EXIT_USAGE,
     "[cloud] storage is not set", 'storage = "s3://bucket/prefix"'),
    ("storage in a folder", {"config": {"storage": "/tmp/somewhere"}}, ["launch", "--dry-run"], EXIT_USAGE,
     "a folder on this machine, which a pod can't reach", "s3://bucket/prefix"),
    ("no storage credentials", {"runpod": {"secrets": {"HF_TOKEN": "hf"}}}, ["launch", "--dry-run"], EXIT_USAGE,
     "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY is not among the RunPod secrets", "[runpod] secrets"),
    ("unknown GPU", {}, ["launch", "--dry-run", "--gpu", "RTX 9999"], EXIT_USAGE,
     "Unknown RunPod GPU type 'RTX 9999'", "trainctl runpod gpus"),
    ("no GPU chosen", {"runpod": {"gpu": ""}}, ["launch", "--dry-run"], EXIT_USAGE,
     "No GPU type chosen", "--gpu"),
    ("GPU not available", {}, ["launch", "--dry-run", "--gpu", "NVIDIA A40", "--cloud", "community"], EXIT_PROVIDER,
     "No 1 x NVIDIA A40 on community cloud (on-demand) available right now", "Try: NVIDIA A40 (48 GB) secure"),
    ("balance too low", {"balance": 0.1}, ["launch", "--dry-run"], EXIT_PROVIDER,
     "RunPod balance $0.10 is below one hour of spend", "Add funds"),
    ("over budget", {"cloud": {"budget_usd": 0.1}}, ["launch", "--dry-run"], EXIT_USAGE,
     "is over budget_usd $0.10", "Lower --max-hours"),
    ("a secret in the arguments", {}, ["launch", "--dry-run", "train.py", "--api-key=abc"], EXIT_USAGE,
     "--api-key looks like a secret", "--secret NAME=SECRET_NAME"),
    ("a bad --secret", {}, ["launch", "--dry-run", "--secret", "HF_TOKEN"], EXIT_USAGE,
     "--secret 'HF_TOKEN' is not NAME=SECRET_NAME", "console.runpod.io/user/secrets"),
    ("the user's own key as a secret", {}, ["launch", "--dry-run", "--secret", "RUNPOD_API_KEY=mine"], EXIT_USAGE,
     "RUNPOD_API_KEY can't be sent to the pod", "Remove RUNPOD_API_KEY"),
    ("no confirmation", {}, ["launch"], EXIT_USAGE,
     "Refusing to start a paid pod without confirmation", "--yes"),
    ("a missing script", {}, ["launch", "--dry-run", "missing.py"], EXIT_NOT_FOUND,
     "script missing.py does not exist", "Check the path"),
    ("an unknown session", {}, ["status", "20200101-000000-abcdef"], EXIT_NOT_FOUND,
     "No session '20200101-000000-abcdef'", "No sessions yet"),
    ("an unknown pod", {}, ["status", "nosuchpod1"], EXIT_NOT_FOUND,
     "No RunPod pod 'nosuchpod1' on this account", "trainctl runpod list"),
    ("a bad config value", {"runpod": {"cloud": "moon"}}, ["launch", "--dry-run"], EXIT_USAGE,
     "'runpod.cloud' must be one of secure, community", 'cloud = "secure"'),
]


@pytest.mark.parametrize("case, setup, command, code, message, hint", ERRORS, ids=[e[0] for e in ERRORS])
def test_each_error_is_one_line_with_its_fix_and_creates_nothing(world: World, case, setup, command, code,
                                                               message, hint):
    if "runpod" in setup:
        world.configure(**setup["runpod"])
    text = (world.project / "trainctl.toml").read_text()
    for key, value in (setup.get("config") or {}).items():
        text = re.sub(rf"^{key} = .*$", "" if value is None else f'{key} = "{value}"', text, flags=re.M)
    for key, value in (setup.get("cloud") or {}).items():
        text = text.replace("[cloud]\n", f"[cloud]\n{key} = {value}\n")
    (world.project / "trainctl.toml").write_text(text)
    if "balance" in setup:
        world.fake.balance = setup["balance"]
    args = list(command)
    if command[0] == "launch" and not any(a.endswith(".py") for a in args):
        args.append("train.py")
    r = world.run("runpod", *args, env=world.env(**setup.get("env", {})), input="")
    assert r.returncode == code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("error:", "hint:"))]
    assert lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert lines[1].startswith("hint: ") and hint in lines[1], r.stderr
    assert "Traceback" not in r.stderr
    assert world.fake.pods == {} and world.session_ids() == []


def test_a_gpu_taken_between_the_plan_and_the_launch_leaves_nothing_billing(world: World):
    world.fake.fail("podFindAndDeployOnDemand", "There are no longer any instances available with the "
                                                "requested specifications. Please refresh and try again.")
    r = world.run("runpod", "launch", "--yes", "--detach", "train.py")
    assert r.returncode == EXIT_PROVIDER
    assert "No 1 x NVIDIA RTX A4000 on secure cloud (on-demand) available right now" in r.stderr
    assert "Try: NVIDIA RTX A4000 (16 GB) community on-demand $0.09/h" in r.stderr
    assert world.fake.pods == {}
    [sid] = world.session_ids()
    data = world.session(sid)
    assert data["status"] == "failed" and "launch failed" in data["error"]


def test_an_image_that_cannot_be_pulled_is_ended_and_said(world: World):
    world.fake.bad_images.add("bad/image:1")
    sid = launch(world, "--image", "bad/image:1")
    r = world.run("runpod", "status", sid)
    assert "could not pull image 'bad/image:1'" in r.stdout and "It was terminated." in r.stdout
    assert "docker pull bad/image:1" in r.stdout
    assert world.fake.pods == {} and world.session(sid)["status"] == "failed"


def test_a_pod_stuck_provisioning_is_terminated_and_said(world: World):
    world.configure(provision_timeout_min=0)
    world.fake.stuck_images.add("slow/image:1")
    sid = launch(world, "--image", "slow/image:1")
    r = world.run("runpod", "status", sid)
    assert "still provisioning" in r.stdout and "it was terminated, nothing is left billing" in r.stdout
    assert world.fake.pods == {} and world.session(sid)["status"] == "failed"


# --- an attached launch: following, recovery, detaching -------------------------------------------

def attached(world: World, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "trainctl", "runpod", "launch", "--yes", *args, "train.py"],
                            cwd=world.project, env=world.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(predicate, what: str, timeout_s: float = 120):
    from tests.servers import wait_for as wait

    return wait(predicate, timeout_s=timeout_s, interval_s=0.1) or pytest.fail(f"never: {what}")


def test_an_attached_launch_replaces_an_interrupted_pod_and_ends_with_the_session(world: World):
    proc = attached(world, "--interruptible", "--max-restarts", "1")
    try:
        wait_for(lambda: len(world.fake.pods) == 1 and world.session_ids(), "the first pod")
        [sid] = world.session_ids()
        first = world.only_pod()
        remote = world.remote(sid)
        writer = remote.output_writer()
        writer.append(b"step 1 loss 0.9\n")
        writer.flush()
        world.fake.interrupt(first)  # outbid: stopped, volume kept
        wait_for(lambda: (first, "user") in world.fake.terminated and len(world.fake.pods) == 1, "the second pod")
        second = world.only_pod()
        assert world.fake.pods[second].input["name"].endswith("-a1")
        writer.append(b"step 2 loss 0.5\n")
        writer.flush()
        remote.write_session({**remote.read_session(), "status": "completed", "exit_code": 0})
        remote.mark_ended("training completed", status="completed")
        world.fake._podTerminate({"podId": second}, f"pod:{second}")  # the agent ends its pod
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out == "step 1 loss 0.9\nstep 2 loss 0.5\n"  # every attempt's output, once
    assert "restart 1/1" in err and "resumes from the newest checkpoint in storage" in err
    assert f"session {sid} completed" in err
    data = world.session(sid)
    assert data["status"] == "completed" and [a["attempt"] for a in data["attempts"]] == [0, 1]
    assert [a.get("status") for a in data["attempts"]] == ["preempted", "completed"]
    assert world.fake.pods == {}


def test_without_restarts_left_an_interrupted_pod_is_ended_and_the_resume_named(world: World):
    proc = attached(world, "--interruptible", "--max-restarts", "0")
    try:
        wait_for(lambda: len(world.fake.pods) == 1 and world.session_ids(), "the pod")
        [sid] = world.session_ids()
        pod = world.only_pod()
        world.fake.interrupt(pod)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    assert f"resume      trainctl runpod resume {sid}" in err
    assert world.fake.pods == {} and (pod, "user") in world.fake.terminated  # no volume left billing
    assert world.session(sid)["status"] == "preempted"


def test_ctrl_c_detaches_and_the_pod_keeps_running(world: World):
    proc = attached(world)
    try:
        wait_for(lambda: len(world.fake.pods) == 1 and world.session_ids(), "the pod")
        wait_for(lambda: world.session(world.session_ids()[0])["status"] == "running", "the pod running")
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    [sid] = world.session_ids()
    assert proc.returncode == 0, err
    assert f"detached from session {sid}; its pod keeps running" in err
    assert f"trainctl sessions attach {sid}" in err and f"trainctl runpod stop {sid}" in err
    assert len(world.fake.pods) == 1 and world.fake.terminated == []


def test_the_runpod_commands_load_no_sdk_and_no_boto3_for_help():
    code = ("import sys; from trainctl.cli.main import main\n"
            "try:\n    main(['runpod', 'launch', '--help'])\nexcept SystemExit:\n    pass\n"
            "import trainctl.backends.runpod, trainctl.launcher.cloud_session\n"
            "print(sorted(m for m in ('runpod', 'boto3', 'botocore', 'requests', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_sessions_logs_show_and_attach_work_on_a_pod_session(world: World):
    sid = launch(world)
    pod = world.only_pod()
    remote = world.remote(sid)
    writer = remote.output_writer()
    writer.append(b"epoch 1 loss 0.9\n")
    writer.flush()
    events = remote.events_writer()
    events.append(b'{"v": 1, "t": 1, "kind": "metric", "step": 5, "values": {"loss": 0.9}}\n')
    events.flush()
    logs = world.run("sessions", "logs", sid)
    assert logs.returncode == 0 and logs.stdout == "epoch 1 loss 0.9\n", logs.stderr
    attach = subprocess.Popen([sys.executable, "-m", "trainctl", "sessions", "attach", sid], cwd=world.project,
                              env=world.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        writer.append(b"epoch 2 loss 0.4\n")
        writer.flush()
        remote.write_session({**remote.read_session(), "status": "completed", "exit_code": 0})
        remote.mark_ended("training completed", status="completed")
        world.fake._podTerminate({"podId": pod}, f"pod:{pod}")
        out, err = attach.communicate(timeout=120)
    finally:
        if attach.poll() is None:
            attach.kill()
    assert attach.returncode == 0, err
    assert "epoch 2 loss 0.4" in out
    shown = world.run("sessions", "show", sid)
    assert "status          completed" in shown.stdout and "loss 0.9" in shown.stdout
    assert world.run("sessions", "logs", sid).stdout == "epoch 1 loss 0.9\nepoch 2 loss 0.4\n"
