"""trainctl.checkpoint with real torch and real files: save, scan, verify, load, crashes, retention."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trainctl import checkpoint as ckpt
from trainctl.config import load as load_config
from trainctl.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedCheckpointError,
    UntrustedCheckpointError,
)

from .conftest import REPO, clean_env


def save_model(path: Path, *, step: int, loss: float | None = None, value: float = 1.0, **meta) -> dict:
    model = torch.nn.Linear(8, 4)
    torch.nn.init.constant_(model.weight, value)
    metrics = {"loss": loss} if loss is not None else {}
    return ckpt.save(path, {"model": model.state_dict()},
                     {"session_id": "s1", "script": "train.py", "epoch": step // 10, "step": step,
                      "metrics": metrics, **meta})


def flip_byte_in_tensor_data(path: Path, value: float) -> None:
    """Corrupt a tensor's bytes in place, keeping size and zip index unchanged."""
    data = bytearray(path.read_bytes())
    pattern = torch.tensor([value] * 4).numpy().tobytes()
    at = data.find(pattern)
    assert at > 0
    data[at + 1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_save_scan_inspect_verify_load(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    meta = {"session_id": "20250101-000000-abcdef", "script": "/p/train.py", "name": "exp",
            "epoch": 2, "step": 200, "metrics": {"loss": 0.25, "acc": 0.9},
            "config": {"lr": 1e-3, "layers": [4, 8, 2]}, "git": {"commit": "abc", "dirty": True},
            "world_size": 1, "rng": ckpt.capture_rng(), "path": Path("/x/y")}
    path = tmp_path / "s" / "step200.pt"
    manifest = ckpt.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict()}, meta)

    assert manifest["file"] == "step200.pt" and manifest["bytes"] == path.stat().st_size
    assert manifest["digest"].startswith("zipcrc:")
    on_disk = json.loads((tmp_path / "s" / "step200.pt.json").read_text())
    assert on_disk == manifest and "rng" not in on_disk["meta"]
    assert on_disk["meta"]["config"]["layers"] == [4, 8, 2] and on_disk["meta"]["path"] == "/x/y"

    [info] = ckpt.scan(tmp_path)
    assert (info.kind, info.status, info.epoch, info.step) == ("trainctl", "valid", 2, 200)
    assert info.metrics == {"loss": 0.25, "acc": 0.9} and info.session_id == meta["session_id"]
    assert ckpt.verify(path).ok

    deep = ckpt.inspect(path, contents=True)
    assert deep.summary["state_keys"] == ["model", "optimizer"]
    assert deep.summary["tensors"] >= 4

    # the whole file loads with weights_only=True, by torch itself
    raw = torch.load(path, weights_only=True)
    assert raw["trainctl"]["format_version"] == ckpt.FORMAT_VERSION
    state = ckpt.load(path)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fresh.load_state_dict(state["model"])
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert state["trainctl"]["step"] == 200 and state["trainctl"]["saved_at"] > 0


