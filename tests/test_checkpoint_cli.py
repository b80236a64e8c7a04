"""`trainctl checkpoint list/info/verify/cleanup` through the real CLI, including bad input."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from trainctl import checkpoint as ckpt
from trainctl.errors import EXIT_CHECKPOINT, EXIT_NOT_FOUND, EXIT_USAGE
from trainctl.session import SessionStore


def save(path: Path, step: int, loss: float, session_id: str = "s1") -> None:
    ckpt.save(path, {"w": torch.full((256,), float(step))},
              {"session_id": session_id, "script": "train.py", "epoch": step, "step": step * 100,
               "metrics": {"loss": loss}})


@pytest.fixture
def series(project: Path) -> Path:
    folder = project / "checkpoints" / "s1"
    folder.mkdir(parents=True)
    for step, loss in enumerate([0.9, 0.2, 0.5, 0.4]):
        save(folder / f"ep{step}.pt", step, loss)
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_list_table_and_json(cli, series):
    r = cli("checkpoint", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "EPOCH", "STEP", "METRICS", "SIZE", "AGE", "STATUS"]
    assert [line.split()[0] for line in lines[1:]] == ["s1/ep3.pt", "s1/ep2.pt", "s1/ep1.pt", "s1/ep0.pt"]
    assert "loss=0.4" in lines[1] and lines[1].rstrip().endswith("valid") and " 300 " in lines[1]
    data = json.loads(cli("checkpoint", "list", "--json").stdout)
    assert [d["step"] for d in data] == [300, 200, 100, 0] and data[0]["status"] == "valid"


def test_list_by_session(cli, project, series):
    session = SessionStore(project / ".trainctl").create(session_id="s1", name="exp")
    save(project / "checkpoints" / "other.pt", 9, 0.1, session_id="zz")
    r = cli("checkpoint", "list", "--session", "exp", "--json")
    assert r.returncode == 0, r.stderr
    assert {Path(d["path"]).parent.name for d in json.loads(r.stdout)} == {session.id}
    r = cli("checkpoint", "list", "--session", "nope")
    assert r.returncode == EXIT_NOT_FOUND and "No session 'nope'" in r.stderr


def test_list_marks_bad_files_and_keeps_going(cli, project, series):
    (series / "empty.pt").write_bytes(b"")
    (series / "notes.pt").write_text("not a checkpoint\n")
    manifest = json.loads((series / "ep1.pt.json").read_text())
    manifest["bytes"] += 1
    (series / "ep1.pt.json").write_text(json.dumps(manifest))
    r = cli("checkpoint", "list", "--json")
    assert r.returncode == 0
    status = {Path(d["path"]).name: d["status"] for d in json.loads(r.stdout)}
    assert status == {"ep0.pt": "valid", "ep1.pt": "corrupt", "ep2.pt": "valid", "ep3.pt": "valid",
                      "empty.pt": "corrupt", "notes.pt": "corrupt"}
    r = cli("checkpoint", "list")
    assert "ep1.pt: corrupt: the manifest was changed" in r.stderr and "Traceback" not in r.stderr


def test_info_shows_metadata_and_contents(cli, series):
    r = cli("checkpoint", "info", str(series / "ep2.pt"))
    assert r.returncode == 0, r.stderr
    assert "kind:     trainctl" in r.stdout and "status:   valid" in r.stdout
    assert "step:     200" in r.stdout and "loss=0.5" in r.stdout and "state_keys" in r.stdout
    data = json.loads(cli("checkpoint", "info", "--json", str(series / "ep2.pt")).stdout)
    assert data["summary"]["tensors"] == 1 and data["meta"]["script"] == "train.py"


def test_verify_dir_and_file(cli, series):
    r = cli("checkpoint", "verify")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("valid: digest matches") == 4
    data = bytearray((series / "ep2.pt").read_bytes())
    at = data.find(torch.full((4,), 2.0).numpy().tobytes())
    data[at] ^= 0xFF
    (series / "ep2.pt").write_bytes(bytes(data))
    r = cli("checkpoint", "verify")
    assert r.returncode == EXIT_CHECKPOINT
    assert "FAIL  s1/ep2.pt" in r.stdout and "1 of 4 checkpoint(s) failed" in r.stderr
    assert cli("checkpoint", "verify", str(series / "ep3.pt")).returncode == 0


def test_cleanup_dry_run_then_yes(cli, series):
    before = snapshot(series)
    r = cli("checkpoint", "cleanup", "--keep-last-n", "1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "Would delete 2 checkpoint(s)" in r.stdout and "s1/ep0.pt" in r.stdout and "s1/ep2.pt" in r.stdout
    assert snapshot(series) == before
    r = cli("checkpoint", "cleanup", "--keep-last-n", "1", "--yes")
    assert r.returncode == 0, r.stderr
    # ep3 is the newest, ep1 the best loss
    assert sorted(p.name for p in series.iterdir()) == ["ep1.pt", "ep1.pt.json", "ep3.pt", "ep3.pt.json"]


def test_cleanup_keep_best_by_max_metric_and_size_cap(cli, project, series):
    r = cli("checkpoint", "cleanup", "--keep-best", "1", "--metric", "loss", "--mode", "max", "--dry-run")
    assert r.returncode == 0
    # best by max loss is ep0; ep3 is newest
    assert "s1/ep1.pt" in r.stdout and "s1/ep2.pt" in r.stdout and "s1/ep0.pt" not in r.stdout
    size = (series / "ep0.pt").stat().st_size
    r = cli("checkpoint", "cleanup", "--max-total-size", str(size * 3), "--dry-run")
    assert r.returncode == 0 and "Would delete 1 checkpoint(s)" in r.stdout and "s1/ep0.pt" in r.stdout


def test_cleanup_never_deletes_what_a_running_session_resumes_from(cli, project, series):
    store = SessionStore(project / ".trainctl")
    store.create(session_id="s2", status="running", resume_from=str(series / "ep0.pt"),
                 processes=[{"pid": os.getpid(), "role": "script"}])
    r = cli("checkpoint", "cleanup", "--keep-last-n", "1", "--yes")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in series.glob("*.pt")) == ["ep0.pt", "ep1.pt", "ep3.pt"]


def test_cleanup_uses_retention_from_config(cli, project, series):
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n[retention]\nkeep_last_n = 3\n')
    r = cli("checkpoint", "cleanup", "--yes")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in series.glob("*.pt")) == ["ep1.pt", "ep2.pt", "ep3.pt"]


def _bad_inputs(project: Path, series: Path) -> dict[str, Path]:
    folder = project / "checkpoints" / "bad"
    folder.mkdir(parents=True)
    paths = {}
    paths["empty"] = folder / "empty.pt"
    paths["empty"].write_bytes(b"")
    data = (series / "ep0.pt").read_bytes()
    paths["truncated"] = folder / "truncated.pt"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["random"] = folder / "random.pt"
    paths["random"].write_bytes(b"\x00" + os.urandom(4095))  # (a leading 0x80 would read as a pickle)
    paths["text"] = folder / "text.pt"
    paths["text"].write_text("epoch,loss\n1,0.5\n")
    paths["not_ckpt"] = folder / "archive.pt"
    with zipfile.ZipFile(paths["not_ckpt"], "w") as z:
        z.writestr("readme.txt", "hello")
    paths["mismatch"] = series / "ep1.pt"
    (series / "ep1.pt.json").write_text((series / "ep2.pt.json").read_text())
    paths["newer"] = series / "ep2.pt"
    manifest = json.loads((series / "ep2.pt.json").read_text())
    manifest["format_version"] = 99
    (series / "ep2.pt.json").write_text(json.dumps(manifest))
    paths["no_ckpts"] = project / "checkpoints" / "nothing"
    paths["no_ckpts"].mkdir()
    (paths["no_ckpts"] / "log.txt").write_text("x")
    return paths


BAD_INPUT = [
    # (command, input, exit code, message fragment)
    ("info", "empty", EXIT_CHECKPOINT, "empty file"),
    ("info", "truncated", EXIT_CHECKPOINT, "truncated"),
    ("info", "random", EXIT_CHECKPOINT, "not a checkpoint"),
    ("info", "text", EXIT_CHECKPOINT, "text file"),
    ("info", "not_ckpt", EXIT_CHECKPOINT, "without data.pkl"),
    ("info", "mismatch", EXIT_CHECKPOINT, "manifest describes 'ep2.pt'"),
    ("info", "newer", EXIT_CHECKPOINT, "format 99"),
    ("info", "no_ckpts", EXIT_CHECKPOINT, "directory without checkpoints"),
    ("info", "missing", EXIT_NOT_FOUND, "no such file"),
    ("verify", "empty", EXIT_CHECKPOINT, "failed verification: empty.pt: an empty file"),
    ("verify", "truncated", EXIT_CHECKPOINT, "truncated"),
    ("verify", "random", EXIT_CHECKPOINT, "not a checkpoint"),
    ("verify", "text", EXIT_CHECKPOINT, "text file"),
    ("verify", "not_ckpt", EXIT_CHECKPOINT, "without data.pkl"),
    ("verify", "mismatch", EXIT_CHECKPOINT, "manifest describes"),
    ("verify", "newer", EXIT_CHECKPOINT, "format 99"),
    ("verify", "no_ckpts", EXIT_NOT_FOUND, "no checkpoints under"),
    ("verify", "missing", EXIT_NOT_FOUND, "no such file"),
    ("cleanup", "outside", EXIT_USAGE, "outside the checkpoint dir"),
    ("cleanup", "missing", EXIT_NOT_FOUND, "no such file"),
    ("cleanup", "no_rule", EXIT_USAGE, "no retention rule"),
    ("cleanup", "bad_size", EXIT_USAGE, "not a size"),
    ("cleanup", "no_tty", EXIT_USAGE, "without confirmation"),
]


@pytest.mark.parametrize(("command", "case", "code", "fragment"), BAD_INPUT,
                         ids=[f"{c}-{i}" for c, i, _, _ in BAD_INPUT])
def test_bad_input(cli, project, series, tmp_path_factory, command, case, code, fragment):
    paths = _bad_inputs(project, series)
    outside = tmp_path_factory.mktemp("outside")
    save(outside / "keep.pt", 1, 0.1)
    save(outside / "keep2.pt", 2, 0.2)
    before = snapshot(project)
    before_outside = snapshot(outside)
    if command == "cleanup":
        args = {"outside": [str(outside), "--keep-last-n", "1", "--yes"],
                "missing": [str(project / "checkpoints" / "gone"), "--keep-last-n", "1"],
                "no_rule": [],
                "bad_size": ["--max-total-size", "lots"],
                "no_tty": ["--keep-last-n", "1"]}[case]
    else:
        args = [str(paths[case]) if case in paths else str(project / "missing.pt")]
    r = cli("checkpoint", command, *args, input="")
    assert r.returncode == code, (r.stdout, r.stderr)
    error_lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and fragment in error_lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert snapshot(project) == before and snapshot(outside) == before_outside


def test_cleanup_removes_partial_files_of_killed_saves_but_not_fresh_ones(cli, series):
    stale = series / ".ep9.pt.trainctl-s1-deadbeef.tmp"
    stale.write_bytes(b"\0" * 1000)
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    fresh = series / ".ep10.pt.trainctl-s1-cafe0001.tmp"  # a save in progress right now
    fresh.write_bytes(b"\0" * 10)
    r = cli("checkpoint", "cleanup", "--keep-last-n", "4", "--yes")
    assert r.returncode == 0, r.stderr
    assert "1 partial file(s) of interrupted saves" in r.stdout
    assert not stale.exists() and fresh.exists()
    assert len(list(series.glob("*.pt"))) == 4
