"""Checkpoints a script writes itself (issue 14): where the watcher looks, what it registers
and when, what it records and where, snapshots, verification before a resume, and the resume
point of real nanoGPT-like and Hugging-Face-like scripts killed with SIGKILL.

Polls are driven by the tests (no timing): a file counts once it is unchanged at a second poll.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from trainctl import checkpoint
from trainctl.launcher import script_checkpoints, script_conventions
from trainctl.session import Session, SessionStore

from .conftest import REPO, clean_env

SCRIPTS = REPO / "tests" / "scripts"
NANOGPT = SCRIPTS / "nanogpt_like.py"
HF = SCRIPTS / "hf_like.py"
HOUR_AGO = time.time() - 3600


# --- helpers ---------------------------------------------------------------------------------

def save_nanogpt(path: Path, iter_num: int, *, pad: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": {"w": torch.full((4,), float(iter_num))}, "optimizer": {"state": {}},
             "iter_num": iter_num, "best_val_loss": 1.0 / iter_num, "config": {"lr": 0.1}}
    if pad:
        state["pad"] = torch.zeros(pad)
    torch.save(state, str(path))


def write_safetensors(path: Path, n: int = 16, *, cut: int = 0) -> None:
    """A small .safetensors file; `cut` bytes short of whole."""
    data = struct.pack(f"<{n}f", *range(n))
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, len(data)]},
                         "__metadata__": {"step": "7"}}).encode()
    payload = struct.pack("<Q", len(header)) + header + data
    path.write_bytes(payload[:len(payload) - cut])


def write_hf_folder(folder: Path, step: int, *, state: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors")
    torch.save({"state": {}, "param_groups": []}, str(folder / "optimizer.pt"))
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({
            "global_step": step, "epoch": step / 10, "log_history": [{"loss": 0.5, "step": step}]}))


def make_watcher(tmp_path: Path, *, cwd: Path, args: tuple[str, ...] = (), snapshot: bool = False,
                 events: list | None = None, started_at: float | None = None, **kw) -> script_checkpoints.Watcher:
    session_dir = tmp_path / ".trainctl" / "sessions" / "s1"
    session_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = tmp_path / "checkpoints" / "s1"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    roots = script_checkpoints.watch_roots(list(args), cwd=cwd, checkpoint_dir=ckpt_dir, globs=kw.pop("globs", ()))
    return script_checkpoints.Watcher(roots, manifest_path=session_dir / script_checkpoints.MANIFEST_NAME, cwd=cwd,
                         on_event=events.append if events is not None else None,
                         started_at=time.time() if started_at is None else started_at,
                         exclude=[tmp_path / "checkpoints"],
                         snapshot_dir=ckpt_dir / script_checkpoints.SNAPSHOT_FOLDER if snapshot else None,
                         session_id="s1", script="train.py", **kw)


def registered(events: list) -> list[dict]:
    return [e for e in events if e["kind"] == "checkpoint"]


def two_polls(w: script_checkpoints.Watcher) -> list[dict]:
    return w.poll() + w.poll()


class Script:
    """A real training process; its output lines are read as they come."""

    def __init__(self, script: Path, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd,
                                     env=env or clean_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, text: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.proc.kill()
                raise AssertionError(f"never printed {text!r}:\n" + "".join(self.output[-30:]))
            self.output.append(line)
            if text in line:
                return

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def finish(self, timeout_s: float = 300) -> str:
        self.proc.wait(timeout=timeout_s)
        while (line := self._lines.get(timeout=60)) is not None:
            self.output.append(line)
        text = "".join(self.output)
        assert self.proc.returncode == 0, text[-3000:]
        return text


def assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        if isinstance(flat_a[key], torch.Tensor):
            assert torch.equal(flat_a[key], flat_b[key]), f"{key} differs"
        else:
            assert flat_a[key] == flat_b[key], f"{key} differs"


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _flatten(v, f"{prefix}{k}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _flatten(v, f"{prefix}{i}.").items()}
    return {prefix: obj}


# --- where to look ---------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    (["--out_dir", "out"], [("--out_dir", "out")]),
    (["--out_dir=out", "--lr", "0.1"], [("--out_dir", "out")]),
    (["--output-dir", "runs/a", "--save_steps", "10"], [("--output-dir", "runs/a")]),
    (["out_dir=out"], [("out_dir", "out")]),
    (["trainer.default_root_dir=logs"], [("trainer.default_root_dir", "logs")]),
    (["--save_dir", "--lr", "0.1"], []),  # a flag where the folder should be: nothing named
    (["--ckpt_dir='ck pts'"], [("--ckpt_dir", "ck pts")]),
    (["--lr", "0.1", "data/train.bin"], []),
    (["--checkpoint_dir", "a", "--default_root_dir", "b"], [("--checkpoint_dir", "a"), ("--default_root_dir", "b")]),
])
def test_folders_named_by_the_scripts_arguments(args, expected):
    assert script_conventions.dirs_from_args(args) == expected


def test_a_file_argument_watches_its_folder(tmp_path):
    roots = script_checkpoints.watch_roots(["--save_path", "out/model.pt", "--output_dir", "runs"], cwd=tmp_path,
                              default_scan=False)
    assert [(r.path, r.why) for r in roots] == [(tmp_path / "out", "named by --save_path"),
                                                 (tmp_path / "runs", "named by --output_dir")]


@pytest.mark.parametrize(("source", "expected"), [
    ("out_dir = 'out'\ninit_from = 'scratch'\n", [("out_dir", "out")]),
    ("import argparse\np = argparse.ArgumentParser()\np.add_argument('--output_dir', default='runs')\n",
     [("--output_dir", "runs")]),
    ("args = TrainingArguments(output_dir='hf-out', save_steps=10)\n", [("TrainingArguments(output_dir=...)", "hf-out")]),
    ("cb = ModelCheckpoint(dirpath='ckpts')\n", [("ModelCheckpoint(dirpath=...)", "ckpts")]),
    ("def f(:\n", []),  # does not parse: nothing, no error
    ("lr = 0.1\n", []),
])
def test_folders_named_by_the_scripts_source(source, expected):
    assert script_conventions.dirs_from_source(source) == expected


@pytest.mark.parametrize(("glob", "rel", "match"), [
    ("out/*.pt", "out/ckpt.pt", True),
    ("out/*.pt", "out/sub/ckpt.pt", False),
    ("out/*.pt", "out/ckpt.pth", False),
    ("runs/**/*.ckpt", "runs/a/b/last.ckpt", True),
    ("runs/**/*.ckpt", "runs/last.ckpt", True),
    ("runs/*/checkpoint-*", "runs/x/checkpoint-20", True),
    ("model_[0-9].bin", "model_3.bin", True),
    ("model_[!0-9].bin", "model_3.bin", False),
    ("weights/final.safetensors", "weights/final.safetensors", True),
    ("weights/final.safetensors", "weights/other.safetensors", False),
])
def test_watch_globs(tmp_path, glob, rel, match):
    root = script_checkpoints.glob_root(glob, tmp_path)
    full = tmp_path / rel
    inside = full.is_relative_to(root.path)
    assert (inside and bool(root.pattern.fullmatch(str(full.relative_to(root.path))))) is match


@pytest.mark.parametrize(("globs", "message"), [
    ("out/*.pt", "must be a list of globs, not str"),
    ([""], "each entry is a glob"),
    ([3], "each entry is a glob"),
    (["out/[ab.pt"], "an unclosed '['"),
    (["runs/a**/x.pt"], "'**' must be a whole path part"),
])
def test_bad_watch_globs_are_refused_with_the_fix(globs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("*", r"\*")):
        script_checkpoints.validate_watch_globs(globs)


def test_only_new_checkpoint_files_outside_skipped_folders_count(tmp_path):
    project = tmp_path / "proj"
    old = project / "pretrained" / "base.pt"
    save_nanogpt(old, 1)
    os.utime(old, (HOUR_AGO, HOUR_AGO))
    (project / ".venv2").mkdir(parents=True)
    (project / ".venv2" / "pyvenv.cfg").write_text("home = /usr\n")
    env_dir = project / "myenv"
    (env_dir / "conda-meta").mkdir(parents=True)
    events: list = []
    w = make_watcher(tmp_path, cwd=project, events=events)
    for skipped in (".git/objects/x.pt", ".trainctl/y.pt", "node_modules/pkg/z.pt", "__pycache__/a.pt",
                    ".cache/torch/hub/b.pth", "venv/lib/c.pt", ".venv2/lib/d.pt", "myenv/lib/e.pt",
                    "notes/.hidden.pt", ".secret/f.pt"):
        save_nanogpt(project / skipped, 5)
    save_nanogpt(project / "runs" / "exp1" / "model.pt", 10)
    (project / "data").mkdir()
    (project / "data" / "train.bin").write_bytes(bytes(range(256)) * 16)  # a dataset, not a checkpoint
    (project / "runs" / "exp1" / "notes.txt").write_text("hello")
    two_polls(w)
    paths = [e["display"] for e in registered(events)]
    assert paths == ["runs/exp1/model.pt"]


def test_scan_of_a_tree_larger_than_the_bound_warns_once(tmp_path):
    project = tmp_path / "proj"
    for i in range(30):
        (project / f"d{i:02d}").mkdir(parents=True)
        for j in range(5):
            (project / f"d{i:02d}" / f"f{j}.txt").write_text("x")
    events: list = []
    w = make_watcher(tmp_path, cwd=project, events=events, max_entries=50)
    w.poll()
    w.poll()
    warnings = [e for e in events if e["kind"] == "warning"]
    assert len(warnings) == 1
    assert "holds more than 50 entries" in warnings[0]["message"]
    assert "[checkpoints] watch" in warnings[0]["message"]


# --- when a file counts --------------------------------------------------------------------

def test_a_file_counts_when_stable_and_whole_never_while_being_written(tmp_path):
    project = tmp_path / "proj"
    events: list = []
    w = make_watcher(tmp_path, cwd=project, args=("--out_dir", "out"), events=events)
    final = project / "staging.pt"
    project.mkdir(parents=True, exist_ok=True)
    save_nanogpt(final, 30, pad=1 << 18)
    data = final.read_bytes()
    final.unlink()
    target = project / "out" / "ckpt.pt"
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:
        for cut in (len(data) // 3, 2 * len(data) // 3):  # being written: grows between polls
            f.write(data[f.tell():cut])
            f.flush()
            two_polls(w)
            assert registered(events) == []
    # stable for two polls but without its zip central directory: still nothing
    two_polls(w)
    assert registered(events) == []
    with open(target, "ab") as f:
        f.write(data[2 * len(data) // 3:])
    w.poll()
    assert registered(events) == []  # changed at this poll: one more look first
    w.poll()
    [event] = registered(events)
    assert event["source"] == "script" and event["display"] == "out/ckpt.pt"
    assert event["step"] == 30 and event["step_name"] == "iter"
    assert event["metrics"] == {"best_val_loss": pytest.approx(1 / 30)}
    assert event["config"] == {"lr": 0.1}
    assert event["digest"].startswith("zipcrc:") and event["bytes"] == len(data)
    two_polls(w)
    assert len(registered(events)) == 1  # registered once


@pytest.mark.parametrize(("name", "write", "problem"), [
    ("w.safetensors", lambda p: write_safetensors(p, cut=10), "truncated safetensors"),
    ("m.pt", lambda p: p.write_bytes(b""), "empty"),
    ("checkpoint-20", lambda p: write_hf_folder(p, 20, state=False), "no trainer_state.json"),
])
def test_incomplete_checkpoints_are_reported_as_torn_after_the_script_ends(tmp_path, name, write, problem):
    project = tmp_path / "proj"
    project.mkdir()
    events: list = []
    w = make_watcher(tmp_path, cwd=project, events=events)
    write(project / name)
    two_polls(w)
    assert registered(events) == [] and events == []
    w.poll(final=True)
    [warning] = events
    assert warning["kind"] == "warning" and problem in warning["message"]
    assert "will not be resumed from" in warning["message"]
    manifest = script_checkpoints.read_manifest(w.manifest_path.parent)
    assert manifest["checkpoints"] == [] and problem in manifest["problems"][0]["problem"]


def test_hf_folder_counts_once_trainer_state_is_written(tmp_path):
    project = tmp_path / "proj"
    events: list = []
    w = make_watcher(tmp_path, cwd=project, args=("--output_dir", "hf"), events=events)
    folder = project / "hf" / "checkpoint-20"
    write_hf_folder(folder, 20, state=False)
    two_polls(w)
    assert registered(events) == []
    write_hf_folder(folder, 20)
    two_polls(w)
    [event] = registered(events)
    assert (event["display"], event["format"], event["step"], event["epoch"]) == ("hf/checkpoint-20", "huggingface", 20, 2.0)
    assert event["digest"].startswith("folder:")
    assert event["metrics"] == {"loss": 0.5}
    assert not any(e["display"].endswith((".pt", ".safetensors")) for e in registered(events))


def test_a_whole_file_written_just_before_the_kill_is_registered_by_the_final_poll(tmp_path):
    project = tmp_path / "proj"
    events: list = []
    w = make_watcher(tmp_path, cwd=project, events=events)
    save_nanogpt(project / "out" / "ckpt.pt", 50)
    w.poll(final=True)
    assert [e["step"] for e in registered(events)] == [50]


def test_overwrite_in_place_is_a_new_version_and_the_same_bytes_are_not(tmp_path):
    project = tmp_path / "proj"
    events: list = []
    w = make_watcher(tmp_path, cwd=project, events=events)
    target = project / "out" / "ckpt.pt"
    save_nanogpt(target, 10)
    two_polls(w)
    save_nanogpt(target, 20)
    two_polls(w)
    first, second = registered(events)
    assert (first["version"], first["step"], second["version"], second["step"]) == (1, 10, 2, 20)
    assert first["digest"] != second["digest"]
    data = target.read_bytes()
    target.write_bytes(data)  # rewritten, same bytes (nanoGPT saves again right after a resume)
    two_polls(w)
    assert len(registered(events)) == 2
    assert script_checkpoints.summarize(w.entries)["text"] == "2 written by the script, newest out/ckpt.pt iter 20"


def test_preexisting_checkpoints_count_only_once_rewritten(tmp_path):
    project = tmp_path / "proj"
    old = project / "out" / "ckpt.pt"
    save_nanogpt(old, 100)
    os.utime(old, (HOUR_AGO, HOUR_AGO))
    events: list = []
    w = make_watcher(tmp_path, cwd=project, events=events)
    two_polls(w)
    w.poll(final=True)
    assert events == []
    save_nanogpt(old, 110)
    two_polls(w)
    assert [e["step"] for e in registered(events)] == [110]


def test_trainctls_own_checkpoints_are_not_taken_for_the_scripts(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    events: list = []
    w = make_watcher(tmp_path, cwd=project, events=events)
    own = tmp_path / "checkpoints" / "s1" / "ckpt-step00000010.pt"
    checkpoint.save(own, {"model": {"w": torch.ones(2)}}, {"step": 10})
    torch.save({"x": 1, "trainctl": {"format_version": 1, "step": 3}}, str(project / "interrupted.pt"))
    two_polls(w)
    w.poll(final=True)
    assert registered(events) == []


def test_the_record_lives_in_the_session_store_not_the_users_folders(tmp_path):
    project = tmp_path / "proj"
    events: list = []
    w = make_watcher(tmp_path, cwd=project, args=("--out_dir", "out"), events=events)
    save_nanogpt(project / "out" / "ckpt.pt", 10)
    write_hf_folder(project / "out" / "checkpoint-10", 10)
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    two_polls(w)
    w.poll(final=True)
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == before
    manifest = script_checkpoints.read_manifest(w.manifest_path.parent)
    assert manifest["format_version"] == 1 and manifest["poll_interval_s"] == script_checkpoints.POLL_INTERVAL_S
    assert sorted(e["display"] for e in manifest["checkpoints"]) == ["out/checkpoint-10", "out/ckpt.pt"]
    assert {r["why"] for r in manifest["roots"]} >= {"named by --out_dir", "the session's checkpoint dir"}


def test_background_polling_registers_and_stops(tmp_path):
    project = tmp_path / "proj"
    got = threading.Event()
    events: list = []

    def on_event(event):
        events.append(event)
        got.set()

    w = make_watcher(tmp_path, cwd=project)
    w.on_event = on_event
    w.start(interval_s=0.02)
    save_nanogpt(project / "out" / "ckpt.pt", 10)
    assert got.wait(timeout=120)
    w.stop()
    assert not any(t.name == "trainctl-watch" for t in threading.enumerate())
    assert [e["step"] for e in registered(events)] == [10]


# --- snapshots and verification ------------------------------------------------------------

def test_snapshots_keep_each_version_with_a_manifest_and_retention_applies(tmp_path):
    project = tmp_path / "proj"
    events: list = []
    w = make_watcher(tmp_path, cwd=project, events=events, snapshot=True,
                     retention={"retention": {"keep_last_n": 2}})
    target = project / "out" / "ckpt.pt"
    for it in (10, 20, 30):
        save_nanogpt(target, it)
        two_polls(w)
    snap_dir = tmp_path / "checkpoints" / "s1" / "script"
    assert sorted(p.name for p in snap_dir.iterdir()) == [
        "ckpt-iter00000020.pt", "ckpt-iter00000020.pt.json", "ckpt-iter00000030.pt", "ckpt-iter00000030.pt.json"]
    for e in registered(events)[1:]:
        assert Path(e["snapshot"]).exists()
        assert checkpoint.verify(e["snapshot"]).ok
        info = checkpoint.inspect(e["snapshot"])
        assert (info.kind, info.step, info.meta["source"], info.meta["original"]) == ("trainctl", e["step"], "script", str(target))
    assert w.entries[0]["snapshot"] is None  # removed by keep_last_n = 2
    assert torch.load(snap_dir / "ckpt-iter00000020.pt", weights_only=True)["iter_num"] == 20


def test_verify_entry_catches_every_way_a_registered_version_goes_bad(tmp_path):
    project = tmp_path / "proj"
    w = make_watcher(tmp_path, cwd=project)
    target = project / "out" / "ckpt.pt"
    save_nanogpt(target, 10, pad=1 << 16)
    two_polls(w)
    [entry] = w.entries
    assert script_checkpoints.verify_entry(entry) == (True, "")
    data = bytearray(target.read_bytes())
    st = target.stat()
    data[len(data) // 2] ^= 0xFF  # a flipped byte in a tensor, size and mtime kept
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    ok, why = script_checkpoints.verify_entry(entry)
    assert not ok and "CRC-32" in why
    target.write_bytes(bytes(data[: len(data) // 2]))
    ok, why = script_checkpoints.verify_entry(entry)
    assert not ok and "torn" in why
    target.unlink()
    ok, why = script_checkpoints.verify_entry(entry)
    assert not ok and "no longer exists" in why


def test_resume_takes_the_newest_verified_of_either_kind(tmp_path):
    project = tmp_path / "proj"
    w = make_watcher(tmp_path, cwd=project, started_at=time.time() - 60)
    script_ckpt = project / "out" / "ckpt.pt"
    save_nanogpt(script_ckpt, 10)
    os.utime(script_ckpt, (time.time() - 30, time.time() - 30))
    two_polls(w)
    own_dir = tmp_path / "checkpoints" / "s1"
    choice = w.choose_resume(own_dir=own_dir)
    assert (choice.source, choice.path, choice.label) == ("script", script_ckpt, "out/ckpt.pt iter 10")
    own = own_dir / "ckpt-step00000012.pt"
    checkpoint.save(own, {"model": {"w": torch.ones(2)}}, {"step": 12})  # newer: an emergency checkpoint
    choice = w.choose_resume(own_dir=own_dir)
    assert (choice.source, choice.path) == ("trainctl", own)
    with open(own, "r+b") as f:  # damaged: fall back to the script's, and say why
        f.seek(100)
        f.write(b"\xff" * 64)
    choice = w.choose_resume(own_dir=own_dir)
    assert (choice.source, choice.path) == ("script", script_ckpt)
    assert choice.skipped and choice.skipped[0][0] == str(own)


def test_resume_auto_finds_the_script_checkpoints_of_earlier_sessions(tmp_path):
    project = tmp_path / "proj"
    sessions = tmp_path / ".trainctl" / "sessions"
    for sid, script, it in (("s1", "/a/train.py", 10), ("s2", "/b/train.py", 20), ("s3", "/a/other.py", 30)):
        (sessions / sid).mkdir(parents=True)
        target = project / sid / "ckpt.pt"
        w = script_checkpoints.Watcher(script_checkpoints.watch_roots([], cwd=project / sid, default_scan=True),
                          manifest_path=sessions / sid / script_checkpoints.MANIFEST_NAME, cwd=project / sid,
                          started_at=time.time() - 60, session_id=sid, script=script)
        save_nanogpt(target, it)
        os.utime(target, (time.time() - 50 + it, time.time() - 50 + it))  # s2 written after s1
        two_polls(w)
    (sessions / "broken").mkdir()
    (sessions / "broken" / script_checkpoints.MANIFEST_NAME).write_text("{not json")
    found = script_checkpoints.recorded_entries(sessions, script="/a/train.py")
    assert sorted((e["session_id"], e["step"]) for e in found) == [("s1", 10), ("s2", 20)]
    assert script_checkpoints.recorded_entries(sessions, script="/a/train.py", skip_sessions={"s2"})[0]["session_id"] == "s1"
    choice = script_checkpoints.choose_resume(found)
    assert (choice.source, choice.entry["session_id"], choice.entry["step"]) == ("script", "s2", 20)
    assert script_checkpoints.recorded_entries(tmp_path / "missing") == []
    # trainctl's own checkpoints of every session take part too: of the same script, not running
    own_root = tmp_path / "checkpoints"
    newer = own_root / "s4" / "ckpt-step00000025.pt"
    checkpoint.save(newer, {"model": {"w": torch.ones(2)}}, {"step": 25, "script": "/c/train.py", "session_id": "s4"})
    checkpoint.save(own_root / "s5" / "ckpt-step00000099.pt", {"model": {"w": torch.ones(2)}},
                    {"step": 99, "script": "/a/other.py", "session_id": "s5"})
    checkpoint.save(own_root / "s6" / "ckpt-step00000077.pt", {"model": {"w": torch.ones(2)}},
                    {"step": 77, "script": "/a/train.py", "session_id": "s6"})
    choice = script_checkpoints.choose_resume(found, own_dir=own_root, script="/a/train.py", skip_sessions={"s6"})
    assert (choice.source, choice.path) == ("trainctl", newer)


# --- real scripts, killed with SIGKILL -----------------------------------------------------

NANOGPT_TRAINING = ["--max_iters=40", "--eval_interval=10"]


@pytest.fixture(scope="module")
def nanogpt_reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nanogpt-ref")
    final = folder / "final.pt"
    Script(NANOGPT, [*NANOGPT_TRAINING, f"--final_path={final}"], folder).finish()
    return final


@pytest.mark.slow
def test_nanogpt_like_killed_after_its_second_checkpoint_continues_from_it(tmp_path, nanogpt_reference):
    project = tmp_path / "proj"
    project.mkdir()
    gate = tmp_path / "gate"
    gate.mkdir()
    events: list = []
    args = [*NANOGPT_TRAINING, f"--wait_for={gate}"]
    w = make_watcher(tmp_path, cwd=project, args=tuple(args), events=events)
    run = Script(NANOGPT, args, project)
    run.wait_for("saved checkpoint iter 10")
    two_polls(w)
    (gate / "go1").touch()
    run.wait_for("saved checkpoint iter 20")
    two_polls(w)
    run.kill9()
    w.poll(final=True)
    assert [(e["version"], e["step"]) for e in registered(events)] == [(1, 10), (2, 20)]
    choice = w.choose_resume(own_dir=tmp_path / "checkpoints" / "s1", takes_path=False)
    assert (choice.source, choice.label, choice.restore_to) == ("script", "out/ckpt.pt iter 20", None)
    assert script_checkpoints.summarize(w.entries)["text"] == "2 written by the script, newest out/ckpt.pt iter 20"
    final = tmp_path / "final.pt"
    # `--init_from=resume` takes no path: TRAIN_OPS_RESUME names the file
    resumed = Script(NANOGPT, [*NANOGPT_TRAINING, "--init_from=resume", f"--final_path={final}"], project,
                     env=clean_env(TRAIN_OPS_RESUME=str(choice.path))).finish()
    assert f"resuming from {project / 'out' / 'ckpt.pt'} at iter 20" in resumed
    assert_same_weights(final, nanogpt_reference)


@pytest.mark.slow
def test_kill_during_the_scripts_own_overwrite_never_resumes_the_torn_file(tmp_path, nanogpt_reference):
    project = tmp_path / "proj"
    project.mkdir()
    gate = tmp_path / "gate"
    gate.mkdir()
    events: list = []
    args = [*NANOGPT_TRAINING, f"--wait_for={gate}", "--stall_mid_save=3", "--pad_mb=16"]
    w = make_watcher(tmp_path, cwd=project, args=tuple(args), events=events, snapshot=True)
    run = Script(NANOGPT, args, project)
    for k, it in ((1, 10), (2, 20)):
        run.wait_for(f"saved checkpoint iter {it}")
        two_polls(w)
        (gate / f"go{k}").touch()
    run.wait_for("stalled mid-save")
    two_polls(w)
    run.kill9()
    target = project / "out" / "ckpt.pt"
    torn_bytes = target.read_bytes()
    w.poll(final=True)
    [torn] = [e for e in events if e["kind"] == "warning"]
    assert "out/ckpt.pt is incomplete" in torn["message"]
    assert [e["step"] for e in registered(events)] == [10, 20]

    # without a snapshot, the last good bytes are gone: nothing to resume from, and why
    no_snapshots = [{**e, "snapshot": None} for e in w.entries]
    choice = script_checkpoints.choose_resume(no_snapshots, takes_path=False)
    assert choice.path is None
    assert choice.skipped == [("out/ckpt.pt", choice.skipped[0][1])]
    assert "torn" in choice.skipped[0][1] and "no complete zip central directory" in choice.skipped[0][1]

    # with snapshots: the iter-20 version, put back where the script reads it
    choice = w.choose_resume(takes_path=False)
    assert (choice.source, choice.label, choice.restore_to) == ("snapshot", "out/ckpt.pt iter 20", target)
    assert "torn" in choice.skipped[0][1]
    moved = script_checkpoints.restore_snapshot(choice.path, choice.restore_to)
    assert moved == project / "out" / "ckpt.pt.torn" and moved.read_bytes() == torn_bytes
    two_polls(w)
    assert len(registered(events)) == 2  # the restored file is the iter-20 version: no new one
    final = tmp_path / "final.pt"
    # as nanoGPT itself: no TRAIN_OPS_RESUME, it reads its own out_dir/ckpt.pt
    resumed = Script(NANOGPT, [*NANOGPT_TRAINING, "--init_from=resume", f"--final_path={final}"],
                     project).finish()
    assert "resuming from out/ckpt.pt at iter 20" in resumed
    assert_same_weights(final, nanogpt_reference)


@pytest.mark.slow
def test_hf_like_killed_mid_save_resumes_from_the_last_whole_folder(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    training = ["--max_steps", "40", "--save_steps", "10"]
    Script(HF, [*training, "--output_dir", "hf", "--final_path", str(ref / "final.pt")], ref).finish()

    project = tmp_path / "proj"
    project.mkdir()
    gate = tmp_path / "gate"
    gate.mkdir()
    events: list = []
    args = [*training, "--output_dir", "hf", "--save_total_limit", "2", "--wait_for", str(gate),
            "--stall_mid_save", "3"]
    w = make_watcher(tmp_path, cwd=project, args=tuple(args), events=events)
    run = Script(HF, args, project)
    for k, step in ((1, 10), (2, 20)):
        run.wait_for(f"saved checkpoint-{step}")
        two_polls(w)
        (gate / f"go{k}").touch()
    run.wait_for("stalled mid-save")
    two_polls(w)
    run.kill9()
    w.poll(final=True)
    assert [(e["display"], e["step"]) for e in registered(events)] == [("hf/checkpoint-10", 10), ("hf/checkpoint-20", 20)]
    assert any("hf/checkpoint-30 is incomplete" in e["message"] for e in events if e["kind"] == "warning")
    choice = w.choose_resume(takes_path=True)
    assert (choice.source, choice.path, choice.label) == ("script", project / "hf" / "checkpoint-20",
                                                          "hf/checkpoint-20 step 20, epoch 2")
    final = tmp_path / "final.pt"
    resumed = Script(HF, [*training, "--output_dir", "hf", "--save_total_limit", "2",
                          "--resume_from_checkpoint", str(choice.path), "--final_path", str(final)],
                     project).finish()
    assert f"resuming from {choice.path} at step 20" in resumed
    assert_same_weights(final, ref / "final.pt")
    # the Trainer's own rotation removed checkpoint-10: it is never offered again
    w.poll(final=True)
    assert not (project / "hf" / "checkpoint-10").exists()
    ok, why = script_checkpoints.verify_entry(w.entries[0])
    assert not ok and "no longer exists" in why


# --- a folder at a glance ------------------------------------------------------------------

def test_describe_folder_shows_steps_ages_and_warns_when_torn_or_overdue(tmp_path):
    folder = tmp_path / "out"
    empty = script_checkpoints.describe_folder(folder)
    assert empty.rows == [] and empty.warnings == [f"no checkpoints in {folder} yet"]
    save_nanogpt(folder / "ckpt.pt", 100)
    write_hf_folder(folder / "checkpoint-100", 100)
    now = time.time()
    for p in (folder / "ckpt.pt", folder / "checkpoint-100"):
        for q in [p, *p.rglob("*")] if p.is_dir() else [p]:
            os.utime(q, (now - 7200, now - 7200))
    report = script_checkpoints.describe_folder(folder, now=now, overdue_s=3600, cwd=tmp_path)
    assert sorted((r.display, r.status, r.step) for r in report.rows) == [
        ("out/checkpoint-100", "ok", 100), ("out/ckpt.pt", "ok", 100)]
    assert len(report.warnings) == 1 and "120 min old" in report.warnings[0]
    write_safetensors(folder / "model.safetensors", cut=40)
    os.utime(folder / "model.safetensors", (now - 60, now - 60))
    report = script_checkpoints.describe_folder(folder, now=now, overdue_s=3600, cwd=tmp_path)
    assert report.rows[0].status == "incomplete"
    assert any("out/model.safetensors is incomplete" in w and "the newest whole one is out/" in w
               for w in report.warnings)


# --- how a script takes its resume point ---------------------------------------------------

@pytest.mark.parametrize(("source", "flag", "takes_path"), [
    (NANOGPT.read_text(), "--init_from=resume", False),
    (HF.read_text(), "--resume_from_checkpoint", True),
    ("import argparse\np = argparse.ArgumentParser()\np.add_argument('--resume', type=str)\n", "--resume", True),
    ("import click\n@click.option('--ckpt-path')\ndef main(ckpt_path): ...\n", "--ckpt-path", True),
    ("from transformers import HfArgumentParser, TrainingArguments\n"
     "args, = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()\n", "--resume_from_checkpoint", True),
    ("from lightning.pytorch.cli import LightningCLI\nLightningCLI(Model)\n", "--ckpt_path", True),
    ("init_from = 'scratch'\nexec(open('configurator.py').read())\nif init_from == 'resume':\n    pass\n",
     "--init_from=resume", False),
    ("p.add_argument('--resume'\n", "--resume", True),  # does not parse: read as text
])
def test_resume_conventions_recognised_in_a_scripts_source(source, flag, takes_path):
    first = script_conventions.detect_resume_conventions(source)[0]
    assert (first.flag, first.takes_path) == (flag, takes_path)
    assert first.why


def test_a_script_without_a_resume_convention_gets_no_suggestion():
    assert script_conventions.detect_resume_conventions("import torch\nprint(torch.ones(1))\n") == []


# --- through `trainctl local`: restarts continue from what the script wrote ----------------

class Launcher(Script):
    """`trainctl local` in a project, its output (the script's, and trainctl's lines) read as it comes."""

    def __init__(self, project: Path, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", *args],
                                     cwd=project, env=clean_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output = []
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()


def only_session(project: Path) -> Session:
    store = SessionStore(project / ".trainctl")
    [sid] = store.ids()
    return Session(store.sessions_dir / sid)


def kill_script(project: Path) -> None:
    """SIGKILL to the training process the launcher runs now (as the OOM killer would)."""
    [pid] = [p["pid"] for p in only_session(project).read()["processes"] if p.get("role") == "script"]
    os.kill(pid, signal.SIGKILL)


def open_gates(gate: Path) -> None:
    for k in range(1, 10):
        (gate / f"go{k}").touch()


def wait_for_registered(project: Path, step: int, *, snapshot: bool, timeout_s: float = 300) -> None:
    """Until the watcher has recorded the script's checkpoint at `step` (and its snapshot)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in only_session(project).iter_events(("checkpoint",)):
            if e.get("source") == "script" and e.get("step") == step and (e.get("snapshot") or not snapshot):
                return
        time.sleep(0.1)
    raise AssertionError(f"the watcher never recorded the checkpoint at step {step}")


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf-ref")
    final = folder / "final.pt"
    Script(HF, [*HF_TRAINING, "--output_dir", "hf", "--final_path", str(final)], folder).finish()
    return final


