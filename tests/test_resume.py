"""One set of resume rules: arguments, `--resume auto`, the resume command (issue 11)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainctl import checkpoint, sysinfo
from trainctl.resume import resume_command, split_resume_arg, strip_resume_args, with_resume_args
from trainctl.session import SessionStore

from .conftest import clean_env, run_cli

SCRIPT = textwrap.dedent("""
    import sys, trainctl
    run = trainctl.init()
    print("RESUME", run.resume_path())
""")


@pytest.mark.parametrize(("args", "flag", "expected"), [
    (["--lr", "1", "--resume", "a.pt"], "--resume", ["--lr", "1"]),
    (["--resume=a.pt", "--lr", "1"], "--resume", ["--lr", "1"]),
    (["--init_from=resume", "x"], "--init_from=resume", ["x"]),
    (["--resume"], "--resume", []),
])
def test_strip_resume_args(args, flag, expected):
    assert strip_resume_args(args, flag) == expected


def test_with_and_split_resume_args():
    assert with_resume_args(["--lr", "1", "--resume", "old.pt"], "--resume", "new.pt", True) == \
        ["--lr", "1", "--resume", "new.pt"]
    assert with_resume_args(["--lr", "1"], "--resume", "new.pt", False) == ["--lr", "1"]
    assert with_resume_args(["--resume", "mine"], "--resume", None, True) == ["--resume", "mine"]
    assert with_resume_args([], "--init_from=resume", "c.pt", True) == ["--init_from=resume"]
    assert split_resume_arg(["--lr", "1", "--resume", "x.pt"], "--resume") == ("x.pt", ["--lr", "1"])
    assert split_resume_arg(["--init_from=resume"], "--init_from=resume") == (None, ["--init_from=resume"])


def test_resume_command_redacts_and_drops_an_old_resume_flag():
    cmd = resume_command("train.py", ["--api-key", "s3cret", "--resume", "old.pt", "--lr", "1"], "new.pt")
    assert cmd == "trainctl checkpoint resume new.pt train.py --api-key '***' --lr 1"
    assert resume_command("train.py", ["--lr", "1"], None) == "trainctl local train.py --lr 1"


def _checkpoint(project: Path, session_id: str, script: Path, step: int) -> Path:
    path = project / "checkpoints" / session_id / f"ckpt-step{step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, {"w": [step]}, {"session_id": session_id, "script": str(script), "step": step})
    return path


def test_resume_auto_means_the_same_checkpoint_in_the_launcher_and_the_runtime(project):
    """A sweep sibling still running has written the newest checkpoint: neither the launcher nor
    a plain `python train.py --resume auto` may pick it."""
    script = project / "train.py"
    script.write_text(SCRIPT)
    store = SessionStore(project / ".trainctl")
    done = store.create(status="completed", script=str(script))
    older = _checkpoint(project, done.id, script, 10)
    running = store.create(status="running", script=str(script), processes=[
        {"pid": os.getpid(), "start_ticks": sysinfo.process_start_ticks(os.getpid()), "role": "launcher"}])
    newer = _checkpoint(project, running.id, script, 20)
    os.utime(newer, (os.path.getmtime(older) + 10,) * 2)

    plain = subprocess.run([sys.executable, "train.py", "--resume", "auto"], cwd=project, env=clean_env(),
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert f"RESUME {older}" in plain.stdout

    launched = run_cli(["local", "--no-preflight", "--resume", "auto", "train.py"], project)
    assert launched.returncode == 0, launched.stderr
    assert f"RESUME {older}" in launched.stdout
