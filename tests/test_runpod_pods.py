"""trainctl's pods against the fake: launch, provisioning, list and leaks, stop, terminate,
interruption and replacement, nothing half-created; and the start script run for real."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import clean_env
from tests.fake_runpod import PULL_FAILED, FakeRunPod, client, fake
from tests.test_runpod_api import HOSTILE
from trainctl.cloud.runpod import pods
from trainctl.cloud.runpod.api import RunPodClient
from trainctl.cloud.runpod.errors import (
    GpuUnavailableError,
    ImagePullError,
    InsufficientBalanceError,
    PodNotFoundError,
    ProvisioningTimeoutError,
    RunPodApiError,
)
from trainctl.cloud.runpod.plan import PodRequest, gather_facts, plan
from trainctl.cloud.runpod.pods import LaunchedPod, SessionView
from trainctl.cloud.runpod.startscript import SCRIPT_PATH
from trainctl.errors import EXIT_NOT_FOUND

__all__ = ["client", "fake"]  # fixtures

SESSION = "20250101-120000-ab12"


def make_plan(c: RunPodClient, **over):
    values = dict(session_id=SESSION, agent_command=("python3", "-m", "trainctl", "agent"),
                  gpu="NVIDIA RTX A4000", max_hours=2.0)
    values.update(over)
    request = PodRequest(**values)
    return plan(request, gather_facts(c, request.gpu_count))


def launched(c: RunPodClient, **over) -> tuple[object, LaunchedPod]:
    p = make_plan(c, **over)
    return p, pods.launch_pod(c, p)


# --- launch and follow -------------------------------------------------------------------------

def test_a_pod_is_created_then_runs_and_is_listed_with_its_session(fake: FakeRunPod, client):
    fake.provision_ticks = 3
    p, pod = launched(client)
    assert fake.requests[-1]["query"].startswith("mutation TrainctlCreatePod(")
    assert fake.requests[-1]["variables"] == {"input": p.pod_input}
    states: list[str] = []
    info = pods.wait_until_running(client, pod, poll_s=0, on_poll=lambda i: states.append(i.state))
    assert states[0] == "provisioning" and states[-1] == "running"
    assert info.session_id == SESSION and info.attempt == 0
    assert pods.ssh_command(info) == "ssh root@203.0.113.7 -p 40022"

    listed = pods.list_pods(client, lambda sid: SessionView("running", pod.pod_id))
    assert [(i.id, i.state, i.gpu, i.leak) for i in listed] == [
        (pod.pod_id, "running", "RTX A4000", None)]
    assert "possible leak" not in pods.render_pod_table(listed)
    assert LaunchedPod.from_json(json.loads(json.dumps(pod.to_json()))) == pod


def test_stop_and_terminate_are_safe_to_repeat_and_say_what_they_did(fake: FakeRunPod, client):
    _, pod = launched(client)
    first = pods.stop_pod(client, pod.pod_id)
    assert first.changed and "volume keeps billing" in first.message
    assert pods.pod_status(client, pod.pod_id).state == "stopped"
    assert not pods.stop_pod(client, pod.pod_id).changed
    ended = pods.terminate_pod(client, pod.pod_id)
    assert ended.changed and ended.message == f"pod {pod.pod_id} terminated: nothing of it " \
                                              "bills any more"
    again = pods.terminate_pod(client, pod.pod_id)
    assert not again.changed and again.message == f"pod {pod.pod_id} was already terminated"
    with pytest.raises(PodNotFoundError) as info:
        pods.pod_status(client, pod.pod_id)
    assert info.value.exit_code == EXIT_NOT_FOUND
    assert fake.terminated == [(pod.pod_id, "user")]


# --- leaks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("view, expected", [
    (SessionView("running", "POD"), None),
    (SessionView("running"), None),
    (SessionView("pending", "POD"), None),
    (SessionView("completed", "POD"), f"session {SESSION} ended (completed)"),
    (SessionView("failed"), f"session {SESSION} ended (failed)"),
    (SessionView("preempted", "POD"), f"session {SESSION} ended (preempted)"),
    (SessionView("running", "otherpod1"), f"session {SESSION} moved on to pod otherpod1"),
    (None, f"session {SESSION} is not in this project"),
])
def test_a_live_pod_whose_session_no_longer_needs_it_is_a_possible_leak(fake: FakeRunPod, client,
                                                                        view, expected):
    _, pod = launched(client)
    if view is not None and view.pod_id == "POD":
        view = SessionView(view.status, pod.pod_id)
    [info] = pods.list_pods(client, lambda sid: view)
    assert info.leak == expected
    table = pods.render_pod_table([info])
    if expected:
        assert f"End it with: trainctl runpod terminate {pod.pod_id}" in table
        assert info.to_json()["end_command"] == f"trainctl runpod terminate {pod.pod_id}"


def test_list_shows_only_trainctls_pods_and_flags_unmarked_ones(fake: FakeRunPod, client):
    _, ours = launched(client)
    notebook = client.create_pod("podFindAndDeployOnDemand", {
        "name": "my-notebook", "imageName": "img", "gpuTypeId": "NVIDIA RTX A4000",
        "cloudType": "SECURE"})
    stray = client.create_pod("podFindAndDeployOnDemand", {
        "name": "trainctl-by-hand", "imageName": "img", "gpuTypeId": "NVIDIA RTX A4000",
        "cloudType": "SECURE"})
    listed = {i.id: i for i in pods.list_pods(client, lambda sid: SessionView("running"))}
    assert set(listed) == {ours.pod_id, stray["id"]}
    assert notebook["id"] not in listed
    assert listed[stray["id"]].leak == "no trainctl session marker in its environment"
    assert pods.leaks(listed.values()) == [listed[stray["id"]]]
    assert pods.render_pod_table([]) == "No trainctl pods on this RunPod account."


# --- interruption and resume -------------------------------------------------------------------

def test_an_interrupted_pod_is_replaced_by_a_new_one_on_another_gpu(fake: FakeRunPod, client):
    first_plan, first = launched(client, interruptible=True, cloud="community", volume_gb=20)
    assert first_plan.pod_input["bidPerGpu"] == 0.06
    fake.interrupt(first.pod_id)
    stopped = pods.pod_status(client, first.pod_id)
    assert stopped.state == "stopped"
    assert fake.pods[first.pod_id].input["volumeInGb"] == 20  # the volume is kept, and billed
    [flagged] = pods.list_pods(client, lambda sid: SessionView("preempted", first.pod_id))
    assert flagged.leak == f"session {SESSION} ended (preempted)"

    second_plan = make_plan(client, attempt=1, gpu="NVIDIA RTX A4500", cloud="secure",
                            deadline_utc=first_plan.deadline_utc)
    ended, second = pods.replace_pod(client, first.pod_id, second_plan)
    assert ended is not None and ended.changed
    assert fake.terminated == [(first.pod_id, "user")]
    env = fake.pod_environment(second.pod_id)
    assert env["TRAIN_OPS_SESSION_ID"] == SESSION and env["TRAIN_OPS_ATTEMPT"] == "1"
    assert fake.pods[second.pod_id].input["gpuTypeId"] == "NVIDIA RTX A4500"
    assert second.deadline_utc == first.deadline_utc  # the absolute deadline holds across pods
    assert second.name == f"trainctl-{SESSION}-a1"


# --- provisioning that never ends, and nothing half-created ---------------------------------

def test_a_pod_stuck_provisioning_is_terminated_and_says_so(fake: FakeRunPod, client):
    fake.stuck_images.add("stuck/image:1")
    _, pod = launched(client, image="stuck/image:1", image_cuda="12.4")
    assert pods.check_provisioning(client, pod, timeout_s=3600).state == "provisioning"
    assert pod.pod_id in fake.pods
    with pytest.raises(ProvisioningTimeoutError) as info:
        pods.check_provisioning(client, pod, timeout_s=0)
    assert "still provisioning" in str(info.value)
    assert "it was terminated, nothing is left billing" in str(info.value)
    assert info.value.terminated and fake.pods == {}
    assert "another GPU type" in info.value.hint


def test_a_stuck_pod_that_cannot_be_terminated_names_the_command(fake: FakeRunPod, client):
    fake.stuck_images.add("stuck/image:1")
    _, pod = launched(client, image="stuck/image:1")
    fake.fail("podTerminate", status=500, times=10)
    with pytest.raises(ProvisioningTimeoutError) as info:
        pods.check_provisioning(client, pod, timeout_s=0)
    assert f"end it with: trainctl runpod terminate {pod.pod_id}" in str(info.value)
    assert not info.value.terminated


def test_an_image_that_cannot_be_pulled_ends_the_pod(fake: FakeRunPod, client):
    fake.bad_images.add("nosuch/image:latest")
    _, pod = launched(client, image="nosuch/image:latest")
    with pytest.raises(ImagePullError) as info:
        pods.wait_until_running(client, pod, poll_s=0)
    assert str(info.value) == (f"Pod {pod.pod_id} could not pull image 'nosuch/image:latest': "
                               f"{PULL_FAILED}. It was terminated.")
    assert "docker pull nosuch/image:latest" in info.value.hint
    assert fake.pods == {}


def test_no_capacity_at_launch_lists_alternatives_and_creates_nothing(fake: FakeRunPod, client):
    p = make_plan(client)
    fake.gpus["NVIDIA RTX A4000"].secure_stock = None  # taken between the plan and the launch
    with pytest.raises(GpuUnavailableError) as info:
        pods.launch_pod(client, p)
    assert str(info.value).startswith("No 1 x NVIDIA RTX A4000 on secure cloud (on-demand) "
                                      "available right now (There are no longer any instances")
    assert "NVIDIA RTX A4000 (16 GB) community on-demand $0.09/h" in info.value.hint
    assert fake.pods == {}


def test_insufficient_balance_at_launch_is_named(fake: FakeRunPod, client):
    p = make_plan(client)
    fake.balance = 0.05
    with pytest.raises(InsufficientBalanceError, match="Insufficient balance"):
        pods.launch_pod(client, p)
    assert fake.pods == {}


def test_a_create_whose_answer_is_lost_leaves_no_pod_behind(fake: FakeRunPod, client):
    p = make_plan(client)
    fake.fail("podFindAndDeployOnDemand", drop=True, after=True)
    with pytest.raises(RunPodApiError) as info:
        pods.launch_pod(client, p)
    [(created, who)] = fake.terminated
    assert who == "user" and fake.pods == {}
    assert f"Checked: terminated the pod it had created ({created})." in str(info.value)
    assert info.value.hint == "Retry the launch; nothing is left billing"
    assert fake.operations()[-3:] == ["podFindAndDeployOnDemand", "myself", "podTerminate"]


def test_a_create_lost_before_runpod_saw_it_says_nothing_was_created(fake: FakeRunPod, client):
    p = make_plan(client)
    fake.fail("podFindAndDeployOnDemand", drop=True)
    with pytest.raises(RunPodApiError, match="Checked: no pod was created"):
        pods.launch_pod(client, p)
    assert fake.terminated == [] and fake.pods == {}


def test_when_even_the_check_fails_the_user_is_told_what_to_run(fake: FakeRunPod, client):
    p = make_plan(client)
    fake.fail("podFindAndDeployOnDemand", drop=True, after=True)
    fake.fail("myself", status=500, times=10)
    with pytest.raises(RunPodApiError) as info:
        pods.launch_pod(client, p)
    assert "Checking for a half-created pod failed too" in str(info.value)
    assert info.value.hint == f"Run `trainctl runpod list` and terminate any pod of session {SESSION}"


# --- the start script, run for real with the pod's environment ---------------------------------

AGENT = textwrap.dedent("""
    import json, pathlib, signal, sys, time
    here = pathlib.Path(sys.argv[1])
    def stop(signum, frame):
        (here / "agent-got-sigterm").write_text("")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    (here / "agent-started").write_text(json.dumps(sys.argv[4:]))
    time.sleep(float(sys.argv[2]))
    sys.exit(int(sys.argv[3]))
