"""Full disks, through a small tmpfs the test mounts (CI runs as root): the events log fails,
the script trains on; a checkpoint save does not depend on the log; a partial append is never
duplicated; a background save that fails is said, recorded and raised at the next save."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainctl.session import SessionStore

from .conftest import clean_env, run_cli


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (skips when this machine can't mount one)."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    "the full-disk tests need root (CI runs as root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill `disk` to the last byte; returns the filler file (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        size = 65536
        while size:  # big writes, then ever smaller ones for the last bytes
            try:
                if os.write(fd, b"\0" * size) < size:
                    size //= 2
            except OSError:
                size //= 2
    finally:
        os.close(fd)
    return filler


def wait_for(path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_partial_append_is_truncated_back_and_never_duplicated(tmp_path):
    with small_disk(tmp_path / "disk", "256k") as disk:
        session = SessionStore(disk / "state").create(status="running")
        session.append_events([{"kind": "metric", "step": 0, "values": {"loss": 1.0}}])
        before = session.events_path.read_bytes()
        filler = fill(disk)
        os.truncate(filler, filler.stat().st_size - 3000)  # room for part of the next batch
        batch = [{"kind": "metric", "step": i, "values": {"loss": 1.0 / i, "pad": "x" * 40}}
                 for i in range(1, 400)]
        with pytest.raises(OSError):
            session.append_events(batch)
        assert session.events_path.read_bytes() == before  # no torn line, no partial batch
        filler.unlink()
        session.append_events(batch)  # the retry of the whole batch
        steps = [json.loads(line)["step"] for line in session.events_path.read_text().splitlines()
                 if '"metric"' in line]
        assert steps == list(range(400))


TRAINS_ON = """
import os, sys, time
from pathlib import Path
import torch
import trainctl

marks = Path(sys.argv[1])
run = trainctl.init(total_steps=210, flush_interval_s=0.05)
model = torch.nn.Linear(4, 1)
run.track(model=model)
(marks / "ready").touch()
while not (marks / "full").exists():
    time.sleep(0.02)
for step in range(1, 201):
    run.log({"loss": 1.0 / step}, step=step)
    if step % 50 == 0:
        run.save_checkpoint(step=step)  # must not fail: the checkpoint disk has room
    time.sleep(0.002)
run.flush()
(marks / "logged").touch()
while not (marks / "freed").exists():
    time.sleep(0.02)
for step in range(201, 211):
    run.log({"loss": 1.0 / step}, step=step)
run.finish()
print("finished")
"""


def test_training_goes_on_while_the_state_disk_is_full(tmp_path):
    with small_disk(tmp_path / "disk", "512k") as disk:
        project = tmp_path / "project"
        project.mkdir()
        (project / "trainctl.toml").write_text(
            f'state_dir = "{disk / "state"}"\ncheckpoint_dir = "{tmp_path / "ckpt"}"\nmin_free_gb = 0\n')
        (project / "train.py").write_text(TRAINS_ON)
        marks = tmp_path / "marks"
        marks.mkdir()
        proc = subprocess.Popen([sys.executable, "train.py", str(marks)], cwd=project, env=clean_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(marks / "ready")
            filler = fill(disk)
            (marks / "full").touch()
            wait_for(marks / "logged")
            assert proc.poll() is None  # still training
            filler.unlink()
            (marks / "freed").touch()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        assert "finished" in out and "Traceback" not in err
        assert err.count("cannot write the session log") == 1, err  # said once
        assert "writable again" in err
        session = SessionStore(disk / "state").get("latest")
        lines = session.events_path.read_text().splitlines()
        events = [json.loads(line) for line in lines]  # every line whole
        steps = [e["step"] for e in events if e["kind"] == "metric"]
        assert steps == list(range(1, 211))  # each step once, in order
        assert [e["step"] for e in events if e["kind"] == "checkpoint"] == [50, 100, 150, 200]
        for step in (50, 100, 150, 200):
            assert (tmp_path / "ckpt" / session.id / f"ckpt-step{step:08d}.pt.json").exists()
        data = session.read()
        assert data["status"] == "completed"
        assert data["degraded"]["reason"].startswith("No space left on device") and data["degraded"]["until"]
        shown = run_cli(["sessions", "show", session.id], project)
        assert shown.returncode == 0 and "checkpoints     4" in shown.stdout


FAILING_SAVES = """
import sys
import time
import torch
import trainctl
from trainctl.run import CheckpointSaveError

