"""RunPod end to end, without RunPod: `trainctl runpod launch` against the fake API and moto's S3,
then the test plays the pod, running its start command (the bootstrap, then `trainctl agent`) in
a folder of its own with the environment RunPod would give it. A session completes and its pod
ends itself; an interrupted pod and `runpod resume` end with the same weights as a run that was
never interrupted."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import EXAMPLES, run_cli
from tests.fake_runpod import fake
from tests.runpod_world import PodPlayer, World, launched_session, world
from tests.servers import wait_for
from tests.test_interruptions import assert_same_training_state

__all__ = ["fake", "world"]  # fixtures

TRAIN = ["--epochs", "2", "--steps-per-epoch", "20", "--checkpoint-every", "5"]


def reference_state(tmp_path) -> dict:
    """The same training, uninterrupted, with `trainctl local` here: its final state."""
    project = tmp_path / "reference"
    project.mkdir()
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    done = run_cli(["local", "--no-preflight", str(EXAMPLES / "quickstart.py"), *TRAIN], project, timeout=300)
    assert done.returncode == 0, done.stderr
    newest = sorted((project / "checkpoints").glob("*/ckpt-step*.pt"))[-1]
    return torch.load(newest, weights_only=True)


def final_state(world: World, sid: str, tmp_path) -> dict:
    remote = world.remote(sid)
    latest = remote.latest_checkpoint()
    assert latest is not None and latest["step"] == 40, latest
    return torch.load(remote.fetch_checkpoint(tmp_path / "fetched"), weights_only=True)


def launch(world: World, *extra: str) -> str:
    r = world.run("runpod", "launch", "--yes", "--detach", *extra, "train.py", *TRAIN)
    assert r.returncode == 0, r.stderr
    return launched_session(r)


@pytest.mark.slow
def test_a_pod_session_completes_and_its_pod_ends_itself(world: World, tmp_path):
    sid = launch(world)
    pod = world.only_pod()
    player = PodPlayer(world, pod, tmp_path / "pod").start()
    rc, out = player.wait()
    assert rc in (0, -9), out  # the pod ended itself (its container killed as RunPod would)
    assert world.fake.terminated == [(pod, "pod")], out  # with its own, pod-scoped key
    status = world.run("runpod", "status", sid)
    assert status.returncode == 0, status.stderr
    assert "completed: the agent ended the session: training completed" in status.stdout
    shown = world.run("sessions", "show", sid)
    assert "status          completed" in shown.stdout and "loss" in shown.stdout
    logs = world.run("sessions", "logs", sid)
    assert "epoch 2" in logs.stdout or "step" in logs.stdout, logs.stdout
    assert world.session(sid)["status"] == "completed"
    pulled = world.run("sessions", "pull", sid, "--checkpoints")  # the newest checkpoint, here
    assert pulled.returncode == 0, pulled.stderr
    assert f"Session {sid} (completed) was launched from here" in pulled.stdout
    [local] = (world.project / "checkpoints" / sid).glob("*.pt")
    assert f"downloaded and verified: {local}" in pulled.stdout
    final = torch.load(local, weights_only=True)
    assert_same_training_state(final, final_state(world, sid, tmp_path))
    assert_same_training_state(final, reference_state(tmp_path))


@pytest.mark.slow
def test_an_interrupted_pod_and_runpod_resume_end_with_the_weights_of_an_uninterrupted_run(world: World,
                                                                                            tmp_path):
    sid = launch(world, "--interruptible")
    first = world.only_pod()
    player = PodPlayer(world, first, tmp_path / "pod-1").start()
    remote = world.remote(sid)
    wait_for(lambda: (remote.latest_checkpoint() or {}).get("step", 0) >= 10, timeout_s=240)
    player.interrupt()  # SIGTERM to the container, as an outbid pod gets
    world.fake.interrupt(first)  # ... then RunPod stops it, volume kept
    rc, out = player.wait()
    assert rc == 143, out
    assert world.fake.terminated == [], out  # an interrupted pod is RunPod's to stop
    status = world.run("runpod", "status", sid)
    assert "preempted" in status.stdout, status.stdout + status.stderr
    resumed = world.run("runpod", "resume", sid, "--yes", "--detach")
    assert resumed.returncode == 0, resumed.stderr
    assert (first, "user") in world.fake.terminated  # the stopped pod ended, not restarted
    second = world.only_pod()
    player = PodPlayer(world, second, tmp_path / "pod-2").start()
    rc, out = player.wait()
    assert (second, "pod") in world.fake.terminated, out
    assert world.run("runpod", "status", sid).returncode == 0
    data = world.session(sid)
    assert data["status"] == "completed" and [a["attempt"] for a in data["attempts"]] == [0, 1]
    assert_same_training_state(final_state(world, sid, tmp_path), reference_state(tmp_path))
