"""The launcher reads every byte a script prints: a script that prints its metric and exits at
once still has it recorded (issue 12 #5), and a state disk that fills up never stops the output
from flowing (issue 13 #1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainctl.session import Session, SessionStore

from .conftest import clean_env

QUICK_SCRIPTS = {
    "print": 'print("epoch 1 loss 0.5")\n',
    "stderr-then-fail": 'import sys\nprint("epoch 1 loss 0.5", file=sys.stderr)\nsys.exit(3)\n',
    "no-newline": 'import sys\nsys.stdout.write("epoch 1 loss 0.5")\n',
    "os-exit": 'import os\nos.write(1, b"epoch 1 loss 0.5\\n")\nos._exit(0)\n',
}


def sessions(project: Path) -> list[Session]:
    store = SessionStore(project / ".trainctl")
    return [Session(store.sessions_dir / i) for i in store.ids()]


def run_on_a_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as its stdout and stderr (so the launcher gives the
    script one too); its exit code and everything it showed."""
    import os
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed its side
            break
        if not data:
            break
        shown += data
    os.close(master)
    return proc.wait(timeout=120), shown.decode(errors="replace")


@pytest.mark.parametrize("mode", ["quiet", "status-lines", "terminal"])
def test_a_script_that_prints_and_exits_at_once_always_has_its_metric_recorded(project, mode):
    """Scripts that print one metric line and end within milliseconds (20 runs with --quiet,
    where it was lost every time, 8 in each other mode): every run, whatever the timing,
    records the metric in the events log and in the session's summary."""
    for name, source in QUICK_SCRIPTS.items():
        (project / f"{name}.py").write_text(source)
    runs = [name for name in QUICK_SCRIPTS for _ in range(5 if mode == "quiet" else 2)]
    for name in runs:
        argv = [sys.executable, "-m", "trainctl", "local", *(["--quiet"] if mode == "quiet" else []),
                "--no-preflight", f"{name}.py"]
        if mode == "terminal":
            code, shown = run_on_a_terminal(argv, project)
        else:
            r = subprocess.run(argv, cwd=project, env=clean_env(), capture_output=True, text=True, timeout=120)
            code, shown = r.returncode, r.stderr
        assert code == (3 if name == "stderr-then-fail" else 0), shown
        assert "epoch 1 loss 0.5" in shown or mode != "terminal"
    found = sessions(project)
    assert len(found) == len(runs)
    missing = []
    for session in found:
        data = session.read()
        metrics = [e for e in session.metrics() if e.get("source") == "output"]
        last = (data.get("summary") or {}).get("last") or {}
        if [m["values"] for m in metrics] != [{"loss": 0.5}] or last.get("loss") != 0.5:
            missing.append((Path(data["script"]).name, metrics, last))
    assert missing == [], f"{len(missing)} of {len(runs)} runs lost their metric: {missing}"


def test_detached_quick_script_has_its_metric_recorded(project, cli):
    (project / "quick.py").write_text(QUICK_SCRIPTS["print"])
    for _ in range(3):
        assert cli("local", "--detach", "--no-preflight", "quick.py").returncode == 0
    for session in sessions(project):
        subprocess.run([sys.executable, "-m", "trainctl", "sessions", "logs", session.id, "--follow"],
                       cwd=project, env=clean_env(), capture_output=True, timeout=120, check=True)
        data = json.loads(session.json_path.read_text())
        assert data["status"] == "completed"
        assert [m["values"] for m in session.metrics()] == [{"loss": 0.5}]
        assert data["summary"]["last"] == {"loss": 0.5}


# ---------------------------------------------------------------- a state disk that fills up


@pytest.fixture
def small_state_disk(project: Path):
    """The project's state dir (.trainctl) on a 512 KB tmpfs the test mounts (tests run as root);
    skipped, saying why, where mounting is not possible."""
    state = project / ".trainctl"
    state.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(state)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


LOUD = """
import os, sys
flag = sys.argv[1]
i = 0
while not os.path.exists(flag):
    print(f"epoch 1 step {i} loss={1.0 / (i + 1):.5f} padding {'x' * 40}")
    i += 1
for j in range(5):
    print(f"after the disk had room {j}")
print("the last line")
"""


def test_a_full_state_disk_never_stops_the_output(project: Path, small_state_disk: Path):
    """output.log stops fitting mid-run: the script is never blocked, its output still reaches
    the terminal, one warning says what happened, writing resumes once there is room (the gap
    marked), and the run ends with the script's own exit code and no trainctl traceback."""
    import threading

    (project / "loud.py").write_text(LOUD)
    filler = small_state_disk / "filler.bin"
    filler.write_bytes(b"\0" * 256 * 1024)  # room made later by deleting it
    flag = project / "go-on"
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", "loud.py", str(flag)],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    stdout: list[bytes] = []
    stderr: list[str] = []
    warned = threading.Event()

    def read_err() -> None:
        for raw in proc.stderr:
            stderr.append(raw.decode(errors="replace"))
            if b"cannot write" in raw and b"output.log" in raw:
                warned.set()

    threads = [threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    # a bound for a hang, not a speed assertion: the script prints until the disk is full
    assert warned.wait(timeout=120), "".join(stderr)
    filler.unlink()
    flag.write_text("")
    assert proc.wait(timeout=120) == 0, "".join(stderr)
    for t in threads:
        t.join(timeout=60)
    out, err = stdout[0].decode(errors="replace"), "".join(stderr)
    assert "Traceback" not in err and "bug in trainctl" not in err, err
    assert out.rstrip().endswith("the last line") and "after the disk had room 4" in out  # nothing held back
    warnings = [line for line in err.splitlines() if "cannot write" in line and "output.log" in line]
    assert len(warnings) == 1, err
    assert "No space left on device" in warnings[0] and "kept in memory" in warnings[0]
    session = sessions(project)[0]
    log = session.output_log.read_text(errors="replace")
    assert log.rstrip().endswith("the last line")  # writing resumed once there was room
    assert "[trainctl] the disk was full:" in log  # and the gap is marked where it is
    assert session.read()["status"] == "completed"


@pytest.mark.parametrize(("args", "code", "fragment"), [
    (["local", "--no-preflight", "ok.py"], 1, "error: the disk is full: cannot write"),
    (["local", "--detach", "--no-preflight", "ok.py"], 1, "error: the disk is full: cannot write"),
    (["local", "ok.py"], 2, "pre-flight check 'state' failed"),
], ids=["local", "detach", "preflight"])
def test_a_state_disk_full_before_the_start_is_one_clear_error(project, small_state_disk, cli, args, code, fragment):
    (project / "ok.py").write_text("print('hello')\n")
    (small_state_disk / "sessions").mkdir()
    filler = small_state_disk / "filler.bin"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError:
        pass
    r = cli(*args)
    assert r.returncode == code, r.stderr
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr and "bug in trainctl" not in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
    assert list((small_state_disk / "sessions").iterdir()) == []  # no half-made session left behind
