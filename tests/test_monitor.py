"""`trainctl monitor` on synthetic sessions (one per warning), bare log files and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainctl import sysinfo
from trainctl.launcher.monitor import Monitor, render
from trainctl.session import SessionStore

from .conftest import clean_env, run_cli
from .test_progress import PROGRESS_CASES, _steady

CONFIG = """
checkpoint_dir = "checkpoints"
min_free_gb = {min_free_gb}

[monitor]
stall_minutes = 10
checkpoint_overdue_minutes = 60
window = 10
"""


def _project(tmp_path: Path, min_free_gb: float = 0.0) -> Path:
    (tmp_path / "trainctl.toml").write_text(CONFIG.format(min_free_gb=min_free_gb))
    return tmp_path


def _alive() -> list[dict]:
    pid = os.getpid()
    return [{"pid": pid, "start_ticks": sysinfo.process_start_ticks(pid), "role": "launcher"}]


def _dead() -> list[dict]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return [{"pid": proc.pid, "start_ticks": 1, "role": "script"}]


def _session(project: Path, losses: list[float], *, status: str = "running", processes=None,
             start: float | None = None, every_s: float = 1.0, steps_per_point: int = 10,
             extra: list[dict] | None = None, **fields):
    now = time.time()
    start = now - len(losses) * every_s if start is None else start
    session = SessionStore(project / ".trainctl").create(
        status=status, started_at=start, processes=processes if processes is not None else _alive(),
        args=["--epochs", "4"], **fields)
    events = [{"kind": "metric", "step": i * steps_per_point, "epoch": 0, "values": {"loss": v},
               "attempt": 0, "source": "run", "t": start + (i + 1) * every_s}
              for i, v in enumerate(losses)]
    session.append_events(events + (extra or []))
    return session


def _monitor_json(project: Path, *args: str) -> dict:
    proc = run_cli(["monitor", *args, "--once", "--json"], project)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def _kinds(snap: dict) -> list[str]:
    return [w["kind"] for w in snap["warnings"]]


def test_eta_on_a_session_with_a_known_rate(tmp_path):
    project = _project(tmp_path)
    # 10 steps per second up to step 490; 1000 steps in all (from trainctl.init)
    session = _session(project, [1.0 / (i + 1) for i in range(50)],
                       extra=[{"kind": "totals", "steps": 1000, "epochs": None}])
    snap = _monitor_json(project, session.id)
    p = snap["progress"]
    assert (p["step"], p["total_steps"], p["total_epochs"]) == (490, 1000, 4)
    assert p["step_rate"] == pytest.approx(10.0)
    assert p["eta_s"] == pytest.approx(51.0)
    assert p["fraction"] == pytest.approx(0.49)
    assert snap["status"] == "running" and snap["warnings"] == []
    assert snap["metrics"]["loss"]["direction"] == "improving"
    assert snap["metrics"]["loss"]["best_step"] == 490


RISING = [1.0 + 0.1 * i for i in range(20)]
FALLING = [2.0 / (i + 1) for i in range(20)]


@pytest.mark.parametrize(("kind", "build"), [
    ("nan", lambda p: _session(p, [*FALLING, math.nan])),
    ("nan", lambda p: _session(p, [*FALLING, math.inf])),
    ("divergence", lambda p: _session(p, RISING)),
    ("plateau", lambda p: _session(p, [*FALLING[:10], *[0.5 + 0.01 * (i % 2) for i in range(15)]])),
    ("stall", lambda p: _session(p, FALLING, start=time.time() - 7200, every_s=5)),
    ("checkpoint_overdue", lambda p: _session(p, FALLING, extra=[
        {"kind": "checkpoint", "path": str(p / "ck.pt"), "step": 10, "metrics": {"loss": 1.0},
         "t": time.time() - 3 * 3600}])),
    ("checkpoint_overdue", lambda p: _session(p, FALLING, start=time.time() - 2 * 3600, every_s=1)),
    ("crashed", lambda p: _session(p, FALLING, processes=_dead())),
])
def test_each_warning(tmp_path, kind, build):
    project = _project(tmp_path)
    session = build(project)
    if kind == "stall":  # nothing written for two hours
        old = time.time() - 7200
        os.utime(session.events_path, (old, old))
    snap = _monitor_json(project, session.id)
    assert kind in _kinds(snap), snap["warnings"]
    if kind == "crashed":
        assert snap["status"] == "crashed"


def test_disk_nearly_full_in_the_checkpoint_dir(tmp_path):
    project = _project(tmp_path, min_free_gb=10**9)  # more than any disk has: always "nearly full"
    ckpt = project / "ck"
    ckpt.mkdir()
    (ckpt / "last.ckpt").write_bytes(b"x")
    session = _session(project, FALLING)
    snap = _monitor_json(project, session.id, "--checkpoint", str(ckpt))
    assert "disk_full" in _kinds(snap)
    assert snap["disk"]["path"] == str(ckpt)


def test_finished_healthy_session_has_no_warnings_and_no_eta(tmp_path):
    project = _project(tmp_path)
    session = _session(project, FALLING, status="completed", start=time.time() - 7200, every_s=5)
    snap = _monitor_json(project, "latest")
    assert snap["session"] == session.id and snap["status"] == "completed"
    assert snap["warnings"] == [] and snap["progress"]["eta_s"] is None


def test_session_with_no_metrics_yet(tmp_path):
    project = _project(tmp_path)
    SessionStore(project / ".trainctl").create(status="running", processes=_alive(),
                                               started_at=time.time())
    snap = _monitor_json(project)
    assert snap["metrics"] == {} and snap["progress"]["step"] is None
    text = run_cli(["monitor"], project)
    assert text.returncode == 0 and "none yet" in text.stdout


def _write_checkpoint(path: Path, kind: str = "torch") -> None:
    """A small real checkpoint: the scan reads what each file holds (a name alone is not enough)."""
    import struct

    import torch

    from trainctl import checkpoint

    if kind == "trainctl":
        checkpoint.save(path, {"model": {"w": torch.ones(2)}}, {"step": 7, "metrics": {"val_loss": 0.3}})
    elif kind == "safetensors":
        header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1, 2))
    else:
        torch.save({"model": {"w": torch.ones(2)}, "epoch": 0, "step": 5}, str(path))


def test_checkpoints_from_events_and_from_a_scanned_folder(tmp_path):
    project = _project(tmp_path)
    ck = project / "checkpoints"
    ck.mkdir()
    _write_checkpoint(ck / "epoch=0.ckpt")
    _write_checkpoint(ck / "epoch=1.ckpt", "trainctl")
    (ck / "notes.txt").write_text("x" * 10)
    (ck / "broken.ckpt").write_text("x" * 10)  # a name alone does not make a checkpoint
    for i, name in enumerate(["epoch=0.ckpt", "epoch=1.ckpt", "notes.txt"]):
        os.utime(ck / name, (time.time() - 100 + i, time.time() - 100 + i))
    session = _session(project, FALLING, extra=[
        {"kind": "checkpoint", "path": str(ck / "epoch=0.ckpt"), "step": 5, "epoch": 0,
         "metrics": {"loss": 0.9}, "bytes": 10}])
    from_events = _monitor_json(project, session.id)["checkpoints"]
    assert from_events["source"] == "events" and from_events["count"] == 1
    assert from_events["newest"]["metrics"] == {"loss": 0.9} and from_events["newest"]["exists"]
    scanned = _monitor_json(project, session.id, "--checkpoint", str(ck))["checkpoints"]
    assert scanned["source"] == "scan" and scanned["count"] == 2
    assert scanned["newest"]["path"].endswith("epoch=1.ckpt")
    assert scanned["newest"]["step"] == 7 and scanned["newest"]["metrics"] == {"val_loss": 0.3}


def test_scan_reads_the_recorded_checkpoint_location_and_every_checkpoint_kind(tmp_path):
    project = _project(tmp_path)
    elsewhere = project / "moved"
    elsewhere.mkdir()
    for i, name in enumerate(["model.safetensors", "pytorch_model.bin", "ckpt.pt", "notes.txt"]):
        if name == "notes.txt":
            (elsewhere / name).write_text("x" * 10)
        else:
            _write_checkpoint(elsewhere / name, "safetensors" if name.endswith(".safetensors") else "torch")
        os.utime(elsewhere / name, (time.time() - 100 + i, time.time() - 100 + i))
    session = _session(project, FALLING, checkpoint_location=str(elsewhere))
    snap = _monitor_json(project, session.id)["checkpoints"]
    assert snap["source"] == "scan" and snap["dir"] == str(elsewhere) and snap["count"] == 3
    assert snap["newest"]["path"].endswith("ckpt.pt")


LOG = (
    "2024-01-05 12:00:00 Epoch 1/2\n"
    "2024-01-05 12:00:10 step 100/400 loss: 2.50\n"
    "2024-01-05 12:00:20 step 200/400 loss: 2.00 acc: high\n"
    "Epoch 1:  50%|#####     | 5/10 [00:01<00:01, v_num=0, train_loss=9.9]\r"
    "Epoch 1: 100%|##########| 10/10 [00:02<00:00, v_num=0, train_loss=1.5]\n"
    + "x" * 200_000 + "\n"
    "2024-01-05 12:00:30 step 300/400 loss: 1e999999 grad_norm: 123456789012345678901234567890\n"
)


def test_bare_log_file_from_anywhere(tmp_path):
    log = tmp_path / "elsewhere" / "train.log"
    log.parent.mkdir()
    log.write_text(LOG)
    snap = _monitor_json(tmp_path, "--log", str(log))
    p = snap["progress"]
    assert (p["step"], p["total_steps"], p["epoch"], p["total_epochs"]) == (300, 400, 1, 2)
    assert p["step_rate"] == pytest.approx(10.0)  # from the timestamps at the start of lines
    assert p["eta_s"] == pytest.approx(10.0)
    assert snap["metrics"]["loss"]["last"] == "inf"
    assert snap["metrics"]["train_loss"]["last"] == 1.5  # the last \r state, not the first
    assert snap["metrics"]["grad_norm"]["last"] == pytest.approx(1.2345678901234568e29)
    assert "acc" not in snap["metrics"]
    assert "nan" in _kinds(snap)


def test_parsed_lines_for_testing_patterns(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("iter 5: loss 2.3\nlr=0.1 gnorm=4.5\nnothing here\n")
    proc = run_cli(["monitor", "--log", str(log), "--parsed", "--pattern", r"gnorm=(?P<gnorm>\S+)"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["line"] for r in rows] == [1, 2]
    assert rows[0]["step"] == 5 and rows[0]["values"] == {"loss": 2.3}
    assert rows[1]["values"] == {"gnorm": 4.5}


def test_follow_refreshes_until_the_session_ends(tmp_path):
    project = _project(tmp_path)
    session = _session(project, FALLING)
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "monitor", session.id, "--follow",
                             "--json", "--interval", "0.1"], cwd=project, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert json.loads(first)["status"] == "running"
    session.append_events([{"kind": "metric", "step": 999, "values": {"loss": 0.01}, "source": "run"}])
    session.update(status="completed", ended_at=time.time())
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    last = json.loads(out.splitlines()[-1])
    assert last["status"] == "completed" and last["progress"]["step"] == 999


@pytest.mark.parametrize(("args", "config", "code", "fragment"), [
    (["--log", "missing.log"], "", 3, "does not exist"),
    (["--log", "binary.log"], "", 2, "looks binary"),
    (["--log", "."], "", 2, "is a folder"),
    (["--log", "ok.log"], '[metrics]\npatterns = ["loss=(?P<loss>[0-9.]+"]\n', 2,
     "'loss=(?P<loss>[0-9.]+' is not a valid regex"),
    (["--log", "ok.log", "--pattern", "loss=([0-9]+)"], "", 2, "has no named group"),
    (["no-such-session"], "", 3, "No session 'no-such-session'"),
    (["--log", "ok.log", "--interval", "0"], "", 2, "--interval must be positive"),
    (["--log", "ok.log", "--checkpoint", "ok.log"], "", 2, "is a file, not a folder"),
    (["latest", "--log", "ok.log"], "", 2, "not both"),
])
def test_bad_input(tmp_path, args, config, code, fragment):
    (tmp_path / "trainctl.toml").write_text(config)
    (tmp_path / "binary.log").write_bytes(b"\x00\x01\x02PK\x03\x04" * 100)
    (tmp_path / "ok.log").write_text("loss: 1.0\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli(["monitor", *args], tmp_path)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_render_fits_a_narrow_terminal(tmp_path):
    project = _project(tmp_path)
    session = _session(project, [*FALLING, math.nan], name="a-run-with-a-rather-long-name")
    mon = Monitor(session=session)
    mon.refresh()
    lines = render(mon.snapshot(), width=24)
    assert lines and all(len(line) <= 24 for line in lines)
    assert any(line.startswith("! nan") for line in lines)


@pytest.mark.parametrize(("case", "events", "totals", "status", "epoch", "fraction", "eta", "parts"),
                         PROGRESS_CASES, ids=[c[0] for c in PROGRESS_CASES])
def test_progress_and_eta_from_timestamps(tmp_path, case, events, totals, status, epoch, fraction,
                                          eta, parts):
    project = _project(tmp_path)
    session = SessionStore(project / ".trainctl").create(status=status, processes=_alive(),
                                                         started_at=events[0]["t"])
    session.append_events([{"kind": "totals", **totals}, *events])
    mon = Monitor(session=session)
    mon.refresh()
    snap = mon.snapshot(now=events[-1]["t"])
    p = snap["progress"]
    assert p["epoch"] == epoch
    assert p["fraction"] == pytest.approx(fraction, abs=0.01)
    if eta is None:
        assert p["eta_s"] is None
    else:
        assert p["eta_s"] == pytest.approx(eta, rel=0.2)
    text = "\n".join(render(snap, 100))
    for part in parts:
        assert part in text, text


def test_epoch_comes_from_the_newest_metric_not_the_last_checkpoint(tmp_path):
    """run.log(..., step=s) without an epoch after save_checkpoint(epoch=2, step=100)."""
    project = _project(tmp_path)
    events = [{**e, "epoch": e["epoch"] if e["step"] <= 100 else None} for e in _steady(50, 137)]
    session = SessionStore(project / ".trainctl").create(status="running", processes=_alive(),
                                                         started_at=events[0]["t"])
    session.append_events([{"kind": "totals", "epochs": 3}, *events[:100],
                           {"kind": "checkpoint", "path": str(project / "c.pt"), "step": 100, "epoch": 2,
                            "t": events[99]["t"]}, *events[100:]])
    snap = _monitor_json(project, session.id)
    assert snap["progress"]["epoch"] == 3 and snap["progress"]["fraction"] == pytest.approx(137 / 150, abs=0.01)


RUN_LOGS_WITHOUT_EPOCH = """
import trainctl
run = trainctl.init(total_epochs=3)
for step in range(1, 138):
    run.log({"loss": 1.0 / step}, step=step, epoch=(step - 1) // 50 + 1 if step <= 100 else None)
    if step == 100:
        run.save_checkpoint({"w": [step]}, epoch=2, step=step)
"""


def test_metrics_logged_after_a_checkpoint_do_not_inherit_its_epoch(tmp_path):
    project = _project(tmp_path)
    (project / "train.py").write_text(RUN_LOGS_WITHOUT_EPOCH)
    proc = subprocess.run([sys.executable, "train.py"], cwd=project, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    session = SessionStore(project / ".trainctl").get("latest")
    epochs = {e["step"]: e["epoch"] for e in session.metrics()}
    assert epochs[100] == 2 and epochs[101] is None and epochs[137] is None
    snap = _monitor_json(project, session.id)
    assert snap["progress"]["epoch"] == 3  # from step 137 and 50 steps an epoch, not the checkpoint's 2