""")


def start_pod(fake: FakeRunPod, client, tmp_path: Path, *, sleep_s: float, exit_code: int,
              deadline_in_s: float = 3600, agent_args: tuple[str, ...] = (),
              **over) -> tuple[subprocess.Popen, LaunchedPod]:
    """Create a pod through the fake, then be that pod: run its dockerArgs with its env."""
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    now = datetime.now(timezone.utc)
    request = PodRequest(session_id=SESSION, gpu="NVIDIA RTX A4000", grace_period_s=5,
                         agent_command=(sys.executable, str(agent), str(tmp_path), str(sleep_s),
                                        str(exit_code), *agent_args),
                         deadline_utc=now + timedelta(seconds=deadline_in_s), **over)
    p = plan(request, gather_facts(client, 1, now=now))
    pod = pods.launch_pod(client, p)
    args = p.pod_input["dockerArgs"].replace(SCRIPT_PATH, str(tmp_path / "start.sh"))
    env = {**clean_env(), **fake.pod_environment(pod.pod_id),
           "RUNPOD_API_BASE_URL": fake.base_url}
    proc = subprocess.Popen(shlex.split(args), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, pod


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def wait_for(path: Path) -> None:
    for _ in range(6000):
        if path.exists():
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


def test_when_the_agent_exits_the_pod_ends_itself_with_its_own_key(fake: FakeRunPod, client,
                                                                   tmp_path):
    proc, pod = start_pod(fake, client, tmp_path, sleep_s=0, exit_code=3)
    rc, err = finish(proc)
    assert rc == 3
    assert f"trainctl: ending pod {pod.pod_id}: agent exited with status 3" in err
    assert fake.terminated == [(pod.pod_id, "pod")]
    [request] = [r for r in fake.requests if r["operation"] == "podTerminate"]
    assert request["auth"] == f"pod:{pod.pod_id}"
    assert request["variables"] == {"input": {"podId": pod.pod_id}}


def test_at_the_deadline_the_agent_gets_sigterm_and_the_pod_is_terminated(fake: FakeRunPod,
                                                                          client, tmp_path):
    proc, pod = start_pod(fake, client, tmp_path, sleep_s=600, exit_code=0, deadline_in_s=2)
    rc, err = finish(proc)
    assert rc == 0  # the agent's own status: it stopped cleanly on SIGTERM
    assert (tmp_path / "agent-got-sigterm").exists()
    assert "max-hours deadline" in err and "reached" in err
    assert [p for p, who in fake.terminated] == [pod.pod_id]
    assert fake.pods == {}


def test_an_interruption_stops_the_agent_but_leaves_the_pod_to_runpod(fake: FakeRunPod, client,
                                                                      tmp_path):
    proc, pod = start_pod(fake, client, tmp_path, sleep_s=600, exit_code=0)
    wait_for(tmp_path / "agent-started")
    proc.send_signal(signal.SIGTERM)
    rc, _ = finish(proc)
    assert rc == 143
    assert (tmp_path / "agent-got-sigterm").exists()
    assert fake.terminated == [] and pod.pod_id in fake.pods


def test_keep_on_failure_keeps_the_pod_until_the_deadline_only(fake: FakeRunPod, client,
                                                               tmp_path):
    proc, pod = start_pod(fake, client, tmp_path, sleep_s=0, exit_code=1, deadline_in_s=2,
                          keep_on_failure=True)
    rc, err = finish(proc)
    assert rc == 1
    assert "pod kept for debugging until" in err
    assert [p for p, who in fake.terminated] == [pod.pod_id]


def test_hostile_names_env_and_agent_arguments_survive_every_layer(fake: FakeRunPod, client,
                                                                   tmp_path):
    proc, pod = start_pod(fake, client, tmp_path, sleep_s=0, exit_code=0,
                          agent_args=tuple(HOSTILE), name=HOSTILE[2],
                          env={f"V{i}": value for i, value in enumerate(HOSTILE)})
    rc, _ = finish(proc)
    assert rc == 0 and fake.terminated == [(pod.pod_id, "pod")]
    assert json.loads((tmp_path / "agent-started").read_text()) == HOSTILE
    [create] = [r for r in fake.requests if r["operation"] == "podFindAndDeployOnDemand"]
    sent = create["variables"]["input"]
    assert sent["name"] == f"trainctl-{HOSTILE[2]}-a0"
    assert [e["value"] for e in sent["env"] if e["key"].startswith("V")] == HOSTILE