run = trainctl.init(total_steps=4)
big = {"w": torch.zeros(512 * 1024)}  # 2 MB: more than the checkpoint disk holds
for step in range(1, 4):
    run.log({"loss": 1.0 / step}, step=step)
    try:
        run.save_checkpoint(big, step=step, blocking=False)
    except CheckpointSaveError as e:  # an earlier one failed; this one was not started
        print(f"raised at step {step}: {e}", flush=True)
        run.save_checkpoint(big, step=step, blocking=False)
    while step == 1 and not run.save_failures():  # the first failure is known before step 2
        time.sleep(0.01)
if sys.argv[1:] == ["explicit-finish"]:
    run.finish()
"""


@pytest.mark.parametrize("ending", ["at-exit", "explicit-finish"])
def test_failed_background_saves_are_said_recorded_and_raised(tmp_path, ending):
    with small_disk(tmp_path / "disk", "256k") as disk:
        project = tmp_path / "project"
        project.mkdir()
        (project / "trainctl.toml").write_text(f'checkpoint_dir = "{disk}"\nmin_free_gb = 0\n')
        (project / "train.py").write_text(FAILING_SAVES)
        proc = subprocess.run([sys.executable, "train.py", ending], cwd=project, env=clean_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.stderr.count("checkpoint save failed (in the background)") == 3, proc.stderr
        assert "has only" in proc.stderr  # the full disk is named
        # the next save_checkpoint() raises what failed before it
        assert "raised at step 2: background checkpoint save" in proc.stdout, proc.stdout
        session = SessionStore(project / ".trainctl").get("latest")
        data = session.read()
        summary = data["summary"]
        assert summary["failed_saves"] == 3 and summary["checkpoints"] == 0
        assert any("3 of 3 checkpoint save(s) failed; none succeeded" in w for w in summary["warnings"])
        if ending == "explicit-finish":  # finish() raised the last failure: the run failed
            assert proc.returncode == 1 and "CheckpointSaveError" in proc.stderr
            assert data["status"] == "failed"
        else:
            assert proc.returncode == 0 and data["status"] == "completed"
            assert "warning: 3 of 3 checkpoint save(s) failed" in proc.stderr
        shown = run_cli(["sessions", "show", session.id], project)
        assert "failed saves    3" in shown.stdout, shown.stdout
        snap = json.loads(run_cli(["monitor", session.id, "--once", "--json"], project).stdout)
        assert snap["checkpoints"]["failed"] == 3
        assert "checkpoint_failed" in [w["kind"] for w in snap["warnings"]]
        assert "3 checkpoint save(s) failed" in run_cli(["monitor", session.id], project).stdout


PREEMPTED_AFTER_A_FAILED_SAVE = """
import os, signal, time
import torch
import trainctl

run = trainctl.init()
model = torch.nn.Linear(2, 1)
run.track(model=model)
run.save_checkpoint({"bad": lambda: 0}, step=1, name="bad", blocking=False)  # can't be pickled
while not run.save_failures():
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice
run.log({"loss": 0.5}, step=2)  # the safe point: an emergency checkpoint, then exit 75
"""


def test_a_failed_background_save_does_not_cost_the_emergency_checkpoint(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    (project / "train.py").write_text(PREEMPTED_AFTER_A_FAILED_SAVE)
    proc = subprocess.run([sys.executable, "train.py"], cwd=project, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr
    session = SessionStore(project / ".trainctl").get("latest")
    saved = [e["path"] for e in session.iter_events(("checkpoint",))]
    assert len(saved) == 1 and "emergency" in saved[0], proc.stderr
    data = session.read()
    assert data["status"] == "preempted" and data["summary"]["failed_saves"] == 1