def test_rng_capture_and_restore_replays_the_same_numbers():
    import random as py_random

    import numpy as np

    rng = ckpt.capture_rng()
    first = (py_random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng(rng)
    second = (py_random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_rng_survives_a_weights_only_round_trip(tmp_path):
    ckpt.save(tmp_path / "r.pt", {}, {"rng": ckpt.capture_rng()})
    expected = torch.rand(5)
    ckpt.restore_rng(ckpt.load(tmp_path / "r.pt")["trainctl"]["rng"])
    assert torch.equal(torch.rand(5), expected)


def test_overwriting_the_same_name_keeps_a_matching_manifest(tmp_path):
    save_model(tmp_path / "last.pt", step=1)
    save_model(tmp_path / "last.pt", step=2)
    assert ckpt.read_manifest(tmp_path / "last.pt")["meta"]["step"] == 2
    assert ckpt.verify(tmp_path / "last.pt").ok
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_async_saver_snapshot_is_taken_at_submit(tmp_path):
    weights = torch.zeros(1000)
    with ckpt.AsyncSaver() as saver:
        futures = []
        for step in range(3):
            weights.fill_(step)
            futures.append(saver.submit(tmp_path / f"a{step}.pt", {"w": weights}, {"step": step}))
            weights.fill_(-1)  # the training thread keeps going; the saved copy must not change
        saver.wait()
    for step, future in enumerate(futures):
        assert future.result()["meta"]["step"] == step
        assert torch.equal(ckpt.load(tmp_path / f"a{step}.pt")["w"], torch.full((1000,), float(step)))


def test_load_errors_are_typed(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        ckpt.load(tmp_path / "empty.pt")
    save_model(tmp_path / "t.pt", step=1)
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError):
        ckpt.load(tmp_path / "t.pt")


def test_newer_format_version_is_refused(tmp_path):
    save_model(tmp_path / "n.pt", step=1)
    manifest = json.loads((tmp_path / "n.pt.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "n.pt.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedCheckpointError, match="newer"):
        ckpt.load(tmp_path / "n.pt")
    result = ckpt.verify(tmp_path / "n.pt")
    assert not result.ok and "99" in result.reason
    assert ckpt.newest_valid(tmp_path)[0] is None


def test_untrusted_load_needs_trust_and_names_the_danger(tmp_path):
    import collections
    import fractions

    path = tmp_path / "odd.pt"
    torch.save({"epoch": 1, "frac": fractions.Fraction(1, 3), "c": collections.Counter("ab")}, path)
    with pytest.raises(UntrustedCheckpointError) as e:
        ckpt.load(path)
    assert "run any code" in e.value.message and "trust=True" in e.value.hint
    assert ckpt.load(path, trust=True)["frac"] == fractions.Fraction(1, 3)


def test_byte_flip_is_caught_by_verify_and_newest_valid_falls_back(tmp_path):
    save_model(tmp_path / "s1.pt", step=1, value=3.0)
    save_model(tmp_path / "s2.pt", step=2, value=5.0)
    flip_byte_in_tensor_data(tmp_path / "s2.pt", 5.0)
    result = ckpt.verify(tmp_path / "s2.pt")
    assert (result.ok, result.status) == (False, "corrupt") and "CRC" in result.reason
    path, skipped = ckpt.newest_valid(tmp_path)
    assert path == tmp_path / "s1.pt"
    assert [p for p, _ in skipped] == [tmp_path / "s2.pt"] and "CRC" in skipped[0][1]


def test_newest_valid_filters_and_reports_unverified(tmp_path):
    save_model(tmp_path / "a.pt", step=1, run_name="exp-a")
    save_model(tmp_path / "b.pt", step=2, script="/elsewhere/other.py")
    save_model(tmp_path / "c.pt", step=3)
    (tmp_path / "c.pt.json").unlink()  # as if killed between the file and its manifest
    assert ckpt.newest_valid(tmp_path, name="exp-a")[0] == tmp_path / "a.pt"
    assert ckpt.newest_valid(tmp_path, script="other.py")[0] == tmp_path / "b.pt"
    path, skipped = ckpt.newest_valid(tmp_path, script="train.py")
    assert path == tmp_path / "a.pt"
    assert skipped == [(tmp_path / "c.pt", "no complete manifest (an interrupted save?)")]
    assert ckpt.newest_valid(tmp_path, session_id="nope") == (None, [])


def test_reading_metadata_imports_no_torch(tmp_path):
    save_model(tmp_path / "m.pt", step=7, loss=0.5)
    save_model(tmp_path / "n.pt", step=8)
    (tmp_path / "n.pt.json").unlink()
    code = textwrap.dedent(f"""
        import sys
        from trainctl import checkpoint as c
        infos = c.scan({str(tmp_path)!r})
        assert [i.step for i in infos] == [8, 7], infos
        assert c.verify({str(tmp_path / 'm.pt')!r}).ok
        assert c.inspect({str(tmp_path / 'n.pt')!r}).summary['tensors'] == 2
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(),
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


WRITER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from trainctl import checkpoint as c
folder, start = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
step = start
while True:
    state = {{"x": torch.full((6_000_000,), float(step)), "step": step}}  # 24 MB
    c.save(os.path.join(folder, f"step{{step:05d}}.pt"), state, {{"step": step, "script": "w.py"}})
    c.save(os.path.join(folder, "last.pt"), state, {{"step": step, "script": "w.py"}})
    step += 1
"""


@pytest.mark.slow
def test_sigkill_during_large_saves_never_yields_a_torn_checkpoint(tmp_path):
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER.format(repo=str(REPO)))
    folder = tmp_path / "ckpts"
    folder.mkdir()
    rnd = random.Random(1234)
    start = 0
    for _round in range(6):
        proc = subprocess.Popen([sys.executable, str(writer), str(folder), str(start)],
                                stdout=subprocess.PIPE, text=True, env=clean_env())
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.05, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        for info in ckpt.scan(folder):
            if info.status == "valid":
                assert ckpt.verify(info.path).ok, info.path
        path, _skipped = ckpt.newest_valid(folder, script="w.py")
        if path is not None:
            state = ckpt.load(path)
            step = state["trainctl"]["step"]
            assert state["step"] == step
            assert torch.equal(state["x"][[0, -1]], torch.tensor([float(step)] * 2))
            start = step + 1
    assert start > 0, "the writer never finished a save; the kill windows were too short"


# --- retention -------------------------------------------------------------------------------

def make_series(folder: Path, losses: list[float | None]) -> list[Path]:
    """Checkpoints step0..stepN, oldest first, with the given losses."""
    paths = []
    for step, loss in enumerate(losses):
        path = folder / f"step{step}.pt"
        save_model(path, step=step, loss=loss)
        paths.append(path)
    return paths


def names(infos) -> list[str]:
    return sorted(i.path.name for i in infos)


def test_keep_last_n_keeps_newest_and_the_best(tmp_path):
    make_series(tmp_path, [0.9, 0.1, 0.8, 0.7, 0.6, 0.5])
    plan = ckpt.plan_retention(ckpt.scan(tmp_path), keep_last_n=2)
    # step1 holds the best loss: never deleted, whatever keep_last_n says
    assert names(plan) == ["step0.pt", "step2.pt", "step3.pt"]
    assert [i.path.name for i in plan] == ["step0.pt", "step2.pt", "step3.pt"]  # oldest first


def test_keep_best_k_by_max_metric(tmp_path):
    for step, acc in enumerate([0.5, 0.9, 0.7, 0.6, 0.8]):
        ckpt.save(tmp_path / f"step{step}.pt", {"w": torch.zeros(2)},
                  {"step": step, "metrics": {"acc": acc}})
    plan = ckpt.plan_retention(ckpt.scan(tmp_path), keep_last_n=1, keep_best_k=2, metric="acc", mode="max")
    assert names(plan) == ["step0.pt", "step2.pt", "step3.pt"]


def test_newest_valid_is_kept_even_when_newer_ones_are_corrupt(tmp_path):
    make_series(tmp_path, [0.1, 0.5, 0.6, 0.7])
    (tmp_path / "step3.pt").write_bytes(b"torn")  # newest is corrupt: step2 is the newest valid
    plan = ckpt.plan_retention(ckpt.scan(tmp_path), keep_last_n=1)
    assert names(plan) == ["step1.pt"]


def test_protected_unverified_and_foreign_are_never_deleted(tmp_path):
    paths = make_series(tmp_path, [0.1, 0.5, 0.6, 0.7, 0.8])
    (paths[2].with_name(paths[2].name + ".json")).unlink()  # unverified: maybe a save in progress
    torch.save({"epoch": 1, "state_dict": {}}, tmp_path / "other_tool.ckpt")
    plan = ckpt.plan_retention(ckpt.scan(tmp_path), keep_last_n=1, protected=[str(paths[1])])
    assert names(plan) == ["step3.pt"]


def test_size_cap_deletes_oldest_first_but_not_newest_or_best(tmp_path):
    make_series(tmp_path, [0.5, 0.6, 0.1, 0.7, 0.8])
    infos = ckpt.scan(tmp_path)
    one = infos[0].bytes
    plan = ckpt.plan_retention(infos, max_total_bytes=one * 2)
    assert names(plan) == ["step0.pt", "step1.pt", "step3.pt"]
    # a cap smaller than what must be kept: still keeps newest and best
    plan = ckpt.plan_retention(infos, max_total_bytes=1)
    assert names(plan) == ["step0.pt", "step1.pt", "step3.pt"]


def test_no_rule_deletes_nothing(tmp_path):
    make_series(tmp_path, [0.5, 0.4, 0.3])
    assert ckpt.plan_retention(ckpt.scan(tmp_path)) == []
    assert ckpt.apply_retention(tmp_path, {}) == []


def test_apply_retention_from_the_project_config(tmp_path):
    (tmp_path / "trainctl.toml").write_text('[retention]\nkeep_last_n = 2\nmetric = "loss"\n')
    folder = tmp_path / "checkpoints" / "s1"
    folder.mkdir(parents=True)
    make_series(folder, [0.9, 0.8, 0.2, 0.7, 0.6])
    deleted = ckpt.apply_retention(folder, load_config(tmp_path))
    assert sorted(p.name for p in deleted) == ["step0.pt", "step1.pt"]
    left = sorted(p.name for p in folder.iterdir())
    assert left == ["step2.pt", "step2.pt.json", "step3.pt", "step3.pt.json", "step4.pt", "step4.pt.json"]
    # a plain dict works too (as the runtime may pass its resolved config)
    assert ckpt.apply_retention(folder, {"retention": {"keep_last_n": 1, "max_total_size": ""}}) \
        == [folder / "step3.pt"]