HF_TRAINING = ["--max_steps", "40", "--save_steps", "10"]


def nanogpt_project(tmp_path: Path, config: str = "") -> tuple[Path, Path]:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "trainctl.toml").write_text('resume_flag = "--init_from=resume"\n' + config)
    (project / "train.py").write_text(NANOGPT.read_text())
    gate = tmp_path / "gate"
    gate.mkdir()
    return project, gate


@pytest.mark.slow
def test_trainctl_local_restarts_a_nanogpt_like_script_from_its_second_checkpoint(tmp_path, nanogpt_reference):
    project, gate = nanogpt_project(tmp_path)
    final = tmp_path / "final.pt"
    run = Launcher(project, ["--max-restarts", "2", "--restart-delay", "0", "train.py", *NANOGPT_TRAINING,
                             f"--wait_for={gate}", f"--final_path={final}"])
    run.wait_for("saved checkpoint iter 10")
    (gate / "go1").touch()
    run.wait_for("saved checkpoint iter 20")
    kill_script(project)
    open_gates(gate)
    text = run.finish()
    ckpt = project / "out" / "ckpt.pt"
    assert "resuming from out/ckpt.pt iter 20, written by the script" in text
    assert f"resuming from {ckpt} at iter 20" in text  # the script itself, given --init_from=resume
    assert "restarting from scratch" not in text
    assert_same_weights(final, nanogpt_reference)
    data = only_session(project).read()
    assert data["status"] == "completed" and [a["status"] for a in data["attempts"]] == ["failed", "completed"]
    assert data["attempts"][1]["resume_from"] == str(ckpt)
    written = data["summary"]["script_checkpoints"]
    assert written["newest"]["display"] == "out/ckpt.pt" and written["newest"]["step"] == 40
    assert f"checkpoints  {written['written']} written by the script, newest out/ckpt.pt iter 40" in text
    steps = [e["step"] for e in only_session(project).iter_events(("checkpoint",)) if e.get("source") == "script"]
    assert 20 in steps and steps[-1] == 40
    manifest = script_checkpoints.read_manifest(only_session(project).dir)
    assert [e["step"] for e in manifest["checkpoints"]] == steps
    assert sorted(p.name for p in (project / "out").iterdir()) == ["ckpt.pt"]  # nothing of ours in the user's folder


