"""Small crafted files must not exhaust the machine (issue 13 #4).

Each file is tried through the real CLI in a child process whose peak memory is measured; a
file past the reader's bounds is reported as `unreadable: too large/complex`, and one such file
never stops a listing, a cleanup or an auto-resume of the others.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from trainctl import checkpoint as ckpt
from trainctl import checkpoint_reader as reader
from trainctl.errors import EXIT_CHECKPOINT

from .conftest import clean_env

PEAK_RSS_LIMIT_MB = 500  # the CLI itself needs well under 100 MB; the unbounded reader took GBs


def torch_zip(path: Path, data_pkl: bytes, *, deflate: bool = False) -> Path:
    """A zip laid out as torch.save writes one (`<name>/data.pkl`, `<name>/version`)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/version", "3\n")
    return path


def shared_references(levels: int = 9, fanout: int = 10) -> object:
    """`obj = [obj] * 10`, nine times: ~100 objects that are 10**9 once shared references expand."""
    obj: object = {"lr": 0.1}
    for _ in range(levels):
        obj = [obj] * fanout
    return obj


def small_ints(count: int) -> bytes:
    """A protocol-2 pickle of a list of `count` zeros (2 bytes each), built without the list."""
    return b"\x80\x02]q\x00(" + b"K\x00" * count + b"e."


def nested_lists(depth: int) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def deep_tuple_as_dict_key(depth: int) -> bytes:
    """{((((...)))): 1}: hashing a key that deep overflows the C stack of the process."""
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"K\x01s."


def deep_tuple_in_frozenset(depth: int) -> bytes:
    return b"\x80\x02cbuiltins\nfrozenset\n]" + b")" + b"\x85" * depth + b"a\x85R."


def huge_memo_index(index: int) -> bytes:
    """One object stored under memo slot `index`: the C unpickler allocates index*2 slots."""
    return b"\x80\x02N" + b"r" + index.to_bytes(4, "little") + b"."


