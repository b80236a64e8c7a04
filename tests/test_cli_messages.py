"""What the command line says: a mistyped command gets a suggestion, a hint or a traceback is
shown once, a listing that is cut says how much is left and how to see it (issue 12, #8 #10)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainctl.session import Session, SessionStore

from .conftest import clean_env


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def only_session(project: Path) -> Session:
    store = SessionStore(project / ".trainctl")
    ids = store.ids()
    assert len(ids) == 1, ids
    return Session(store.sessions_dir / ids[0])


MISTYPED = [
    (["locl", "x.py"], "No such command 'locl'", "Did you mean 'local'?"),
    (["sesions", "list"], "No such command 'sesions'", "Did you mean 'sessions'?"),
    (["chekpoint", "list"], "No such command 'chekpoint'", "Did you mean 'checkpoint'?"),
    (["sessions", "lst"], "No such command 'lst'", "Did you mean 'list'?"),
    (["sessions", "shwo", "latest"], "No such command 'shwo'", "Did you mean 'show'?"),
    (["checkpoint", "verfy"], "No such command 'verfy'", "Did you mean 'verify'?"),
    (["checkpoint", "resme", "a.pt", "x.py"], "No such command 'resme'", "Did you mean 'resume'?"),
    (["tensorbaord"], "No such command 'tensorbaord'", "Did you mean 'tensorboard'?"),
    (["xyzzy"], "No such command 'xyzzy'", None),
]


@pytest.mark.parametrize(("args", "error", "suggestion"), MISTYPED, ids=[" ".join(m[0]) for m in MISTYPED])
def test_mistyped_command_suggests_the_near_one_at_every_level(project, cli, args, error, suggestion):
    before = sorted(project.rglob("*"))
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert error in r.stderr
    if suggestion:
        assert suggestion in r.stderr
    else:
        assert "Did you mean" not in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(project.rglob("*")) == before


def test_preflight_failure_prints_its_hint_once(project, cli):
    write(project / "train.py", "import not_a_real_package_zz\n")
    r = cli("local", "train.py")
    assert r.returncode == 2
    assert r.stderr.count("pip install not_a_real_package_zz") == 1, r.stderr
    assert "FAIL" in r.stderr and "error: pre-flight check 'imports' failed" in r.stderr


def test_failed_run_shows_its_traceback_once(project, cli):
    write(project / "train.py", """
        def step():
            raise ValueError("boom in step 7")
        print("starting")
        step()
    """)
    for quiet in ([], ["--quiet"]):
        r = cli("local", *quiet, "train.py")
        assert r.returncode == 1
        shown = r.stdout + r.stderr
        assert shown.count("Traceback (most recent call last)") == 1, shown
        assert len(re.findall(r"^ValueError: boom in step 7$", shown, re.MULTILINE)) == 1, shown
        assert "last 20 lines" not in shown and "lines of output" not in shown
        assert "the script raised ValueError: boom in step 7 at train.py:3" in r.stderr


def test_output_not_on_screen_is_shown_with_the_summary(project, cli):
    """A detached run's output went to output.log only: attaching after it ended shows its tail."""
    write(project / "train.py", """
        print("starting")
        raise ValueError("boom while detached")
    """)
    r = cli("local", "--detach", "train.py")
    assert r.returncode == 0, r.stderr
    session = only_session(project)
    proc = subprocess.run([sys.executable, "-m", "trainctl", "sessions", "logs", session.id, "--follow"],
                          cwd=project, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    r = cli("sessions", "attach", session.id)
    assert r.returncode == 1
    shown = r.stdout + r.stderr
    assert shown.count("Traceback (most recent call last)") == 1, shown
    assert len(re.findall(r"^ValueError: boom while detached$", shown, re.MULTILINE)) == 1, shown
    assert "lines of output" in shown


def test_attaching_after_a_run_completed_shows_its_last_lines(project, cli):
    """A detached run can end before anyone attaches (a short run, a loaded machine): attach
    shows what it would have shown a moment earlier, the last lines, then the end."""
    write(project / "train.py", """
        for i in range(30):
            print(f"line {i}")
    """)
    r = cli("local", "--detach", "--no-preflight", "train.py")
    assert r.returncode == 0, r.stderr
    session = only_session(project)
    subprocess.run([sys.executable, "-m", "trainctl", "sessions", "logs", session.id, "--follow"],
                   cwd=project, env=clean_env(), capture_output=True, text=True, timeout=120)
    r = cli("sessions", "attach", session.id, "--tail", "3")
    assert r.returncode == 0
    assert r.stdout == "line 27\nline 28\nline 29\n", r.stdout
    assert f"session {session.id} has already ended (completed)" in r.stderr
    assert f"trainctl: session {session.id} completed" in r.stderr


def test_sessions_show_says_how_many_checkpoints_it_leaves_out(project, cli):
    write(project / "train.py", """
        import torch, trainctl
        run = trainctl.init()
        for step in range(1, 9):
            run.save_checkpoint({"w": torch.zeros(2)}, step=step, metrics={"loss": 1.0 / step})
    """)
    assert cli("local", "--no-preflight", "train.py").returncode == 0
    session = only_session(project)
    r = cli("sessions", "show", "latest")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^checkpoints\s+8$", r.stdout, re.MULTILINE), r.stdout
    listed = [line for line in r.stdout.splitlines() if "ckpt-step" in line]
    assert len(listed) == 5 and "ckpt-step00000008.pt" in listed[-1]
    assert f"... and 3 more (all of them: trainctl checkpoint list --session {session.id})" in r.stdout
    every = cli("checkpoint", "list", "--session", session.id)
    assert every.returncode == 0 and every.stdout.count("ckpt-step") == 8
