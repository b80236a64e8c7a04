"""`--resume auto` checks what it resumes (issue 12 #3): it says which checkpoint, from which
session and step; compares the script and the settings with this run and shows what differs;
prefers a checkpoint whose settings match; refuses another script's unless --force."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainctl.errors import EXIT_CHECKPOINT
from trainctl.resume import args_settings, settings_differences
from trainctl.session import Session, SessionStore

from .conftest import clean_env

TRAIN = textwrap.dedent("""
    import argparse
    import torch, trainctl
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--resume")
    args = p.parse_args()
    run = trainctl.init(config=vars(args))
    model = torch.nn.Linear(2, 1)
    run.track(model=model)
    meta = run.restore()
    start = meta["step"] if meta else 0
    print("START", start, "FROM", run.resume_path())
    for step in range(start + 1, start + args.steps + 1):
        run.save_checkpoint(step=step)
""")


def sessions(project: Path) -> list[Session]:
    store = SessionStore(project / ".trainctl")
    return [Session(store.sessions_dir / i) for i in store.ids()]


def newest_checkpoint(project: Path, session: Session) -> Path:
    return sorted((project / "checkpoints" / session.id).glob("*.pt"))[-1]


def launched(project: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "trainctl", "local", *args], cwd=project, env=clean_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == expect, r.stdout + r.stderr
    return r


def plain(project: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, *args], cwd=project, env=clean_env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == expect, r.stdout + r.stderr
    return r


@pytest.fixture
def two_runs(project: Path) -> tuple[Path, Path]:
    """train.py run twice through the launcher, with --lr 0.01 and then --lr 0.02."""
    (project / "train.py").write_text(TRAIN)
    launched(project, "--no-preflight", "train.py", "--lr", "0.01")
    launched(project, "--no-preflight", "train.py", "--lr", "0.02")
    second, first = sessions(project)
    return newest_checkpoint(project, first), newest_checkpoint(project, second)


def test_says_which_checkpoint_and_what_differs_in_the_launcher(project, two_runs):
    _lr01, lr02 = two_runs
    r = launched(project, "--no-preflight", "--resume", "auto", "train.py", "--lr", "0.5")
    session_id = lr02.parent.name
    assert f"[trainctl] resuming from {lr02} (session {session_id}, step 2)" in r.stderr
    assert "settings differ from the checkpoint's run: lr 0.02 -> 0.5" in r.stderr
    assert f"START 2 FROM {lr02}" in r.stdout


def test_prefers_the_checkpoint_whose_settings_match(project, two_runs):
    lr01, lr02 = two_runs
    r = launched(project, "--no-preflight", "--resume", "auto", "train.py", "--lr", "0.01", "--steps", "3")
    assert f"resuming from {lr01} (session {lr01.parent.name}, step 2)" in r.stderr
    # --steps says how long to train: shown, and still a match
    assert "settings differ from the checkpoint's run: steps (not given) -> 3" in r.stderr
    assert f"chosen over the newer {lr02}" in r.stderr and "lr 0.02 -> 0.01" in r.stderr
    assert f"START 2 FROM {lr01}" in r.stdout


def test_says_the_same_in_a_plain_python_run(project, two_runs):
    _lr01, lr02 = two_runs
    r = plain(project, "train.py", "--resume", "auto", "--lr", "0.5")
    assert f"[trainctl] resuming from {lr02} (session {lr02.parent.name}, step 2)" in r.stderr
    assert "settings differ from the checkpoint's run: lr 0.02 -> 0.5" in r.stderr
    assert r.stderr.count("resuming from") == 1  # said once, however often resume_path() is asked
    r = plain(project, "train.py", "--resume", "auto", "--lr", "0.01")
    assert "chosen over the newer" in r.stderr and "settings differ from the checkpoint's run" not in r.stderr


def test_a_script_changed_since_the_checkpoint_is_said(project, two_runs):
    _lr01, lr02 = two_runs
    (project / "train.py").write_text(TRAIN + "# an edit\n")
    r = launched(project, "--no-preflight", "--resume", "auto", "train.py", "--lr", "0.02")
    assert f"resuming from {lr02}" in r.stderr
    assert "train.py changed since this checkpoint was written" in r.stderr


@pytest.mark.slow
def test_another_scripts_checkpoint_is_refused_unless_forced(project):
    other = project / "other"
    other.mkdir()
    (other / "train.py").write_text(TRAIN + "# another experiment\n")
    plain(project, "other/train.py", "--steps", "1")
    theirs = sorted((project / "checkpoints").rglob("*.pt"))[-1]
    (project / "train.py").write_text(TRAIN)

    refused = launched(project, "--no-preflight", "--resume", "auto", "train.py", expect=EXIT_CHECKPOINT)
    assert f"written by another script, {other / 'train.py'}" in refused.stderr
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert len(sessions(project)) == 1  # nothing started
    # a plain run says so too, and starts nothing
    alone = plain(project, "train.py", "--resume", "auto", expect=1)
    assert "written by another script" in alone.stderr and f"name it: --resume {theirs}" in alone.stderr
    assert len(sessions(project)) == 2 and sessions(project)[0].read()["status"] == "failed"
    forced = launched(project, "--no-preflight", "--force", "--resume", "auto", "train.py")
    assert f"resuming from {theirs}" in forced.stderr and "written by another script" in forced.stderr
    assert f"START 1 FROM {theirs}" in forced.stdout

    by_path = launched(project, "--resume", str(theirs), "train.py", expect=EXIT_CHECKPOINT)
    assert "was written by another script" in by_path.stderr and "--force" in by_path.stderr
    checked = subprocess.run([sys.executable, "-m", "trainctl", "check", "--resume", str(theirs), "train.py"],
                             cwd=project, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert checked.returncode == 2
    assert re.search(r"FAIL\s+resume\s+.*written by another script", checked.stdout), checked.stdout
    resumed = subprocess.run([sys.executable, "-m", "trainctl", "checkpoint", "resume", str(theirs), "train.py"],
                             cwd=project, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == EXIT_CHECKPOINT and "--force" in resumed.stderr


def test_the_same_script_copied_elsewhere_is_not_another_script(project):
    (project / "train.py").write_text(TRAIN)
    plain(project, "train.py", "--steps", "1")
    mine = sorted((project / "checkpoints").rglob("*.pt"))[-1]
    copy = project / "copy"
    copy.mkdir()
    shutil.copy(project / "train.py", copy / "train.py")
    r = launched(project, "--no-preflight", "--resume", "auto", "copy/train.py")
    assert f"resuming from {mine}" in r.stderr and "another script" not in r.stderr


def test_nothing_for_a_name_says_the_name(project):
    (project / "train.py").write_text(TRAIN)
    launched(project, "--no-preflight", "--name", "baseline", "train.py")
    r = launched(project, "--no-preflight", "--resume", "auto", "--name", "Z", "train.py")
    assert "--resume auto: no checkpoint for name Z yet; starting from scratch." in r.stderr
    assert "START 0 FROM None" in r.stdout
    r = launched(project, "--no-preflight", "--resume", "auto", "--name", "baseline", "train.py")
    assert "resuming from" in r.stderr and "START 2" in r.stdout


def test_checkpoints_record_the_arguments_they_were_written_with(project):
    (project / "train.py").write_text(TRAIN)
    launched(project, "--no-preflight", "train.py", "--lr", "0.3")
    manifest = json.loads(Path(str(newest_checkpoint(project, sessions(project)[0])) + ".json").read_text())
    assert manifest["meta"]["args"] == ["--lr", "0.3"]
    assert manifest["meta"]["script_digest"].startswith("sha256:")


@pytest.mark.parametrize(("then", "now", "expected"), [
    (["--lr", "0.02"], ["--lr", "0.5"], ["lr 0.02 -> 0.5"]),
    (["--lr=0.5"], ["--lr", "0.50"], []),
    (["--amp"], [], ["amp True -> (not given)"]),
    (["--epochs", "3"], ["--epochs", "5", "--resume", "x.pt"], ["epochs 3 -> 5"]),
    (["data/a", "batch_size=32"], ["data/b", "batch_size=32"], ["arg1 data/a -> data/b"]),
    (["--api-key", "***"], ["--api-key", "***"], []),
])
def test_settings_differences(then, now, expected):
    assert [str(d) for d in settings_differences(args_settings(then), args_settings(now))] == expected
