"""Runs that outlive their terminal: detach and reattach, logs, stop, delete, SIGHUP, and a
launcher killed with SIGKILL (real processes, real files; issue 11)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainctl.errors import EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_USAGE
from trainctl.session import Session, SessionStore

from .conftest import EXAMPLES, REPO, clean_env, run_cli

QUICKSTART = str(EXAMPLES / "quickstart.py")
SLOW_TRAIN = ["--epochs", "1", "--steps-per-epoch", "4000", "--checkpoint-every", "1000000",
              "--step-delay", "0.01"]


def only_session(project: Path) -> Session:
    store = SessionStore(project / ".trainctl")
    (sid,) = store.ids()
    return Session(store.sessions_dir / sid)


def wait_for(predicate, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def script_running(session: Session) -> int | None:
    """The pid of the training process once trainctl.init() has run in it."""
    try:
        runtime = session.read().get("runtime") or {}
    except Exception:
        return None
    return runtime.get("pid")


def steps_logged(session: Session) -> int:
    return sum(1 for e in session.metrics() if "loss" in e.get("values", {}))


def emergency_checkpoints(project: Path, session: Session) -> list[Path]:
    return sorted((project / "checkpoints" / session.id).glob("*emergency*.pt"))


def test_sighup_to_an_attached_launcher_is_a_sigterm_with_an_emergency_checkpoint(project):
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", QUICKSTART, *SLOW_TRAIN],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    session = wait_for(lambda: SessionStore(project / ".trainctl").ids() and only_session(project), "a session")
    wait_for(lambda: steps_logged(session) >= 5, "training steps")
    proc.send_signal(signal.SIGHUP)  # the terminal closed
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    (ckpt,) = emergency_checkpoints(project, session)
    assert torch.load(ckpt, weights_only=True)["trainctl"]["step"] >= 5
    assert session.read()["status"] == "killed"


def test_launcher_killed_with_sigkill_leaves_a_preempted_session_that_resume_auto_continues(project):
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", QUICKSTART, *SLOW_TRAIN],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    session = wait_for(lambda: SessionStore(project / ".trainctl").ids() and only_session(project), "a session")
    script = wait_for(lambda: script_running(session), "the script")
    wait_for(lambda: steps_logged(session) >= 5, "training steps")
    proc.kill()  # SIGKILL: the launcher gets no chance to forward anything
    proc.communicate(timeout=30)
    wait_for(lambda: not _alive(script), "the script to end on its own", timeout=120)
    data = session.read()
    assert data["status"] == "preempted", data
    (ckpt,) = emergency_checkpoints(project, session)
    step = torch.load(ckpt, weights_only=True)["trainctl"]["step"]
    assert data["summary"]["last_checkpoint"] == str(ckpt)
    listed = json.loads(run_cli(["sessions", "list", "--json"], project).stdout)
    assert listed[0]["status"] == "preempted"
    shown = run_cli(["sessions", "show", session.id], project).stdout
    assert "preempted" in shown and f"trainctl checkpoint resume {ckpt}" in shown
    assert f"trainctl checkpoint resume {ckpt}" in session.output_log.read_text()
    # --resume auto continues from the emergency checkpoint
    r = run_cli(["local", "--no-preflight", "--resume", "auto", QUICKSTART, "--epochs", "1",
                 "--steps-per-epoch", str(step + 3)], project, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {ckpt}" in r.stderr
    assert f"at epoch 1, step {step}" in r.stdout


def test_launcher_killed_with_sigkill_under_torchrun_every_rank_stops_with_one_emergency_checkpoint(project):
    script = str(REPO / "tests" / "scripts" / "ddp_train.py")
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", "--nproc-per-node", "2",
                             script, "--steps", "2000", "--checkpoint-every", "100000", "--step-delay", "0.05"],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    session = wait_for(lambda: SessionStore(project / ".trainctl").ids() and only_session(project), "a session")
    ranks = wait_for(lambda: all((project / f"pid{r}").exists() for r in (0, 1)) and
                     [int((project / f"pid{r}").read_text()) for r in (0, 1)], "both ranks")
    wait_for(lambda: steps_logged(session) >= 3, "training steps")
    proc.kill()
    proc.communicate(timeout=30)
    for pid in ranks:
        wait_for(lambda pid=pid: not _alive(pid), f"rank process {pid} to end", timeout=120)
    assert session.read()["status"] == "preempted"
    (ckpt,) = emergency_checkpoints(project, session)
    assert torch.load(ckpt, weights_only=True)["trainctl"]["world_size"] == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_session_records_backend_handle_and_checkpoint_location(project, cli):
    r = cli("local", "--no-preflight", QUICKSTART, "--epochs", "1", "--steps-per-epoch", "3")
    assert r.returncode == 0, r.stderr
    data = only_session(project).read()
    assert data["backend"] == "local"
    assert data["checkpoint_location"] == str((project / "checkpoints" / data["id"]).resolve())
    assert data["handle"]["backend"] == "local" and data["handle"]["ids"]["pid"] > 0


@pytest.mark.slow
def test_detach_close_reattach_stop_then_resume_auto_continues(project):
    r = run_cli(["local", "--detach", "--no-preflight", QUICKSTART, *SLOW_TRAIN], project)
    assert r.returncode == 0, r.stderr
    session = only_session(project)
    assert session.id in r.stdout
    for follow_up in (f"trainctl sessions attach {session.id}", f"trainctl sessions logs {session.id} --follow",
                      f"trainctl sessions stop {session.id}"):
        assert follow_up in r.stdout
    wait_for(lambda: steps_logged(session) >= 5, "training steps")

    # attach, then close the attaching process: the run goes on
    attach = subprocess.Popen([sys.executable, "-m", "trainctl", "sessions", "attach", session.id], cwd=project,
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = steps_logged(session)
    wait_for(lambda: steps_logged(session) > before + 5, "progress while attached")
    attach.send_signal(signal.SIGINT)  # Ctrl-C detaches
    _out, err = attach.communicate(timeout=30)
    assert attach.returncode == 0, err
    assert "detached" in err and f"trainctl sessions attach {session.id}" in err
    seen = steps_logged(session)
    wait_for(lambda: steps_logged(session) > seen + 5, "progress after the attach ended")
    assert session.read()["status"] == "running"

    logs = run_cli(["sessions", "logs", session.id, "--tail", "3"], project)
    assert logs.returncode == 0 and len(logs.stdout.splitlines()) <= 3

    # reattach in another process while it is stopped from a third: attach ends with the run
    attach = subprocess.Popen([sys.executable, "-m", "trainctl", "sessions", "attach", session.id], cwd=project,
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = run_cli(["sessions", "stop", session.id], project, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert "stopped" in stop.stdout
    _out, err = attach.communicate(timeout=60)
    assert f"session {session.id} stopped" in err
    data = session.read()
    assert data["status"] == "stopped"
    (ckpt,) = emergency_checkpoints(project, session)
    step = torch.load(ckpt, weights_only=True)["trainctl"]["step"]
    assert data["summary"]["last_checkpoint"] == str(ckpt)
    assert json.loads(run_cli(["sessions", "list", "--status", "stopped", "--json"], project).stdout)[0]["id"] == session.id

    again = run_cli(["sessions", "stop", session.id], project)
    assert again.returncode == 0 and "not running" in again.stdout

    r = run_cli(["local", "--no-preflight", "--resume", "auto", QUICKSTART, "--epochs", "1",
                 "--steps-per-epoch", str(step + 3)], project, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {ckpt}" in r.stderr and f"step {step}" in r.stdout


def test_logs_of_a_finished_session_and_follow_until_the_end(project, cli):
    (project / "talk.py").write_text("import time\nfor i in range(30):\n    print('line', i, flush=True)\n    time.sleep(0.02)\n")
    r = cli("local", "--detach", "--no-preflight", "talk.py")
    assert r.returncode == 0, r.stderr
    session = only_session(project)
    follow = cli("sessions", "logs", session.id, "--follow", timeout=120)  # returns when the run ends
    assert follow.returncode == 0, follow.stderr
    assert [line for line in follow.stdout.splitlines() if line.startswith("line")] == [f"line {i}" for i in range(30)]
    tail = cli("sessions", "logs", session.id, "--tail", "2")
    assert tail.stdout.splitlines() == ["line 28", "line 29"]
    assert session.read()["status"] == "completed"
    attach = cli("sessions", "attach", session.id)  # already over: says how it ended
    assert attach.returncode == 0 and "completed" in attach.stderr


def test_stop_now_kills_without_grace(project, cli):
    (project / "stubborn.py").write_text(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(300)\n")
    r = cli("local", "--detach", "--no-preflight", "stubborn.py")
    assert r.returncode == 0, r.stderr
    session = only_session(project)
    wait_for(lambda: b"up" in session.output_log.read_bytes() if session.output_log.exists() else False, "output")
    stop = cli("sessions", "stop", session.id, "--now", timeout=60)
    assert stop.returncode == 0, stop.stderr
    data = session.read()
    assert data["status"] == "stopped"
    assert data["attempts"][-1]["signal"] == "SIGKILL"


def test_delete_says_what_it_removes_refuses_running_and_is_idempotent(project, cli):
    r = cli("local", "--no-preflight", QUICKSTART, "--epochs", "1", "--steps-per-epoch", "3")
    assert r.returncode == 0, r.stderr
    done = only_session(project)
    ckpt_dir = project / "checkpoints" / done.id
    assert any(ckpt_dir.glob("*.pt"))

    preview = cli("sessions", "delete", done.id, "--checkpoints", "--dry-run")
    assert preview.returncode == 0 and str(done.dir) in preview.stdout and "ckpt-step00000003.pt" in preview.stdout
    assert done.dir.exists() and any(ckpt_dir.glob("*.pt"))
    refused = cli("sessions", "delete", done.id)  # not a terminal, no --yes
    assert refused.returncode == EXIT_USAGE and "--yes" in refused.stderr and done.dir.exists()

    kept = cli("sessions", "delete", done.id, "--yes")
    assert kept.returncode == 0, kept.stderr
    assert not done.dir.exists() and any(ckpt_dir.glob("*.pt"))
    assert "freed" in kept.stdout and "kept" in kept.stdout and "--checkpoints" in kept.stdout
    again = cli("sessions", "delete", done.id, "--yes")
    assert again.returncode == 0 and "already" in again.stdout

    (project / "slow.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(300)\n")
    started = cli("local", "--detach", "--no-preflight", "slow.py")
    running = SessionStore(project / ".trainctl").get("latest")
    busy = cli("sessions", "delete", running.id, "--yes")
    assert busy.returncode == EXIT_USAGE and "running" in busy.stderr and running.dir.exists(), started.stdout
    assert cli("sessions", "stop", running.id, "--now").returncode == 0
    gone = cli("sessions", "delete", running.id, "--checkpoints", "--yes")
    assert gone.returncode == 0 and not running.dir.exists()


def test_dry_run_shows_the_plan_with_secrets_redacted_and_starts_nothing(project, cli):
    (project / "train.py").write_text("print('never runs')\n")
    r = cli("local", "--dry-run", "--nproc-per-node", "2", "train.py", "--api-key", "s3cret", "--lr", "0.1")
    assert r.returncode == 0, r.stderr
    assert "s3cret" not in r.stdout and "--api-key '***' --lr 0.1" in r.stdout
    assert "torch.distributed.run" in r.stdout and "TRAIN_OPS_BACKEND=local" in r.stdout
    assert str(project / "checkpoints") in r.stdout and "never runs" not in r.stdout + r.stderr
    assert not (project / ".trainctl" / "sessions").exists() or not any((project / ".trainctl" / "sessions").iterdir())


@pytest.mark.parametrize(("args", "code", "fragment"), [
    (["sessions", "logs", "nope"], EXIT_NOT_FOUND, "No session 'nope'"),
    (["sessions", "attach", "nope"], EXIT_NOT_FOUND, "No session 'nope'"),
    (["sessions", "stop", "nope"], EXIT_NOT_FOUND, "No session 'nope'"),
    (["sessions", "delete", "nope", "--yes"], EXIT_NOT_FOUND, "No session 'nope'"),
    (["sessions", "logs", "latest", "--tail", "-1"], EXIT_USAGE, "--tail"),
    (["local", "--detach", "missing.py"], EXIT_NOT_FOUND, "missing.py does not exist"),
])
def test_bad_input_is_one_line(project, cli, args, code, fragment):
    (project / "ok.py").write_text("print('ok')\n")
    assert cli("local", "--no-preflight", "ok.py").returncode == 0
    r = cli(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert fragment in r.stderr and "Traceback" not in r.stderr