def legacy_file(path: Path, payload: bytes) -> Path:
    """A legacy (non-zip) torch file: magic number, protocol, sys info, then the object's pickle."""
    head = (pickle.dumps(reader.LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
    path.write_bytes(head + payload)
    return path


BOMB = shared_references()
BUILDERS = {
    # the 1.5 KB file, and the same bomb where each reader looks: a config, trainctl's own
    # metadata (no manifest), the top level
    "shared-refs-config": lambda d: torch_zip(d / "shared_config.pt", pickle.dumps({"epoch": 1, "config": BOMB}, protocol=2)),
    "shared-refs-meta": lambda d: torch_zip(d / "shared_meta.pt", pickle.dumps(
        {"model": {}, "trainctl": {"format_version": 1, "step": 5, "config": BOMB}}, protocol=2)),
    "shared-refs-top": lambda d: torch_zip(d / "shared_top.pt", pickle.dumps(BOMB, protocol=2)),
    # the 228 KB zip of 120 million ints, smaller: past the size bound, then under it but
    # past the object bound, then the same in a legacy file that declares no size
    "ints-over-size": lambda d: torch_zip(d / "ints_size.pt", small_ints(40_000_000), deflate=True),
    "ints-over-count": lambda d: torch_zip(d / "ints_count.pt", small_ints(12_000_000), deflate=True),
    "ints-legacy": lambda d: legacy_file(d / "ints_legacy.pt", small_ints(12_000_000)),
    "nested-lists": lambda d: torch_zip(d / "nested.pt", nested_lists(200_000)),
    "deep-key": lambda d: torch_zip(d / "deep_key.pt", deep_tuple_as_dict_key(1_000_000)),
    "deep-frozenset": lambda d: torch_zip(d / "deep_frozenset.pt", deep_tuple_in_frozenset(1_000_000)),
    "memo-index": lambda d: torch_zip(d / "memo.pt", huge_memo_index(100_000_000)),
}


def hostile_files(folder: Path, names: list[str] | None = None) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {name: BUILDERS[name](folder) for name in names or BUILDERS}


def run_measured(args: list[str], cwd: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI in a child; also return the child's peak RSS in MB."""
    wrapper = ("import resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr)\n"
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(p.returncode if p.returncode >= 0 else 128 - p.returncode)\n")
    r = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "trainctl", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout, env=clean_env())
    peak = next(int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    return r, peak / 1024


UNREADABLE = ["shared-refs-config", "shared-refs-meta", "shared-refs-top", "ints-over-size", "ints-over-count",
              "ints-legacy", "nested-lists", "deep-key", "deep-frozenset"]


def test_the_crafted_files_are_as_small_as_reported(tmp_path):
    files = hostile_files(tmp_path, ["shared-refs-config", "ints-over-size"])
    assert files["shared-refs-config"].stat().st_size < 1500
    assert files["ints-over-size"].stat().st_size < 300_000


@pytest.mark.parametrize("name", [*UNREADABLE, "memo-index"])
def test_info_on_a_hostile_file_is_bounded(project, name):
    path = hostile_files(project / "hostile", [name])[name]
    r, peak_mb = run_measured(["checkpoint", "info", "--json", str(path)], project)
    assert "Traceback" not in r.stderr and r.returncode in (0, EXIT_CHECKPOINT), (r.returncode, r.stderr[-2000:])
    assert peak_mb < PEAK_RSS_LIMIT_MB, f"{name}: {peak_mb:.0f} MB"
    if name in UNREADABLE:
        assert r.returncode == EXIT_CHECKPOINT
        error_lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1 and "unreadable: too large/complex" in error_lines[0], r.stderr


def valid_series(folder: Path) -> list[Path]:
    paths = []
    for step in (1, 2):
        path = folder / f"ckpt-step{step:08d}.pt"
        ckpt.save(path, {"w": torch.full((16,), float(step))},
                  {"session_id": "s1", "script": "train.py", "step": step, "metrics": {"loss": 1.0 / step}})
        paths.append(path)
    return paths


# the files that cost seconds up to their bound are tried one by one above; here the deep ones
# are only as deep as it takes to pass the bound
QUICK = [name for name in UNREADABLE if name not in ("ints-over-count", "ints-legacy", "deep-key", "deep-frozenset")]


def test_hostile_files_never_stop_a_listing_cleanup_or_auto_resume(project):
    folder = project / "checkpoints" / "s1"
    older, newer = valid_series(folder)
    files = hostile_files(folder, [*QUICK, "memo-index"])
    files["deep-key"] = torch_zip(folder / "deep_key.pt", deep_tuple_as_dict_key(500))
    files["deep-frozenset"] = torch_zip(folder / "deep_frozenset.pt", deep_tuple_in_frozenset(500))
    # the bomb again, with a manifest that matches its bytes and dates it newest
    forged = torch_zip(folder / "forged.pt", pickle.dumps(
        {"trainctl": {"format_version": 1, "step": 99, "config": shared_references()}}, protocol=2))
    ckpt.register(forged, {"session_id": "s1", "script": "train.py", "step": 99, "saved_at": time.time() + 60})

    r, peak_mb = run_measured(["checkpoint", "list", "--json"], project)
    assert r.returncode == 0 and peak_mb < PEAK_RSS_LIMIT_MB, (r.stderr[-2000:], peak_mb)
    status = {Path(d["path"]).name: (d["status"], d["error"]) for d in json.loads(r.stdout)}
    assert status[older.name][0] == status[newer.name][0] == "valid"
    for name in [*QUICK, "deep-key", "deep-frozenset"]:
        got, error = status[files[name].name]
        assert got == "unreadable" and error.startswith("too large/complex"), (name, got, error)

    r, peak_mb = run_measured(["checkpoint", "list"], project)
    assert r.returncode == 0 and peak_mb < PEAK_RSS_LIMIT_MB
    assert f"s1/{files['shared-refs-config'].name}: unreadable: too large/complex" in r.stderr

    r, peak_mb = run_measured(["checkpoint", "cleanup", "--keep-last-n", "1", "--dry-run"], project)
    assert r.returncode == 0 and peak_mb < PEAK_RSS_LIMIT_MB, r.stderr[-2000:]

    r, peak_mb = run_measured(["checkpoint", "verify"], project)
    assert r.returncode == EXIT_CHECKPOINT and peak_mb < PEAK_RSS_LIMIT_MB and "Traceback" not in r.stderr
    assert f"ok    s1/{newer.name}" in r.stdout

    found, skipped = ckpt.newest_valid(project / "checkpoints", script="train.py")
    assert found == newer
    assert [p for p, _ in skipped] == [forged] and "too large/complex" in skipped[0][1]


def test_shared_references_are_walked_once(tmp_path):
    """Summarising a checkpoint that shares one object many times costs that object once."""
    leaf = {"w": torch.zeros(4)}
    path = tmp_path / "shared.pt"
    torch.save({"epoch": 1, "config": {"layers": [[1, 2]] * 3}, "model": leaf, "ema": leaf}, path)
    info = ckpt.inspect(path)
    assert info.status == "foreign" and info.summary["config"] == {"layers": [[1, 2]] * 3}


def test_the_time_bound_stops_a_slow_walk(tmp_path):
    path = tmp_path / "normal.pt"
    torch.save({"model": {f"w{i}": torch.zeros(2) for i in range(200)}, "epoch": 1}, path)
    assert reader.read_torch(path).obj["epoch"] == 1
    with pytest.raises(reader.TooComplexCheckpoint, match="too large/complex"):
        reader.read_torch(path, limits=reader.ReadLimits(max_seconds=0.0))
