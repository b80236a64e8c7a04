"""RunPodBackend against the fake RunPod API and moto's S3: the plan (pure, golden), the launch
(code in storage in the order a pod relies on, then the pod), describe, the mirrored output,
stop and release, and the pod's own end."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.fake_runpod import API_KEY, FakeRunPod, assert_golden, client, fake
from tests.servers import make_s3_store
from tests.test_runpod_plan import offers
from trainctl.backends.base import Handle, RunSpec, get_backend
from trainctl.backends.runpod import (
    BOOTSTRAP,
    PodSettings,
    RunPodBackend,
    end_this_pod,
)
from trainctl.cloud.runpod.errors import RunPodApiError
from trainctl.cloud.runpod.plan import Facts
from trainctl.cloud.runpod.startscript import script_from_docker_args
from trainctl.errors import UsageError
from trainctl.session import SessionStore, State
from trainctl.storage.remote import RemoteSession

__all__ = ["client", "fake"]  # fixtures

GOLDEN = Path(__file__).parent / "golden" / "runpod"
READ_AT = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
SESSION = "20250101-120000-ab12cd"
SECRETS = {"AWS_ACCESS_KEY_ID": "aws_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret"}


def settings(**over) -> PodSettings:
    values = dict(storage="s3://bucket/trainctl", project="proj", endpoint_url="https://r2.example.com",
                  region="auto", secrets=SECRETS, budget_usd=10.0, setup="none")
    values.update(over)
    return PodSettings(**values)


def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / "train.py").write_text("print('training')\n")
    (root / "data" / "vocab.txt").write_text("a\n" * 1000)
    return root


def spec(root: Path, **resources) -> RunSpec:
    values = {"gpu": "NVIDIA RTX A4000", "max_hours": 3.0, "attempt": 0, **resources}
    return RunSpec(script=root / "train.py", args=("--epochs", "2", 'a "quoted" arg'), resources=values,
                   session_id=SESSION, session_dir=root / ".trainctl" / "sessions" / SESSION, cwd=root)


def fixed_facts(**over) -> Facts:
    values = {"offers": offers(), "read_at": READ_AT, "balance_usd": 25.0, "spend_per_hr_usd": 0.0}
    values.update(over)
    return Facts(**values)


def planned(tmp_path: Path, backend: RunPodBackend | None = None, **resources):
    backend = backend or RunPodBackend(settings=settings(), client=object())
    backend.use_facts(fixed_facts())
    root = project(tmp_path) if not (tmp_path / "proj").exists() else tmp_path / "proj"
    return backend.plan(spec(root, **resources)), root


def test_the_plan_is_pure_and_matches_the_golden_file(tmp_path):
    plan, root = planned(tmp_path)
    again, _ = planned(tmp_path)
    assert plan == again
    shown = json.dumps(plan.display(), indent=2, sort_keys=True).replace(str(root), "<project>")
    assert_golden(GOLDEN / "backend_plan.json", shown + "\n")
    assert_golden(GOLDEN / "backend_plan.txt", plan.details["text"] + "\n")
    pod = plan.details["pod"]
    assert plan.command[:3] == ("python3", "-c", BOOTSTRAP)
    assert plan.command[3:] == ("--attempt", "0", "--backend", "runpod", "--watch", "signal", "--signal-grace",
                                "5", "--end", "runpod", "--setup", "none", "train.py", "--epochs", "2",
                                'a "quoted" arg')
    assert pod["request"]["variables"]["input"]["env"] == [
        {"key": k, "value": v} for k, v in {
            "TRAIN_OPS_SESSION_ID": SESSION, "TRAIN_OPS_BACKEND": "runpod", "TRAIN_OPS_ATTEMPT": "0",
            "TRAINCTL_DEADLINE_UTC": "2025-01-01T15:00:00Z", "PYTHONUNBUFFERED": "1",
            "TRAINCTL_STORAGE_URI": "s3://bucket/trainctl", "TRAINCTL_PROJECT": "proj",
            "TRAINCTL_SESSION_ID": SESSION, "TRAINCTL_BACKEND": "runpod", "TRAINCTL_CHECKSUMS": "when_supported",
            "TRAINCTL_ENDPOINT_URL": "https://r2.example.com", "TRAINCTL_REGION": "auto",
            "AWS_ACCESS_KEY_ID": "{{ RUNPOD_SECRET_aws_key_id }}",
            "AWS_SECRET_ACCESS_KEY": "{{ RUNPOD_SECRET_aws_secret }}"}.items()]
    script = script_from_docker_args(pod["request"]["variables"]["input"]["dockerArgs"])
    assert "trainctl agent" not in script or "python3 -c" in script
    assert "work lost on an interruption <= the checkpoint interval" in plan.details["text"]
    assert plan.checkpoint_location == f"s3://bucket/trainctl/proj/{SESSION}/checkpoints/"
    assert plan.cost_per_hour == pytest.approx(0.17)


def test_a_resumed_attempt_keeps_the_deadline_and_counts_what_was_spent(tmp_path):
    plan, _ = planned(tmp_path, attempt=2, deadline_utc="2025-01-01T13:30:00Z", spent_usd=9.5,
                      gpu="NVIDIA RTX A4500")
    pod = plan.details["pod"]
    assert pod["deadline_utc"] == "2025-01-01T13:30:00Z" and pod["max_hours"] == 1.5
    assert pod["pod_name"] == f"trainctl-{SESSION}-a2"
    assert plan.command[3:5] == ("--attempt", "2")
    with pytest.raises(Exception, match="over budget_usd"):
        planned(tmp_path, attempt=2, spent_usd=9.9, max_hours=3.0)


@pytest.mark.parametrize("over, resources, message", [
    ({"storage": "/tmp/folder"}, {}, "a folder on this machine, which a pod can't reach"),
    ({"secrets": {"AWS_ACCESS_KEY_ID": "k"}}, {}, "AWS_SECRET_ACCESS_KEY is not among the RunPod secrets"),
    ({}, {"gpu": ""}, "No GPU type chosen"),
    ({"secrets": {**SECRETS, "RUNPOD_API_KEY": "mine"}}, {}, "your own key never goes to a pod"),
])
def test_plans_that_cannot_be_right_are_refused_with_the_fix(tmp_path, over, resources, message):
    backend = RunPodBackend(settings=settings(**over), client=object())
    with pytest.raises(Exception, match=re.escape(message)) as info:
        planned(tmp_path, backend, **resources)
    assert info.value.hint and "\n" not in str(info.value)


def test_a_script_outside_the_project_is_refused(tmp_path):
    backend = RunPodBackend(settings=settings(), client=object())
    backend.use_facts(fixed_facts())
    root = project(tmp_path)
    outside = tmp_path / "elsewhere.py"
    outside.write_text("")
    with pytest.raises(UsageError, match="outside the project"):
        backend.plan(RunSpec(script=outside, session_id=SESSION, cwd=root, resources={"gpu": "NVIDIA RTX A4000"}))


def test_the_registry_knows_the_runpod_backend():
    found = get_backend("runpod")
    assert isinstance(found, RunPodBackend)
    with pytest.raises(UsageError, match="without settings"):
        found.plan(RunSpec(script=Path("x.py")))


# --- against the fake and moto -----------------------------------------------------------------------

@pytest.fixture
def live(tmp_path, fake: FakeRunPod, client, moto_server, s3_bucket):
    root = project(tmp_path)
    store_root = SessionStore(root / ".trainctl")
    backend = RunPodBackend(settings=settings(storage=f"s3://{s3_bucket}/trainctl",
                                              endpoint_url=moto_server.endpoint_url, region="us-east-1"),
                            client=client)
    session = store_root.create(session_id=SESSION, status="pending", backend="runpod", host="runpod",
                                processes=[])
    remote = RemoteSession(make_s3_store(moto_server.endpoint_url, s3_bucket, tmp_path / "up",
                                         prefix=f"trainctl/proj/{SESSION}"))
    return backend, root, session, remote


def launch(backend: RunPodBackend, root: Path, session, **resources) -> Handle:
    plan = backend.plan(spec(root, **resources))
    handle = backend.launch(plan, int(resources.get("attempt", 0)))
    session.update(handle=handle.to_json(), attempts=[{"attempt": handle.attempt, "handle": handle.to_json()}])
    return handle


def test_launch_uploads_the_code_then_its_record_then_creates_the_pod(live, fake: FakeRunPod, moto_server,
                                                                     s3_bucket):
    backend, root, session, remote = live
    handle = launch(backend, root, session)
    keys = [o.key for o in remote.store.list("code/")]
    assert keys == ["code/bundle.json", "code/bundle.tar.gz", "code/trainctl-0.1.0-py3-none-any.whl"]
    record = remote.store.get_json("code/bundle.json")
    assert record["run"] == {"script": "train.py", "args": ["--epochs", "2", 'a "quoted" arg']}
    assert record["summary"]["files"] == 2
    assert remote.read_session()["status"] == "pending"
    assert handle.backend == "runpod" and handle.ids["pod_id"] in fake.pods
    assert Handle.from_json(json.loads(json.dumps(handle.to_json()))) == handle
    created = [r for r in fake.requests if r["operation"] == "podFindAndDeployOnDemand"]
    assert len(created) == 1 and created[0]["auth"] == "user"
    env = {e["key"]: e["value"] for e in created[0]["variables"]["input"]["env"]}
    assert API_KEY not in json.dumps(created[0]["variables"]) and "RUNPOD_API_KEY" not in env


def test_describe_follows_the_pod_and_records_the_end_here(live, fake: FakeRunPod):
    backend, root, session, remote = live
    fake.provision_ticks = 3
    handle = launch(backend, root, session)
    first = backend.describe(handle)
    assert first.state is State.PENDING and first.running
    # the agent's sync, as storage shows it: output, events, then the end
    writer = remote.output_writer()
    writer.append(b"epoch 1 loss 0.5\n")
    writer.flush()
    events = remote.events_writer()
    events.append(b'{"v": 1, "t": 1, "kind": "metric", "step": 10, "values": {"loss": 0.5}}\n')
    events.flush()
    backend._looks.clear()
    running = backend.describe(handle)
    assert running.state in (State.PENDING, State.RUNNING)
    assert session.output_log.read_bytes() == b"epoch 1 loss 0.5\n"
    assert [m["values"] for m in session.metrics()] == [{"loss": 0.5}]
    remote.write_session({**remote.read_session(), "status": "completed", "exit_code": 0})
    remote.mark_ended("training completed", status="completed")
    fake.pods.pop(handle.ids["pod_id"])  # the agent ended its pod
    backend._looks.clear()
    done = backend.describe(handle)
    assert done.state is State.COMPLETED and not done.running and done.exit_code == 0
    data = session.read()
    assert data["status"] == "completed" and data["summary"]["last"] == {"loss": 0.5}
    assert data["end_reason"].startswith("the agent ended the session")
    backend._looks.clear()
    backend.describe(handle)  # seen again: recorded once, output not copied twice
    assert session.output_log.read_bytes() == b"epoch 1 loss 0.5\n"
    assert sum(1 for e in session.iter_events(("status",)) if e.get("source") == "runpod") == 1


def test_log_iter_reads_every_attempts_output_from_a_byte(live, fake: FakeRunPod):
    backend, root, session, remote = live
    handle = launch(backend, root, session)
    writer = remote.output_writer(max_bytes=16)
    writer.append(b"0123456789\nabcdefghij\nklm\n")
    writer.flush()
    assert b"".join(c.data for c in backend.log_iter(handle)) == b"0123456789\nabcdefghij\nklm\n"
    assert b"".join(c.data for c in backend.log_iter(handle, since=11)) == b"abcdefghij\nklm\n"
    elsewhere = Handle("runpod", {k: v for k, v in handle.ids.items() if k != "session_dir"}, 0)
    assert b"".join(c.data for c in backend.log_iter(elsewhere, since=22)) == b"klm\n"


def test_an_interrupted_pod_is_preempted_and_release_ends_it_for_good(live, fake: FakeRunPod):
    backend, root, session, _ = live
    handle = launch(backend, root, session, interruptible=True)
    fake.interrupt(handle.ids["pod_id"])
    backend._looks.clear()
    found = backend.describe(handle)
    assert found.state is State.PREEMPTED and "volume keeps billing" in found.details["why"]
    backend.release(handle)
    backend.release(handle)  # idempotent
    assert fake.terminated == [(handle.ids["pod_id"], "user")]
    assert [h.ids["pod_id"] for h in backend.list()] == []


def test_a_pod_stuck_provisioning_is_ended_by_describe(live, fake: FakeRunPod, tmp_path):
    backend, root, session, _ = live
    fake.provision_ticks = None
    backend.settings = settings(storage=backend.settings.storage, endpoint_url=backend.settings.endpoint_url,
                                region="us-east-1", provision_timeout_s=0)
    handle = launch(backend, root, session)
    found = backend.describe(handle)
    assert found.state is State.FAILED and "still provisioning" in found.details["why"]
    assert handle.ids["pod_id"] not in fake.pods
    assert session.read()["status"] == "failed"


def test_stop_gives_the_agent_its_window_then_reports_the_end(live, fake: FakeRunPod):
    backend, root, session, remote = live
    handle = launch(backend, root, session)
    backend.stop(handle, 60)
    assert fake.pods[handle.ids["pod_id"]].desired == "EXITED"
    assert backend.describe(handle).running  # the agent is still uploading its checkpoint
    remote.write_session({**remote.read_session(), "status": "preempted"})
    backend._looks.clear()
    assert backend.describe(handle).state is State.PREEMPTED


# --- the pod's own end ------------------------------------------------------------------------------

def test_a_pod_ends_itself_with_its_pod_scoped_key(fake: FakeRunPod, client):
    pod = client.create_pod("podFindAndDeployOnDemand", {
        "name": "n", "imageName": "img", "gpuTypeId": "NVIDIA RTX A4000", "gpuCount": 1, "cloudType": "SECURE"})
    env = {**fake.pod_environment(pod["id"]), "RUNPOD_API_BASE_URL": fake.base_url, "PATH": "/nonexistent"}
    assert "podTerminate" in end_this_pod("training completed", env)
    assert fake.terminated == [(pod["id"], "pod")]
    assert "already gone" in end_this_pod("again", {**env, "RUNPOD_API_KEY": API_KEY})
    with pytest.raises(RunPodApiError, match="not a RunPod pod"):
        end_this_pod("x", {"PATH": "/nonexistent"})


def test_the_agents_runpod_end_hook_terminates_its_pod(fake: FakeRunPod, client, monkeypatch):
    from trainctl.agent.ending import open_end_hook
    from trainctl.backends.base import EndFailedError
    from trainctl.backends.runpod import RunPodMachineEnd

    pod = client.create_pod("podFindAndDeployOnDemand", {
        "name": "n", "imageName": "img", "gpuTypeId": "NVIDIA RTX A4000", "gpuCount": 1, "cloudType": "SECURE"})
    for name, value in fake.pod_environment(pod["id"]).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", "/nonexistent")  # no runpodctl here: the API, with the pod's own key
    hook = open_end_hook("runpod")
    assert isinstance(hook, RunPodMachineEnd)
    hook.end_machine("training completed")
    assert fake.terminated == [(pod["id"], "pod")]
    assert "pod-scoped" in hook.describe()
    monkeypatch.delenv("RUNPOD_POD_ID")
    with pytest.raises(EndFailedError, match="not a RunPod pod"):
        hook.end_machine("again")
