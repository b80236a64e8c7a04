"""Preemption, automatic restarts with resume, bit-exact continuation, torchrun (issue 4)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trainctl.errors import EXIT_PREEMPTED
from trainctl.session import Session, SessionStore

from .conftest import EXAMPLES, REPO, clean_env, run_cli

QUICKSTART = str(EXAMPLES / "quickstart.py")


def sessions(project: Path) -> list[Session]:
    store = SessionStore(project / ".trainctl")
    return [Session(store.sessions_dir / i) for i in store.ids()]


def final_state(project: Path, session: Session, step: int) -> dict:
    path = project / "checkpoints" / session.id / f"ckpt-step{step:08d}.pt"
    return torch.load(path, weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    for key in ("model", "optimizer"):
        flat_a, flat_b = _flatten(a[key]), _flatten(b[key])
        assert flat_a.keys() == flat_b.keys()
        for name in flat_a:
            va, vb = flat_a[name], flat_b[name]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), f"{key}.{name} differs"
            else:
                assert va == vb, f"{key}.{name} differs"


def _flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix] = obj
    return out


def script_pid(session: Session, attempt: int) -> int | None:
    try:
        data = session.read()
    except Exception:
        return None
    runtime = data.get("runtime") or {}
    if runtime.get("attempt") == attempt and runtime.get("pid"):
        return runtime["pid"]  # the training process itself has started (past `import torch`)
    return None


def start_launcher(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", *args],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_session(project: Path, timeout: float = 60) -> Session:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sessions(project)
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("no session appeared")


TRAIN_ARGS = ["--epochs", "2", "--steps-per-epoch", "40", "--checkpoint-every", "4"]
TOTAL = 80


@pytest.mark.slow
def test_chaos_sigkill_at_random_moments_ends_bit_identical(project):
    baseline = run_cli(["local", "--no-preflight", QUICKSTART, *TRAIN_ARGS], project, timeout=300)
    assert baseline.returncode == 0, baseline.stderr
    reference = sessions(project)[0]

    rng = random.Random(1234)
    proc = start_launcher(project, "--max-restarts", "20", "--restart-delay", "0", QUICKSTART,
                          *TRAIN_ARGS, "--step-delay", "0.02")
    deadline = time.time() + 30
    while len(sessions(project)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    session = sessions(project)[0]
    assert session.id != reference.id
    ckpt_dir = project / "checkpoints" / session.id
    kills = []
    for attempt in range(6):
        pid = None
        while pid is None and proc.poll() is None:
            pid = script_pid(session, attempt)
            time.sleep(0.02)
        if proc.poll() is not None:
            break
        if attempt % 2:  # kill while a checkpoint is being written
            deadline = time.time() + 10
            while time.time() < deadline and not any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir()):
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.1, 0.4))
        try:
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)
        except ProcessLookupError:
            pass
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert len(kills) >= 5
    data = session.read()
    assert data["status"] == "completed" and len(data["attempts"]) >= 6
    assert_same_training_state(final_state(project, session, TOTAL), final_state(project, reference, TOTAL))
    # one clean curve: every step exactly once, no gaps
    steps = [e["step"] for e in session.metrics() if "loss" in e["values"]]
    assert sorted(steps) == list(range(1, TOTAL + 1))
    assert len([e for e in session.iter_events(("restart",))]) == len(data["attempts"]) - 1


@pytest.mark.slow
def test_sigterm_to_script_writes_emergency_checkpoint_and_restart_resumes(project):
    baseline = run_cli(["local", "--no-preflight", QUICKSTART, "--epochs", "1", "--steps-per-epoch", "60"],
                       project, timeout=300)
    assert baseline.returncode == 0
    reference = sessions(project)[0]
    proc = start_launcher(project, "--max-restarts", "2", "--restart-delay", "0", QUICKSTART,
                          "--epochs", "1", "--steps-per-epoch", "60", "--step-delay", "0.03")
    time.sleep(0.5)
    session = sessions(project)[0]
    pid = None
    while pid is None:
        pid = script_pid(session, 0)
        time.sleep(0.02)
    time.sleep(0.5)
    os.kill(pid, signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    data = session.read()
    first = data["attempts"][0]
    assert first["status"] == "preempted" and first["exit_code"] == EXIT_PREEMPTED
    emergency = [e for e in session.iter_events(("checkpoint",)) if "emergency" in e["path"]]
    assert len(emergency) == 1
    assert data["attempts"][1]["resume_from"] == emergency[0]["path"]
    assert_same_training_state(final_state(project, session, 60), final_state(project, reference, 60))
    steps = [e["step"] for e in session.metrics() if "loss" in e["values"]]
    assert sorted(steps) == list(range(1, 61))


def test_sigterm_to_launcher_ends_killed_without_orphans(project):
    (project / "slow.py").write_text(textwrap.dedent("""
        import os, subprocess, sys, time
        open("pids", "w").write(f"{os.getpid()} " + str(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]).pid))
        time.sleep(120)
    """))
    proc = start_launcher(project, "--grace-period", "2", "slow.py")
    deadline = time.time() + 30
    while not (project / "pids").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    pids = [int(p) for p in (project / "pids").read_text().split()]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert sessions(project)[0].read()["status"] == "killed"


def test_crash_loop_stops_with_the_repeating_error(project):
    (project / "bad.py").write_text("raise ValueError('config is broken')\n")
    r = run_cli(["local", "--no-preflight", "--max-restarts", "10", "--restart-delay", "0", "bad.py"],
                project, timeout=120)
    assert r.returncode == 1
    data = sessions(project)[0].read()
    assert len(data["attempts"]) == 3  # stopped early, not 11 times
    assert "same error" in r.stderr and "config is broken" in r.stderr


def test_script_that_never_checkpoints_restarts_from_scratch(project):
    (project / "flaky.py").write_text(textwrap.dedent("""
        import os, sys
        attempt = int(os.environ["TRAIN_OPS_ATTEMPT"])
        print("attempt", attempt, "resume", os.environ.get("TRAIN_OPS_RESUME"))
        sys.exit(0 if attempt == 1 else 1)
    """))
    r = run_cli(["local", "--no-preflight", "--max-restarts", "3", "--restart-delay", "0", "flaky.py"],
                project, timeout=120)
    assert r.returncode == 0
    assert "restarting from scratch" in r.stderr
    assert "attempt 1 resume None" in r.stdout


@pytest.mark.parametrize("value", ["-1", "two"])
def test_bad_max_restarts(project, value):
    (project / "ok.py").write_text("pass\n")
    r = run_cli(["local", "--max-restarts", value, "ok.py"], project)
    assert r.returncode == 2 and "max-restarts" in r.stderr and "Traceback" not in r.stderr
    assert not (project / ".trainctl").exists()


@pytest.mark.slow
def test_torchrun_two_processes_one_session_rank0_writes_and_resume(project):
    script = str(REPO / "tests" / "scripts" / "ddp_train.py")
    r = run_cli(["local", "--no-preflight", "--nproc-per-node", "2", script, "--steps", "10"],
                project, timeout=300)
    assert r.returncode == 0, r.stderr
    (session,) = sessions(project)
    metric_steps = [e["step"] for e in session.metrics()]
    assert metric_steps == list(range(1, 11))  # written once, by rank 0
    ckpts = sorted(p.name for p in (project / "checkpoints" / session.id).glob("*.pt"))
    assert ckpts == ["ckpt-step00000005.pt", "ckpt-step00000010.pt"]
    ranks = [json.loads((project / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["is_main"] for r in ranks] == [True, False]
    assert {r["session"] for r in ranks} == {session.id}
    # resume: both ranks read the same checkpoint
    ckpt = project / "checkpoints" / session.id / "ckpt-step00000005.pt"
    r = run_cli(["local", "--no-preflight", "--nproc-per-node", "2", "--resume", str(ckpt), script,
                 "--steps", "10"], project, timeout=300)
    assert r.returncode == 0, r.stderr
    ranks = [json.loads((project / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["start"] for r in ranks] == [5, 5]


def test_signal_during_emergency_checkpoint_writes_exactly_one(project):
    (project / "big.py").write_text(textwrap.dedent("""
        import os, time, torch, trainctl
        run = trainctl.init()
        model = torch.nn.Linear(2048, 2048)  # ~16 MB: the save takes a moment
        run.track(model=model)
        open("ready", "w").write(str(os.getpid()))
        step = 0
        while True:
            step += 1
            time.sleep(0.01)
            run.log({"loss": 1.0 / step}, step=step)
    """))
    proc = subprocess.Popen([sys.executable, "big.py"], cwd=project, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (project / "ready").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    for _ in range(3):  # a second and third signal land while the first one's checkpoint is written
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.03)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    (session,) = sessions(project)
    ckpts = [e for e in session.iter_events(("checkpoint",))]
    assert len(ckpts) == 1 and "emergency" in ckpts[0]["path"]
    assert session.read()["status"] == "preempted"
    assert torch.load(ckpts[0]["path"], weights_only=True)["trainctl"]["step"] == ckpts[0]["step"]


def test_stop_signals_every_millisecond_still_end_in_one_emergency_checkpoint_and_the_preempted_code(project):
    """A launcher (or a cloud's shutdown) may signal again and again: one that lands while the
    interpreter shuts down, after Python gave its handlers back, killed the script by the signal
    (-15), and the launcher read a kill where a preemption with its checkpoint had happened."""
    (project / "storm.py").write_text(textwrap.dedent("""
        import os, subprocess, sys, time, trainctl
        class Counter:
            step = 0
            def state_dict(self):
                return {"step": self.step}
            def load_state_dict(self, d):
                self.step = d["step"]
        run = trainctl.init()
        counter = Counter()
        run.track(counter=counter)
        # a child that signals this process every millisecond until it is gone (reparented)
        subprocess.Popen([sys.executable, "-c", "import os, signal, time\\n"
                          "pid = os.getppid()\\n"
                          "while os.getppid() == pid:\\n"
                          "    os.kill(pid, signal.SIGTERM)\\n"
                          "    time.sleep(0.001)\\n"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            counter.step += 1
            time.sleep(0.01)
            run.log({"loss": 1.0 / counter.step}, step=counter.step)
    """))
    for _ in range(3):
        done = subprocess.run([sys.executable, "storm.py"], cwd=project, env=clean_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == EXIT_PREEMPTED, done.stderr[-2000:]
    for session in sessions(project):
        ckpts = list(session.iter_events(("checkpoint",)))
        assert len(ckpts) == 1 and "emergency" in ckpts[0]["path"]
        assert session.read()["status"] == "preempted"


@pytest.mark.slow
def test_torchrun_preemption_reaches_every_rank_and_writes_one_emergency_checkpoint(project):
    script = str(REPO / "tests" / "scripts" / "ddp_train.py")
    proc = start_launcher(project, "--nproc-per-node", "2", "--max-restarts", "1", "--restart-delay", "0",
                          script, "--steps", "40", "--checkpoint-every", "100", "--step-delay", "0.05")
    session = wait_for_session(project)
    deadline = time.time() + 120
    while not all((project / f"pid{r}").exists() for r in (0, 1)) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    torchrun_pid = next(p["pid"] for p in session.read()["processes"] if p["role"] == "script")
    os.killpg(torchrun_pid, signal.SIGTERM)  # as a spot notice or a cluster would: the whole group
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    data = session.read()
    assert data["attempts"][0]["status"] == "preempted"
    emergency = [e for e in session.iter_events(("checkpoint",)) if "emergency" in e["path"]]
    assert len(emergency) == 1
    assert data["attempts"][1]["resume_from"] == emergency[0]["path"]
    steps = [e["step"] for e in session.metrics()]
    assert sorted(steps) == list(range(1, 41))
