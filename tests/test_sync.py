"""`trainctl local --sync URI` (a local run mirrored to storage by the agent's sync loop), and
reading a remote session from the laptop: `sessions pull ID|URI`, `sessions logs --follow`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainctl.storage import LocalStore
from trainctl.storage.remote import RemoteSession

from .conftest import EXAMPLES, clean_env, run_cli
from .servers import loopback_env, wait_for

TRAIN = ["--epochs", "2", "--steps-per-epoch", "20"]


def make_project(parent: Path, name: str = "proj", extra: str = "") -> Path:
    project = parent / name
    project.mkdir(parents=True)
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n' + extra)
    (project / "train.py").write_text((EXAMPLES / "quickstart.py").read_text())
    return project


def only_session(project: Path) -> Path:
    [found] = list((project / ".trainctl" / "sessions").iterdir())
    return found


@pytest.mark.slow
def test_local_sync_mirrors_the_session_and_pull_brings_it_back(tmp_path):
    project = make_project(tmp_path / "laptop-a")
    bucket = tmp_path / "bucket"
    done = run_cli(["local", "--no-preflight", "--sync", str(bucket), "train.py", *TRAIN, "--step-delay", "0.05"],
                   project, timeout=300)
    assert done.returncode == 0, done.stderr
    local = only_session(project)
    remote = RemoteSession(LocalStore(bucket / "proj" / local.name))
    assert "synced: " in done.stderr and remote.uri in done.stderr
    latest = remote.latest_checkpoint()
    assert latest["file"] == "ckpt-step00000040.pt"
    assert (bucket / "proj" / local.name / "checkpoints" / latest["file"]).read_bytes() == \
        (project / "checkpoints" / local.name / latest["file"]).read_bytes()
    events = b"".join(remote.store.get_bytes(o.key)[0] for o in remote.store.list("events/"))
    assert events == (local / "events.jsonl").read_bytes()
    assert "epoch 2/2 step 40/40" in remote.read_output()
    record = remote.read_session()
    assert record["id"] == local.name and record["status"] == "completed"
    assert remote.read_heartbeat()["released"]
    assert json.loads((local / "session.json").read_text())["storage"] == remote.uri

    # on another laptop: pull it by URI, then the usual commands work on it
    other = make_project(tmp_path / "laptop-b")
    pulled = run_cli(["sessions", "pull", remote.uri, "--checkpoints"], other)
    assert pulled.returncode == 0, pulled.stderr
    assert f"into session {local.name}" in pulled.stdout
    shown = json.loads(run_cli(["sessions", "show", local.name, "--json"], other).stdout)
    assert shown["status"] == "completed" and shown["summary"]["last"]["loss"] > 0
    listed = run_cli(["checkpoint", "list", "--session", local.name], other)
    assert "ckpt-step00000040.pt" in listed.stdout and "valid" in listed.stdout, listed.stdout + listed.stderr
    logs = run_cli(["sessions", "logs", local.name], other)
    assert "epoch 2/2 step 40/40" in logs.stdout
    assert list((other / ".trainctl" / "sessions" / local.name / "tensorboard").rglob("events.out.tfevents.*"))
    again = run_cli(["sessions", "pull", remote.uri], other)
    assert "0 object(s) fetched" in again.stdout
    # where it ran, a pull would overwrite the session itself: refused
    here = run_cli(["sessions", "pull", remote.uri], project)
    assert here.returncode == 2 and "ran in this project" in here.stderr
    assert json.loads((local / "session.json").read_text())["status"] == "completed"


def test_local_sync_detached_mirrors_the_session_like_the_foreground_run(tmp_path):
    project = make_project(tmp_path / "laptop-a")
    bucket = tmp_path / "bucket"
    started = run_cli(["local", "--no-preflight", "--sync", str(bucket), "--detach", "train.py", *TRAIN], project)
    assert started.returncode == 0, started.stderr
    local = only_session(project)
    remote = RemoteSession(LocalStore(bucket / "proj" / local.name))
    assert f"Started session {local.name} in the background" in started.stdout
    assert f"syncing  to {remote.uri}" in started.stdout
    record = wait_for(lambda: (lambda r: r if r.get("status") not in ("pending", "running") else None)(
        json.loads((local / "session.json").read_text())), timeout_s=240, interval_s=0.2)
    assert record["status"] == "completed" and record["storage"] == remote.uri
    # the background process closes the sync after the run: its last line says so
    wait_for(lambda: "[trainctl] synced: " in (local / "output.log").read_text(), timeout_s=120, interval_s=0.2)
    assert re.search(rf"\[trainctl\] synced: [12] checkpoint\(s\) uploaded, latest ckpt-step00000040\.pt "
                     rf"\({re.escape(remote.uri)}\)", (local / "output.log").read_text())
    assert remote.latest_checkpoint()["file"] == "ckpt-step00000040.pt"
    assert (bucket / "proj" / local.name / "checkpoints" / "ckpt-step00000040.pt").read_bytes() == \
        (project / "checkpoints" / local.name / "ckpt-step00000040.pt").read_bytes()
    events = b"".join(remote.store.get_bytes(o.key)[0] for o in remote.store.list("events/"))
    assert events == (local / "events.jsonl").read_bytes()
    assert "epoch 2/2 step 40/40" in remote.read_output()
    assert remote.read_session()["status"] == "completed" and remote.read_heartbeat()["released"]


def test_pull_by_id_looks_under_cloud_storage_for_this_project(tmp_path):
    bucket = tmp_path / "bucket"
    project = make_project(tmp_path / "laptop-a")
    assert run_cli(["local", "--no-preflight", "--sync", str(bucket), "train.py", "--epochs", "1",
                    "--steps-per-epoch", "5"], project, timeout=300).returncode == 0
    session_id = only_session(project).name
    other = make_project(tmp_path / "laptop-b", extra=f'[cloud]\nstorage = "{bucket}"\n')
    pulled = run_cli(["sessions", "pull", session_id], other)
    assert pulled.returncode == 0, pulled.stderr
    assert "1 checkpoint file(s) left in storage" in pulled.stdout
    assert json.loads(run_cli(["sessions", "show", session_id, "--json"], other).stdout)["id"] == session_id


def test_local_sync_to_s3_through_the_configured_endpoint(tmp_path, moto_server, s3_bucket):
    project = make_project(tmp_path, extra=f'[cloud]\nendpoint_url = "{moto_server.endpoint_url}"\n')
    done = subprocess.run([sys.executable, "-m", "trainctl", "local", "--no-preflight", "--sync",
                           f"s3://{s3_bucket}/runs", "train.py", *TRAIN], cwd=project, env=loopback_env(clean_env()),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    session_id = only_session(project).name
    store = moto_server.client()
    latest = json.loads(store.get_object(Bucket=s3_bucket, Key=f"runs/proj/{session_id}/latest.json")["Body"].read())
    assert latest["file"] == "ckpt-step00000040.pt" and latest["step"] == 40


@pytest.mark.slow
def test_logs_follow_reads_a_remote_session_while_it_runs(tmp_path):
    project = make_project(tmp_path / "laptop-a")
    bucket = tmp_path / "bucket"
    run = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", "--sync", str(bucket),
                            "train.py", "--epochs", "3", "--steps-per-epoch", "20", "--step-delay", "0.1"],
                           cwd=project, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        folder = wait_for(lambda: next(iter((bucket / "proj").glob("*/heartbeat.json")), None), timeout_s=120,
                          interval_s=0.1).parent
        follow = subprocess.run([sys.executable, "-m", "trainctl", "sessions", "logs", str(folder), "--follow"],
                                cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=240)
        assert run.wait(timeout=120) == 0
    finally:
        run.kill()
        run.wait()
    assert follow.returncode == 0, follow.stderr
    epochs = [" ".join(line.split()[:4]) for line in follow.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs == ["epoch 1/3 step 20/60", "epoch 2/3 step 40/60", "epoch 3/3 step 60/60"]  # each once, in order
    assert "released the session" in follow.stderr or "session ended" in follow.stderr


@pytest.mark.slow
def test_monitor_reads_a_synced_session_from_storage_by_uri(tmp_path):
    """`monitor URI` (a folder store here, as s3://) reads the session where it is synced:
    --follow refreshes from its segments until it ends, --once shows where it stands; a session
    pulled from storage is read at its source too. Nothing is written where monitor runs."""
    project = make_project(tmp_path / "laptop-a")
    bucket = tmp_path / "bucket"
    run = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", "--sync", str(bucket),
                            "train.py", "--epochs", "3", "--steps-per-epoch", "20", "--step-delay", "0.1"],
                           cwd=project, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other = make_project(tmp_path / "laptop-b")
    try:
        folder = wait_for(lambda: next(iter((bucket / "proj").glob("*/heartbeat.json")), None), timeout_s=120,
                          interval_s=0.1).parent
        follow = subprocess.run([sys.executable, "-m", "trainctl", "monitor", str(folder), "--follow", "--json",
                                 "--interval", "0.2"], cwd=other, env=clean_env(), capture_output=True, text=True,
                                timeout=240)
        assert run.wait(timeout=120) == 0
    finally:
        run.kill()
        run.wait()
    assert follow.returncode == 0, follow.stderr
    snaps = [json.loads(line) for line in follow.stdout.splitlines()]
    assert snaps[0]["status"] in ("pending", "running") and snaps[-1]["status"] == "completed"
    assert snaps[-1]["session"] == folder.name and snaps[-1]["storage"]["uri"] == folder.as_uri()
    assert snaps[-1]["progress"]["step"] == 60 and snaps[-1]["metrics"]["loss"]["last"] > 0
    steps = [s["progress"]["step"] for s in snaps if s["progress"]["step"] is not None]
    assert steps == sorted(steps) and len(snaps) > 1
    assert not (other / ".trainctl").exists()

    for ref in (str(folder), folder.as_uri()):
        once = run_cli(["monitor", ref, "--once"], other)
        assert once.returncode == 0, once.stderr
        assert once.stdout.startswith(f"session {folder.name}") and "completed" in once.stdout.splitlines()[0]
        assert "step 60/60" in once.stdout and "checkpoints 3" in once.stdout, once.stdout
    assert run_cli(["sessions", "pull", str(folder)], other).returncode == 0
    pulled = json.loads(run_cli(["monitor", folder.name, "--json"], other).stdout)
    assert pulled["status"] == "completed" and pulled["storage"]["uri"] == folder.as_uri()
    folder.rename(tmp_path / "moved")  # storage gone: the copy pulled here still answers, with a warning
    offline = run_cli(["monitor", folder.name, "--json"], other)
    assert offline.returncode == 0 and "showing the copy pulled here" in offline.stderr, offline.stderr
    assert json.loads(offline.stdout)["status"] == "completed"


@pytest.mark.parametrize("args, code, message", [
    (["local", "--sync", "ftp://host/x", "train.py"], 2, "unsupported scheme 'ftp://'"),
    (["sessions", "pull", "20260101-000000-abcdef"], 2, "no [cloud] storage is set"),
    (["sessions", "pull", "EMPTY"], 3, "No session at"),
    (["sessions", "logs", "nosuch"], 3, "No session 'nosuch'"),
    (["monitor", "EMPTY"], 3, "No session at"),
])
def test_bad_input_is_one_line_and_the_fix(tmp_path, args, code, message):
    project = make_project(tmp_path)
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "bucket") if a == "BUCKET" else str(tmp_path / "empty") if a == "EMPTY" else a
            for a in args]
    done = run_cli(args, project)
    assert done.returncode == code, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert "hint:" in done.stderr
    assert not (tmp_path / "bucket").exists()