@pytest.mark.slow
def test_trainctl_local_restarts_a_hf_like_script_from_its_second_folder(tmp_path, hf_reference):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "trainctl.toml").write_text('resume_flag = "--resume_from_checkpoint"\n')
    (project / "train.py").write_text(HF.read_text())
    gate = tmp_path / "gate"
    gate.mkdir()
    final = tmp_path / "final.pt"
    run = Launcher(project, ["--max-restarts", "1", "--restart-delay", "0", "train.py", *HF_TRAINING,
                             "--output_dir", "hf", "--wait_for", str(gate), "--final_path", str(final)])
    run.wait_for("saved checkpoint-10")
    (gate / "go1").touch()
    run.wait_for("saved checkpoint-20")
    kill_script(project)
    open_gates(gate)
    text = run.finish()
    folder = project / "hf" / "checkpoint-20"
    assert "resuming from hf/checkpoint-20 step 20, epoch 2, written by the script" in text
    assert f"resuming from {folder} at step 20" in text  # --resume_from_checkpoint PATH
    assert_same_weights(final, hf_reference)
    data = only_session(project).read()
    assert data["attempts"][1]["resume_from"] == str(folder)
    assert "written by the script, newest hf/checkpoint-40 step 40, epoch 4" in text


@pytest.mark.slow
def test_a_kill_during_the_overwrite_of_a_large_checkpoint_resumes_from_its_snapshot(tmp_path, nanogpt_reference):
    project, gate = nanogpt_project(tmp_path, "[checkpoints]\nsnapshot = true\n")
    final = tmp_path / "final.pt"
    run = Launcher(project, ["--max-restarts", "1", "--restart-delay", "0", "train.py", *NANOGPT_TRAINING,
                             f"--wait_for={gate}", "--stall_mid_save=3", "--pad_mb=48", f"--final_path={final}"])
    run.wait_for("saved checkpoint iter 10")
    (gate / "go1").touch()
    run.wait_for("saved checkpoint iter 20")
    wait_for_registered(project, 20, snapshot=True)
    (gate / "go2").touch()
    run.wait_for("stalled mid-save")  # half of the iter-30 version is over the iter-20 one
    kill_script(project)
    open_gates(gate)
    text = run.finish()
    ckpt = project / "out" / "ckpt.pt"
    assert "out/ckpt.pt is incomplete" in text
    assert "not resuming from out/ckpt.pt: it was overwritten and the new version is torn" in text
    session = only_session(project)
    snapshot = project / "checkpoints" / session.id / "script" / "ckpt-iter00000020.pt"
    assert f"put back out/ckpt.pt iter 20 from its snapshot {snapshot} (the torn file is kept as out/ckpt.pt.torn)" in text
    assert "resuming from out/ckpt.pt iter 20, written by the script" in text
    assert "resuming from ckpt.pt" not in text and f"resuming from {ckpt} at iter 20" in text
    assert (project / "out" / "ckpt.pt.torn").stat().st_size < ckpt.stat().st_size
    assert_same_weights(final, nanogpt_reference)


