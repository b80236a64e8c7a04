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
