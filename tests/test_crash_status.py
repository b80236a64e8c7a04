"""A standalone `python train.py` killed with kill -9: `sessions list` (session.json only) and
`sessions show` agree, and `monitor` prints a complete resume command that runs as printed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from trainctl.session import SessionStore

from .conftest import REPO, clean_env, run_cli

TRAIN = """
import sys, time
from pathlib import Path
import torch
import trainctl

marks = Path(sys.argv[1])
run = trainctl.init(total_steps=30)
model = torch.nn.Linear(2, 1)
run.track(model=model)
meta = run.restore()
start = meta["step"] if meta else 0
for step in range(start + 1, 31):
    run.log({"loss": 1.0 / step}, step=step)
    if step in (10, 20):
        run.save_checkpoint(step=step, metrics={"loss": 1.0 / step})
    if step == 25 and not meta:
        (marks / "hung").touch()
        while True:  # until killed
            time.sleep(0.05)
print("done at", step)
"""


def _killed_standalone_run(tmp_path: Path) -> tuple[Path, Path]:
    project = tmp_path / "project"
    project.mkdir()
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    (project / "train.py").write_text(TRAIN)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, "train.py", str(marks)], cwd=project, env=clean_env())
    try:
        deadline = time.monotonic() + 120
        while not (marks / "hung").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return project, marks


def test_list_and_show_agree_on_a_killed_standalone_run(tmp_path):
    project, _ = _killed_standalone_run(tmp_path)
    listed = json.loads(run_cli(["sessions", "list", "--json"], project).stdout)
    assert len(listed) == 1 and listed[0]["status"] == "crashed"
    shown = json.loads(run_cli(["sessions", "show", "latest", "--json"], project).stdout)
    assert shown["status"] == "crashed"
    assert listed[0]["summary"]["checkpoints"] == len(shown["checkpoint_events"]) == 2
    assert listed[0]["summary"]["last"] == shown["summary"]["last"]
    assert listed[0]["summary"]["last"]["loss"] >= 1.0 / 25  # metrics up to the last checkpoint at least
    table = run_cli(["sessions", "list"], project).stdout
    text = run_cli(["sessions", "show", "latest"], project).stdout
    row = table.splitlines()[1]
    assert "none recorded" not in row and " 2 " in row
    metrics = next(line for line in text.splitlines() if line.startswith("metrics"))
    assert metrics.split(None, 1)[1].split(",")[0] in row  # the same loss on both


def _trainctl_on_path(tmp_path: Path) -> dict[str, str]:
    """`trainctl` as a user has it: a command on PATH running this checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "trainctl"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m trainctl \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))


def test_monitor_prints_a_resume_command_that_runs_as_printed(tmp_path):
    project, marks = _killed_standalone_run(tmp_path)
    session = SessionStore(project / ".trainctl").get("latest")
    snap = json.loads(run_cli(["monitor", "--once", "--json"], project).stdout)
    crashed = next(w for w in snap["warnings"] if w["kind"] == "crashed")
    command = snap["resume_command"]
    newest = project / "checkpoints" / session.id / "ckpt-step00000020.pt"
    assert command == shlex.join(["trainctl", "checkpoint", "resume", str(newest),
                                  str(project / "train.py"), str(marks)])
    assert crashed["message"].endswith(command) and crashed["command"] == command
    text = run_cli(["monitor", "--once"], project, env=clean_env(COLUMNS="60")).stdout
    assert f"  {command}" in text.splitlines()  # whole, on a line of its own

    # from a subfolder of the project the command first goes where the run ran
    sub = project / "notes"
    sub.mkdir()
    from_sub = json.loads(run_cli(["monitor", "--once", "--json"], sub).stdout)["resume_command"]
    assert from_sub == f"cd {shlex.quote(str(project))} && {command}"
    env = _trainctl_on_path(tmp_path)
    resumed = subprocess.run(["bash", "-c", from_sub], cwd=sub, env=env, capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "done at 30" in resumed.stdout
    new = SessionStore(project / ".trainctl").get("latest")
    data = new.read()
    assert data["status"] == "completed" and data["resume_from"] == str(newest)
    steps = [e["step"] for e in new.metrics()]
    assert steps[0] == 21 and steps[-1] == 30
