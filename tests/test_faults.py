"""Faults from outside the script, end to end (issue 13 #10): a checkpoint disk that turns
read-only mid-run, a run killed with every process at once, a launcher killed with SIGKILL
while its script prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainctl.launcher.diagnose import diagnose
from trainctl.session import Session, SessionStore

from .conftest import clean_env, run_cli


def only_session(project: Path) -> Session:
    store = SessionStore(project / ".trainctl")
    (sid,) = store.ids()
    return Session(store.sessions_dir / sid)


def wait_for(predicate, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s  # a bound for a hang, not a speed assertion
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def checkpoint_mount(project: Path):
    """The project's checkpoint dir on a tmpfs the test mounts (and may remount read-only)."""
    folder = project / "checkpoints"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


SAVES_UNTIL_TOLD = """
    import os, sys, time
    import torch, trainctl
    run = trainctl.init()
    model = torch.nn.Linear(4, 1)
    run.track(model=model)
    for step in range(1, 4):
        run.save_checkpoint(step=step)
    print("saved 3", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.02)
    run.save_checkpoint(step=4)
"""


def test_a_checkpoint_disk_that_turns_read_only_mid_run_is_named(project, checkpoint_mount):
    (project / "train.py").write_text(textwrap.dedent(SAVES_UNTIL_TOLD))
    go = project / "go"
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", "train.py", str(go)],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "saved 3"
    subprocess.run(["mount", "-o", "remount,ro", str(checkpoint_mount)], check=True)
    go.write_text("")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    diagnosis = only_session(project).read()["diagnosis"]
    assert diagnosis["kind"] == "read_only", diagnosis
    assert "read-only" in diagnosis["what"] and "at train.py:12" in diagnosis["what"]
    assert "an error in the script" not in diagnosis["cause"]
    assert "remounted read-only" in diagnosis["cause"] and "checkpoint_dir" in diagnosis["fix"]
    assert "read-only" in err and "an error in the script" not in err
    assert "trainctl checkpoint resume" in diagnosis["command"]  # from the newest checkpoint it did write


@pytest.mark.parametrize(("text", "fragment"), [
    ("Traceback (most recent call last):\n  File \"train.py\", line 9, in <module>\n    open('/data/out.txt', 'w')\n"
     "OSError: [Errno 30] Read-only file system: '/data/out.txt'\n", "cannot write /data/out.txt: the file system is read-only at train.py:9"),
    ("Traceback (most recent call last):\n  File \"train.py\", line 5, in <module>\n    torch.save(sd, p)\n"
     "RuntimeError: [enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only file system\n",
     "a checkpoint could not be written: its file system is read-only at train.py:5"),
])
def test_read_only_file_system_is_diagnosed_in_every_form(text, fragment):
    found = diagnose(text, exit_code=1, script="train.py")
    assert found is not None and found.kind == "read_only"
    assert fragment in found.what


SIXTY = """
    import os, signal
    import torch, trainctl
    run = trainctl.init()
    model = torch.nn.Linear(2, 1)
    run.track(model=model)
    for step in range(1, 61):
        run.log({"loss": 1.0 / step}, step=step)
        run.save_checkpoint(step=step)
    run.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # the machine ran out of memory, say: nobody records the end
"""


def test_a_crashed_session_lists_the_checkpoints_it_recorded(project, cli):
    (project / "train.py").write_text(textwrap.dedent(SIXTY))
    r = subprocess.run([sys.executable, "train.py"], cwd=project, env=clean_env(), capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    session = only_session(project)
    (listed,) = json.loads(cli("sessions", "list", "--json").stdout)
    assert listed["status"] == "crashed"
    assert listed["summary"]["checkpoints"] == 60
    assert listed["summary"]["last_checkpoint"].endswith("ckpt-step00000060.pt")
    table = cli("sessions", "list").stdout.splitlines()
    column = table[0].index("CKPTS")
    assert table[1][column:].split()[0] == "60", table
    shown = cli("sessions", "show", session.id).stdout
    assert "checkpoints     60" in shown and "ckpt-step00000060.pt" in shown


PRINTS = """
    import sys, time
    import torch, trainctl
    run = trainctl.init()
    model = torch.nn.Linear(2, 1)
    run.track(model=model)
    step = 0
    while True:
        step += 1
        print(f"step {step} " + "x" * 200)
        print(f"warn {step}", file=sys.stderr)
        run.log({"loss": 1.0 / step}, step=step)
        time.sleep(0.002)
"""


@pytest.mark.parametrize("uses_trainctl", [True, False], ids=["trainctl-script", "plain-script"])
def test_a_launcher_killed_with_sigkill_leaves_no_orphan_and_no_broken_pipe(project, uses_trainctl):
    source = textwrap.dedent(PRINTS)
    if not uses_trainctl:
        source = ("import os, sys, time\nstep = 0\nopen('pid', 'w').write(str(os.getpid()))\nwhile True:\n"
                  "    step += 1\n    print(f'step {step} ' + 'x' * 200)\n    print(f'warn {step}', file=sys.stderr)\n"
                  "    time.sleep(0.002)\n")
    (project / "train.py").write_text(source)
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", "train.py"], cwd=project,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    session = wait_for(lambda: SessionStore(project / ".trainctl").ids() and only_session(project), "a session")
    if uses_trainctl:
        script = wait_for(lambda: (session.read().get("runtime") or {}).get("pid"), "the script")
        wait_for(lambda: sum(1 for _ in session.metrics()) >= 20, "training steps")
    else:
        script = wait_for(lambda: (project / "pid").exists() and int((project / "pid").read_text() or 0), "the script")
        wait_for(lambda: session.output_log.exists() and session.output_log.stat().st_size > 20_000, "output")
    proc.kill()  # SIGKILL: no chance to forward anything
    proc.communicate(timeout=60)
    wait_for(lambda: not alive(script), "the script to end on its own")
    log = session.output_log.read_text(errors="replace")
    assert "BrokenPipeError" not in log and "Broken pipe" not in log
    assert not [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                if _environ_session(p) == session.id], "a process of the session is still running"
    data = session.read()
    if uses_trainctl:
        assert data["status"] == "preempted", data
        assert data["summary"]["last_checkpoint"].endswith("-emergency.pt")
        shown = run_cli(["sessions", "show", session.id], project).stdout
        assert "preempted" in shown
    else:
        assert run_cli(["sessions", "list", "--json"], project).stdout.count('"crashed"') == 1


def _environ_session(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith(b"TRAIN_OPS_SESSION_ID="):
            return item.split(b"=", 1)[1].decode()
    return None
