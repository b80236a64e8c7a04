"""Checkpoints under kills at every step of a save, leftovers of interrupted saves, and edited
manifests (issue 13: #2, #7, #9, #10).

Kills are real: trainctl's own write sequence calls fsutil.crash_point() between its steps, and
$TRAINCTL_CRASH_AT makes the process SIGKILL itself at the named one.
"""

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

from trainctl import checkpoint as ckpt
from trainctl.errors import EXIT_CHECKPOINT

from .conftest import clean_env, run_cli

WRITER = """
import os, sys, torch
from trainctl import checkpoint as c
folder, point = sys.argv[1], sys.argv[2]
def save(step):
    c.save(os.path.join(folder, "last.pt"), {"w": torch.full((1000,), float(step))},
           {"step": step, "script": "w.py", "session_id": "20250101-000000-abcdef"})
save(1)
os.environ["TRAINCTL_CRASH_AT"] = point
save(2)
print("not killed", flush=True)
"""


@pytest.mark.parametrize("point", ckpt.SAVE_CRASH_POINTS)
def test_overwriting_a_named_checkpoint_survives_a_kill_at_every_step(tmp_path, point):
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    proc = subprocess.run([sys.executable, str(writer), str(folder), point], capture_output=True,
                          text=True, env=clean_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL, (point, proc.stdout, proc.stderr)

    found, skipped = ckpt.newest_valid(folder, script="w.py")
    assert found == folder / "last.pt", (point, skipped, sorted(p.name for p in folder.iterdir()))
    assert ckpt.verify(found).ok
    info = ckpt.inspect(found)
    state = ckpt.load(found)
    # the step-1 save had finished: the kill may only ever move forward from it
    assert info.step in (1, 2) and state["trainctl"]["step"] == info.step
    assert torch.equal(state["w"], torch.full((1000,), float(info.step)))


CHAIN_SCRIPT = """
import os, torch, trainctl
run = trainctl.init(tensorboard=False)
model = torch.nn.Linear(3, 1)
run.track(model=model)
meta = run.restore()
step = meta["step"] if meta else 0
if meta:
    assert model.bias.item() == float(step), (model.bias.item(), step)
print(f"attempt {run.attempt} resumed step {step}", flush=True)
points = os.environ["KILL_POINTS"].split(",")
for i in range(2):
    step += 1
    with torch.no_grad():
        model.bias.fill_(float(step))
    if i == 1 and run.attempt < len(points):
        os.environ["TRAINCTL_CRASH_AT"] = points[run.attempt]
    run.save_checkpoint(step=step, name="last")
print(f"finished at step {step}", flush=True)
"""


@pytest.mark.slow
def test_restarts_after_a_kill_at_every_step_resume_from_the_named_checkpoint(project):
    """The bug as reported: name="last" every save, killed mid-save, the restart began at 0."""
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n[restart]\nrestart_delay_s = 0\n')
    (project / "train.py").write_text(CHAIN_SCRIPT)
    points = ckpt.SAVE_CRASH_POINTS
    r = run_cli(["local", "--no-preflight", "--quiet", "--max-restarts", str(len(points)), "train.py"],
                project, env=clean_env(KILL_POINTS=",".join(points)), timeout=600)
    assert r.returncode == 0, (r.stdout, r.stderr)
    resumed = [int(line.rsplit(" ", 1)[1]) for line in r.stdout.splitlines() if " resumed step " in line]
    assert len(resumed) == len(points) + 1, r.stdout
    assert resumed[0] == 0
    for attempt, point in enumerate(points):
        before, after = resumed[attempt], resumed[attempt + 1]
        # the attempt saved before+1 completely, then was killed saving before+2
        assert after in (before + 1, before + 2), (point, resumed, r.stderr)
    # the launcher's own scan after each kill found the checkpoint complete, never skipped it
    assert "skipping checkpoint" not in r.stderr and "from scratch" not in r.stderr, r.stderr


# --- leftovers of interrupted saves --------------------------------------------------------------

KILLED_SAVE = """
import os, sys, torch
from trainctl import checkpoint as c
folder = sys.argv[1]
c.save(os.path.join(folder, "ckpt-step00000001.pt"), {"w": torch.zeros(50_000)},
       {"step": 1, "script": "w.py", "session_id": "20250101-000000-abcdef"})
os.environ["TRAINCTL_CRASH_AT"] = "checkpoint:data-synced"
c.save(os.path.join(folder, "ckpt-step00000002.pt"), {"w": torch.ones(50_000)},
       {"step": 2, "script": "w.py", "session_id": "20250101-000000-abcdef"})
"""


def killed_save(folder: Path) -> Path:
    """Run a save that is SIGKILLed once its temp file is complete; return that leftover."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder.parent / "killed_save.py"
    script.write_text(KILLED_SAVE)
    before = set(folder.iterdir())
    proc = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True,
                          env=clean_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p for p in set(folder.iterdir()) - before if p.name.startswith(".")]
    assert len(leftovers) == 1, sorted(p.name for p in folder.iterdir())
    return leftovers[0]


def age(path: Path, seconds: float = 3600.0) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_cleanup_removes_only_temp_files_trainctl_named(cli, project):
    folder = project / "checkpoints" / "s1"
    leftover = killed_save(folder)
    user_files = [folder / ".notes.tmp", folder / ".ep9.pt.deadbeef.tmp", project / "checkpoints" / ".draft.tmp"]
    for path in user_files:
        path.write_text("mine\n")
    for path in [leftover, *user_files]:
        age(path)
    r = cli("checkpoint", "cleanup", "--keep-last-n", "5", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert leftover.name in r.stdout
    assert not any(p.name in r.stdout for p in user_files), r.stdout
    r = cli("checkpoint", "cleanup", "--keep-last-n", "5", "--yes")
    assert r.returncode == 0, r.stderr
    assert not leftover.exists()
    assert all(p.read_text() == "mine\n" for p in user_files)
    assert ckpt.verify(folder / "ckpt-step00000001.pt").ok


def test_list_all_shows_leftovers_of_interrupted_saves_with_their_size(cli, project):
    folder = project / "checkpoints" / "s1"
    leftover = killed_save(folder)
    (folder / ".notes.tmp").write_text("mine\n")
    size = leftover.stat().st_size
    r = cli("checkpoint", "list", "--all")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if leftover.name in line)
    from trainctl.config import format_size
    assert format_size(size) in line and "partial" in line
    assert ".notes.tmp" not in r.stdout
    data = json.loads(cli("checkpoint", "list", "--all", "--json").stdout)
    partial = [d for d in data if d["status"] == "partial"]
    assert [(Path(d["path"]).name, d["bytes"]) for d in partial] == [(leftover.name, size)]
    assert partial[0]["session_id"] == "20250101-000000-abcdef"
    # without --all the table stays about checkpoints, and says where the space went
    r = cli("checkpoint", "list")
    assert leftover.name not in r.stdout
    assert "1 partial file" in r.stderr and "--all" in r.stderr


# --- manifests that were edited or forged ---------------------------------------------------------

def save_step(path: Path, step: int, loss: float, **meta) -> None:
    ckpt.save(path, {"w": torch.full((64,), float(step))},
              {"session_id": "s1", "script": "train.py", "step": step, "epoch": step // 10,
               "metrics": {"loss": loss}, **meta})


def edit(path: Path, change) -> None:
    manifest_file = ckpt.manifest_path(path)
    manifest = json.loads(manifest_file.read_text())
    change(manifest)
    manifest_file.write_text(json.dumps(manifest, indent=2))


def _set(*keys_value):
    *keys, value = keys_value

    def change(manifest):
        target = manifest
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return change


EDITS = [
    # (what was edited, how)
    ("step", _set("meta", "step", 100000)),
    ("loss", _set("meta", "metrics", "loss", -5.0)),
    ("step and loss", lambda m: (_set("meta", "step", 100000)(m), _set("meta", "metrics", "loss", -5.0)(m))),
    ("saved_at in the future", _set("meta", "saved_at", time.time() + 30 * 86400)),
    ("session", _set("meta", "session_id", "someone-else")),
    ("script", _set("meta", "script", "/elsewhere/other.py")),
]


@pytest.mark.parametrize(("what", "change"), EDITS, ids=[e[0] for e in EDITS])
def test_an_edited_manifest_fails_verify_and_auto_resume_skips_it(cli, project, what, change):
    folder = project / "checkpoints" / "s1"
    save_step(folder / "ckpt-step00000100.pt", 100, 0.5)
    save_step(folder / "ckpt-step00000200.pt", 200, 0.4)
    edited = folder / "ckpt-step00000200.pt"
    edit(edited, change)

    result = ckpt.verify(edited)
    assert (result.ok, result.status) == (False, "corrupt"), (what, result)
    assert "manifest" in result.reason
    r = cli("checkpoint", "verify", str(edited))
    assert r.returncode == EXIT_CHECKPOINT and "FAIL" in r.stdout and "Traceback" not in r.stderr

    found, skipped = ckpt.newest_valid(folder)
    assert found == folder / "ckpt-step00000100.pt"
    assert [p for p, _ in skipped] == [edited]


def test_verify_cross_checks_a_manifest_whose_own_digest_was_recomputed(tmp_path):
    """Someone who edits the meta and recomputes the manifest's digest still fails verify:
    the checkpoint's embedded metadata (covered by the file digest) disagrees."""
    path = tmp_path / "a.pt"
    save_step(path, 200, 0.4)
    manifest = json.loads(ckpt.manifest_path(path).read_text())
    manifest["meta"]["step"] = 100000
    manifest.pop("manifest_digest", None)
    manifest["manifest_digest"] = ckpt.manifest_digest(manifest)
    ckpt.manifest_path(path).write_text(json.dumps(manifest))
    assert ckpt.inspect(path).status == "valid"  # listing trusts a self-consistent manifest
    result = ckpt.verify(path)
    assert not result.ok and "step" in result.reason and "100000" in result.reason


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


SYSTEM = f"{os.system.__module__}.system"


def forged_checkpoint(folder: Path, script: Path, marker: Path, how: str) -> Path:
    """A checkpoint newer than every real one, with a self-consistent manifest (register() wrote
    it), that --resume auto must pass over: dated a month ahead, or needing full unpickling."""
    path = folder / "ckpt-step09999999.pt"
    state = {"model": {"w": torch.zeros(3)}}
    if how == "untrusted":
        state["x"] = Payload(marker)
    torch.save(state, path)
    saved_at = time.time() + (30 * 86400 if how == "future" else 60)
    ckpt.register(path, {"session_id": "s1", "script": str(script), "step": 9999999, "saved_at": saved_at})
    return path


RESUMING_SCRIPT = """
import torch, trainctl
run = trainctl.init(tensorboard=False)
state = run.resume_state()
print("resumed step", state["trainctl"]["step"] if state else None, flush=True)
"""

FORGERIES = [("future", "in the future"), ("untrusted", SYSTEM)]


@pytest.mark.parametrize(("how", "reason"), FORGERIES, ids=[f[0] for f in FORGERIES])
def test_auto_resume_skips_a_forged_checkpoint_and_says_why(cli, project, how, reason):
    script = project / "train.py"
    script.write_text(RESUMING_SCRIPT)
    folder = project / "checkpoints" / "s1"
    save_step(folder / "ckpt-step00000100.pt", 100, 0.5, script=str(script))
    marker = project / "MARKER"
    forged = forged_checkpoint(folder, script, marker, how)
    found, skipped = ckpt.newest_valid(project / "checkpoints", script=str(script))
    assert found == folder / "ckpt-step00000100.pt"
    assert [p for p, _ in skipped] == [forged] and reason in skipped[0][1]

    r = cli("local", "--no-preflight", "--quiet", "--resume", "auto", "train.py")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "resumed step 100" in r.stdout
    assert f"skipping checkpoint {forged}" in r.stderr and reason in r.stderr
    # standalone `python train.py --resume auto` takes the same path through the runtime
    proc = subprocess.run([sys.executable, "train.py", "--resume", "auto"], cwd=project, capture_output=True,
                          text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resumed step 100" in proc.stdout and reason in proc.stderr
    assert not marker.exists()


def test_a_manifest_without_its_own_digest_still_reads(tmp_path):
    """Manifests written before the digest covered them stay valid (verify cross-checks them)."""
    path = tmp_path / "old.pt"
    save_step(path, 5, 0.1)
    edit(path, lambda m: m.pop("manifest_digest", None))
    assert ckpt.inspect(path).status == "valid"
    assert ckpt.verify(path).ok



FAITHFUL = [
    # (what, meta) that a save records: verify's cross-check must not call them edited
    ("tensor metric", {"metrics": {"loss": 0.5, "hist": torch.zeros(3)}}),
    ("scalar tensor metric", {"metrics": {"loss": torch.tensor(0.25)}}),
    ("nan and inf", {"metrics": {"loss": float("nan"), "grad": float("inf")}}),
    ("250 metrics", {"metrics": {f"m{i}": i / 7 for i in range(250)}}),
    ("float epoch, no step", {"epoch": 1.5, "step": None}),
    ("unicode", {"run_name": "exp-é", "script": "/tmp/ünï/train.py"}),
]


@pytest.mark.parametrize(("what", "meta"), FAITHFUL, ids=[f[0] for f in FAITHFUL])
def test_verify_accepts_every_manifest_a_save_writes(tmp_path, what, meta):
    path = tmp_path / "a.pt"
    ckpt.save(path, {"w": torch.zeros(4)}, {"session_id": "s1", "step": 3, **meta})
    result = ckpt.verify(path)
    assert result.ok, (what, result.reason)
    assert ckpt.newest_valid(tmp_path) == (path, [])