@pytest.mark.slow
def test_a_kill_during_the_overwrite_without_snapshots_restarts_from_scratch_never_from_the_torn_file(
        tmp_path, nanogpt_reference):
    project, gate = nanogpt_project(tmp_path)
    final = tmp_path / "final.pt"
    run = Launcher(project, ["--max-restarts", "1", "--restart-delay", "0", "train.py", *NANOGPT_TRAINING,
                             f"--wait_for={gate}", "--stall_mid_save=2", "--pad_mb=48", f"--final_path={final}"])
    run.wait_for("saved checkpoint iter 10")
    wait_for_registered(project, 10, snapshot=False)
    (gate / "go1").touch()
    run.wait_for("stalled mid-save")
    kill_script(project)
    open_gates(gate)
    text = run.finish()
    assert "not resuming from out/ckpt.pt: it was overwritten and the new version is torn" in text
    assert "no verified checkpoint to resume from: restarting from scratch" in text
    assert "at iter" not in text  # the script was never told to resume
    assert_same_weights(final, nanogpt_reference)


# --- what the commands show ------------------------------------------------------------------

def test_monitor_a_run_trainctl_did_not_start_shows_its_checkpoints_and_warns_torn_and_overdue(tmp_path):
    from .conftest import run_cli

    project = tmp_path / "proj"
    (project / "out").mkdir(parents=True)
    (project / "trainctl.toml").write_text("[monitor]\ncheckpoint_overdue_minutes = 60\n")
    save_nanogpt(project / "out" / "ckpt.pt", 100)
    old = time.time() - 7200
    os.utime(project / "out" / "ckpt.pt", (old, old))
    (project / "train.log").write_text("iter 100: loss 1.5\niter 101: loss 1.4\n")  # still growing
    r = run_cli(["monitor", "--log", "train.log", "--checkpoint", "out"], project)
    assert r.returncode == 0, r.stderr
    assert "checkpoints 1, newest out/ckpt.pt iter 100" in r.stdout
    assert "checkpoint_overdue" in r.stdout and "2h" in r.stdout
    write_safetensors(project / "out" / "model.safetensors", cut=10)  # the script's newest save, torn
    torn_at = time.time() - 60
    os.utime(project / "out" / "model.safetensors", (torn_at, torn_at))
    r = run_cli(["monitor", "--log", "train.log", "--checkpoint", "out", "--json"], project)
    snap = json.loads(r.stdout)
    assert snap["checkpoints"]["count"] == 1 and snap["checkpoints"]["newest"]["step"] == 100
    assert [row["status"] for row in snap["checkpoints"]["rows"]] == ["incomplete", "ok"]
    [torn] = [w for w in snap["warnings"] if w["kind"] == "checkpoint_torn"]
    assert "out/model.safetensors is incomplete" in torn["message"]
    assert "the newest whole one is out/ckpt.pt iter 100" in torn["message"]


def test_sessions_show_and_checkpoint_list_name_what_the_script_wrote(tmp_path):
    from .conftest import run_cli

    project = tmp_path / "proj"
    project.mkdir()
    (project / "trainctl.toml").write_text("[checkpoints]\nsnapshot = true\n")
    (project / "train.py").write_text(
        "import os, sys, torch\n"
        "os.makedirs('out', exist_ok=True)\n"
        "for it in (10, 20):\n"
        "    torch.save({'model': {'w': torch.ones(2) * it}, 'iter_num': it, 'best_val_loss': 1 / it,"
        " 'config': {}}, 'out/ckpt.pt')\n"
        "    print('saved', it, flush=True)\n"
        "    if it == 10:\n"
        "        import time; time.sleep(float(sys.argv[1]))\n")
    r = run_cli(["local", "--no-preflight", "train.py", "0"], project, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "written by the script, newest out/ckpt.pt iter 20" in r.stderr
    show = run_cli(["sessions", "show", "latest"], project)
    assert "written by the script, newest out/ckpt.pt iter 20" in show.stdout
    assert "out/ckpt.pt  iter 20  best_val_loss 0.05  (by the script" in show.stdout
    data = json.loads(run_cli(["sessions", "show", "latest", "--json"], project).stdout)
    assert data["script_checkpoints"]["checkpoints"][-1]["step"] == 20
    listing = run_cli(["checkpoint", "list", "--session", "latest"], project)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(line.startswith("out/ckpt.pt") and line.rstrip().endswith("by the script") for line in lines)
    assert any(line.startswith("script/ckpt-iter00000020.pt") and "valid" in line for line in lines)
    rows = json.loads(run_cli(["checkpoint", "list", "--session", "latest", "--json"], project).stdout)
    assert [(r["display"], r["state"]) for r in rows if r.get("source") == "script"] == [("out/ckpt.pt", "as registered")]


BAD_CONFIG = [
    ("watch not a list", '[checkpoints]\nwatch = "out/*.pt"\n', "trainctl.toml:2: 'checkpoints.watch' must be a list"),
    ("empty glob", '[checkpoints]\nwatch = [""]\n', "trainctl.toml:2: 'checkpoints.watch' has '': each entry is a glob"),
    ("unclosed bracket", '[checkpoints]\nwatch = ["out/[ab.pt"]\n', "an unclosed '['"),
    ("bad double star", '[checkpoints]\nwatch = ["runs/a**/x.pt"]\n', "'**' must be a whole path part"),
    ("snapshot not a bool", '[checkpoints]\nsnapshot = "yes"\n', "trainctl.toml:2: 'checkpoints.snapshot' must be true or false"),
    ("unknown key", '[checkpoints]\nsnapshots = true\n', "Did you mean 'snapshot'?"),
]


@pytest.mark.parametrize(("name", "toml", "fragment"), BAD_CONFIG, ids=[r[0] for r in BAD_CONFIG])
def test_bad_checkpoints_config_is_a_one_line_error(tmp_path, name, toml, fragment):
    from .conftest import run_cli

    (tmp_path / "trainctl.toml").write_text(toml)
    (tmp_path / "train.py").write_text("print('never runs')\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli(["local", "train.py"], tmp_path)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


INIT_CASES = [
    ("nanogpt-like", NANOGPT.read_text(), [], '\nresume_flag = "--init_from=resume"\n', "the flag takes no path"),
    ("hf-like", HF.read_text(), [], '\nresume_flag = "--resume_from_checkpoint"\n', "defines --resume_from_checkpoint"),
    ("lightning cli", "from lightning.pytorch.cli import LightningCLI\nLightningCLI()\n", [],
     '\nresume_flag = "--ckpt_path"\n', "uses LightningCLI"),
    ("named script", "import argparse\np = argparse.ArgumentParser()\np.add_argument('--resume')\n", ["run.py"],
     '\nresume_flag = "--resume"\n', "defines --resume"),
    ("nothing recognised", "print('hello')\n", [], '\nresume_flag = "--resume"\n', "shows no resume flag trainctl recognises"),
]


@pytest.mark.parametrize(("name", "source", "args", "line", "said"), INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_init_sets_the_resume_flag_the_script_takes(tmp_path, name, source, args, line, said):
    from trainctl import config

    from .conftest import run_cli

    (tmp_path / (args[0] if args else "train.py")).write_text(source)
    r = run_cli(["init", *args], tmp_path)
    assert r.returncode == 0, r.stderr
    assert said in r.stdout
    assert line in (tmp_path / "trainctl.toml").read_text()
    assert config.load(tmp_path).resume_flag == line.split('"')[1]


def test_init_with_a_missing_script_says_so(tmp_path):
    from .conftest import run_cli

    r = run_cli(["init", "nope.py"], tmp_path)
    assert r.returncode == 3 and "nope.py does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "trainctl.toml").exists()


def test_check_suggests_the_resume_flag_of_a_nanogpt_like_script(tmp_path):
    from .conftest import run_cli

    (tmp_path / "trainctl.toml").write_text("")
    (tmp_path / "train.py").write_text(NANOGPT.read_text())
    r = run_cli(["check", "--resume", "auto", "train.py"], tmp_path)
    assert r.returncode == 2
    assert "train.py does not accept --resume" in r.stdout + r.stderr
    assert "It compares init_from with 'resume': set resume_flag = \"--init_from=resume\"" in r.stdout + r.stderr


def test_resume_auto_continues_from_what_the_script_wrote_in_an_earlier_session(tmp_path):
    from .conftest import run_cli

    project = tmp_path / "proj"
    project.mkdir()
    (project / "trainctl.toml").write_text('resume_flag = "--init_from=resume"\n')
    (project / "train.py").write_text(
        "import os, sys, torch\n"
        "init_from = 'scratch'\n"
        "for arg in sys.argv[1:]:\n"
        "    key, value = arg[2:].split('=', 1)\n"
        "    globals()[key] = value\n"
        "start = 0\n"
        "if init_from == 'resume':\n"
        "    start = torch.load(os.environ['TRAIN_OPS_RESUME'])['iter_num']\n"
        "    print('resumed at', start, flush=True)\n"
        "os.makedirs('out', exist_ok=True)\n"
        "torch.save({'model': {'w': torch.ones(2)}, 'iter_num': start + 7, 'best_val_loss': 1.0,"
        " 'config': {}}, 'out/ckpt.pt')\n")
    first = run_cli(["local", "--no-preflight", "train.py"], project, timeout=300)
    assert first.returncode == 0, first.stderr
    dry = run_cli(["local", "--no-preflight", "--resume", "auto", "--dry-run", "train.py"], project)
    assert dry.returncode == 0, dry.stderr
    assert "--init_from=resume" in dry.stdout + dry.stderr
    second = run_cli(["local", "--no-preflight", "--resume", "auto", "train.py"], project, timeout=300)
    assert second.returncode == 0, second.stderr
    earlier = SessionStore(project / ".trainctl").ids()[-1]
    assert f"resuming from out/ckpt.pt iter 7, written by the script (session {earlier})" in second.stderr
    assert "resumed at 7" in second.stdout
    assert "1 written by the script, newest out/ckpt.pt iter 14" in second.stderr
