"""The code bundle: which files go, the same bytes for the same files, an extraction that
verifies the digest and refuses paths out of its folder, and a wheel of trainctl that installs."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from trainctl.storage import IntegrityError, UnsafeBundleError
from trainctl.storage.bundle import IgnoreRules, build_bundle, build_wheel, extract_bundle

from .conftest import clean_env

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def files(root: Path, spec: dict[str, bytes | str]) -> None:
    for rel, content in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"})


def names(bundle) -> list[str]:
    return [p for p, _ in bundle.files]


@needs_git
def test_git_project_sends_what_git_would_commit(tmp_path):
    root = tmp_path / "proj"
    files(root, {"train.py": "print(1)\n", "model/net.py": "x = 1\n", ".gitignore": "data/\n*.log\n",
                 "data/train.bin": b"\0" * 10, "run.log": "noise", "notes/todo.md": "later",
                 "weights/big.pt": b"\1" * 4000, "weights/tracked-big.pt": b"\2" * 4000,
                 "assets/keep.bin": b"\3" * 4000, ".trainctlignore": "notes/\n!assets/keep.bin\n",
                 "scratch.py": "untracked but not ignored\n", ".trainctl/sessions/x/session.json": "{}"})
    git(root, "init", "-q")
    git(root, "add", "train.py", "model/net.py", ".gitignore", "weights/tracked-big.pt")
    git(root, "commit", "-qm", "init")
    bundle = build_bundle(root, tmp_path / "out" / "bundle.tar.gz", max_file_mb=0.001)
    assert bundle.git
    assert names(bundle) == [".gitignore", ".trainctlignore", "assets/keep.bin", "model/net.py", "scratch.py",
                             "train.py", "weights/tracked-big.pt"]
    skipped = dict(bundle.skipped)
    assert skipped["notes/todo.md"] == ".trainctlignore"
    assert skipped["weights/big.pt"].startswith("over 0.001 MB")
    summary = bundle.summary(largest=2)
    assert summary["files"] == 7 and summary["source"] == "git"
    assert [f["path"] for f in summary["largest"]] == ["assets/keep.bin", "weights/tracked-big.pt"]
    assert summary["bytes"] == sum(size for _, size in bundle.files)


def test_plain_folder_leaves_out_state_checkpoints_venvs_and_caches(tmp_path):
    root = tmp_path / "proj"
    files(root, {"train.py": "pass\n", "lib/util.py": "pass\n", "lib/__pycache__/util.cpython-311.pyc": b"\0",
                 "lib/old.pyc": b"\0", ".trainctl/sessions/a/events.jsonl": "{}\n", "checkpoints/a/c.pt": b"\0",
                 "ckpts/c.pt": b"\0", ".venv/pyvenv.cfg": "home=/usr", "myenv/pyvenv.cfg": "home=/usr",
                 "myenv/lib/site.py": "pass", ".git/HEAD": "ref", "wandb/run/x": "", "data/big.bin": b"\0" * 5000,
                 "data/small.csv": "a,b\n", "data/needed.bin": b"\0" * 5000, ".DS_Store": b"\0"})
    bundle = build_bundle(root, tmp_path / "b.tar.gz", max_file_mb=0.001, exclude=["ckpts"],
                          include=["data/needed.bin"])
    assert not bundle.git
    assert names(bundle) == ["data/needed.bin", "data/small.csv", "lib/util.py", "train.py"]
    assert [p for p, _ in bundle.skipped] == ["data/big.bin"]


def test_the_same_files_give_the_same_bytes(tmp_path):
    root = tmp_path / "proj"
    files(root, {"b.py": "b\n", "a.py": "a\n", "sub/c.sh": "#!/bin/sh\n"})
    (root / "sub" / "c.sh").chmod(0o755)
    first = build_bundle(root, tmp_path / "1.tar.gz")
    for path in root.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))  # only times change
    second = build_bundle(root, tmp_path / "2.tar.gz")
    assert first.sha256 == second.sha256
    assert (tmp_path / "1.tar.gz").read_bytes() == (tmp_path / "2.tar.gz").read_bytes()
    (root / "a.py").write_text("A\n")
    assert build_bundle(root, tmp_path / "3.tar.gz").sha256 != first.sha256


def test_extraction_round_trip_keeps_modes_and_inner_links(tmp_path):
    root = tmp_path / "proj"
    files(root, {"train.py": "print('hi')\n", "scripts/run.sh": "#!/bin/sh\necho\n", "conf/base.yaml": "lr: 1\n"})
    (root / "scripts" / "run.sh").chmod(0o755)
    (root / "conf" / "current.yaml").symlink_to("base.yaml")
    bundle = build_bundle(root, tmp_path / "b.tar.gz")
    out = tmp_path / "machine" / "code"
    extracted = extract_bundle(bundle.path, out, sha256=bundle.sha256)
    assert sorted(extracted) == ["conf/base.yaml", "conf/current.yaml", "scripts/run.sh", "train.py"]
    assert (out / "train.py").read_text() == "print('hi')\n"
    assert os.access(out / "scripts" / "run.sh", os.X_OK) and not os.access(out / "train.py", os.X_OK)
    assert os.readlink(out / "conf" / "current.yaml") == "base.yaml"


def test_extraction_refuses_a_bundle_that_does_not_match_its_digest(tmp_path):
    root = tmp_path / "proj"
    files(root, {"train.py": "pass\n"})
    bundle = build_bundle(root, tmp_path / "b.tar.gz")
    with pytest.raises(IntegrityError, match="does not match its digest"):
        extract_bundle(bundle.path, tmp_path / "out", sha256="sha256:" + "0" * 64)
    assert not (tmp_path / "out").exists()


def _evil_tar(path: Path, members: list[tuple[str, str, str]]) -> str:
    """A tar.gz with (name, type, link target or content) members; returns its digest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = value.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                             "dev": tarfile.CHRTYPE}[kind]
                info.linkname = value
                tar.addfile(info)
    path.write_bytes(buf.getvalue())
    return "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.mark.parametrize(("members", "fragment"), [
    ([("ok.py", "file", "x"), ("../escape.py", "file", "x")], "not a relative path"),
    ([("/tmp/abs.py", "file", "x")], "not a relative path"),
    ([("a/../../escape.py", "file", "x")], "not a relative path"),
    ([("link", "sym", "/etc")], "symlink out of the folder"),
    ([("link", "sym", "../..")], "symlink out of the folder"),
    ([("sub/link", "sym", "../../outside")], "symlink out of the folder"),
    ([("link", "sym", "."), ("link/through.py", "file", "x")], "through a symlink"),
    ([("hard", "hard", "ok.py")], "hard link"),
    ([("pipe", "fifo", "")], "hard link, device or fifo"),
    ([("dev", "dev", "")], "hard link, device or fifo"),
    ([("C:/win.py", "file", "x")], "not a relative path"),
], ids=["dotdot", "absolute", "nested-dotdot", "symlink-abs", "symlink-up", "symlink-nested-up",
        "write-through-link", "hardlink", "fifo", "device", "drive"])
def test_extraction_refuses_paths_out_of_the_folder(tmp_path, members, fragment):
    archive = tmp_path / "evil.tar.gz"
    digest = _evil_tar(archive, members)
    target = tmp_path / "box" / "code"
    with pytest.raises(UnsafeBundleError, match=fragment) as caught:
        extract_bundle(archive, target, sha256=digest)
    assert caught.value.hint and "Nothing outside" in caught.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "evil.tar.gz"]
    assert list(target.iterdir()) == []  # refused before anything was written


def test_wheel_is_deterministic_and_installs_offline(tmp_path):
    first, digest = build_wheel(tmp_path / "a")
    again, digest_again = build_wheel(tmp_path / "b")
    assert first.name == again.name and first.name.startswith("trainctl-") and first.name.endswith("-py3-none-any.whl")
    assert digest == digest_again and first.read_bytes() == again.read_bytes()
    with zipfile.ZipFile(first) as zf:
        listed = zf.namelist()
        dist = next(n.split("/")[0] for n in listed if n.endswith(".dist-info/METADATA"))
        assert "trainctl/storage/bundle.py" in listed and "trainctl/py.typed" in listed
        assert not any("__pycache__" in n for n in listed)
        metadata = zf.read(f"{dist}/METADATA").decode()
        assert "Requires-Dist: click" in metadata and "boto3" not in metadata
        assert "trainctl = " in zf.read(f"{dist}/entry_points.txt").decode()
        for line in zf.read(f"{dist}/RECORD").decode().splitlines():
            name, hash_, size = line.rsplit(",", 2)
            if hash_:
                data = zf.read(name)
                assert int(size) == len(data)
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                        "--target", str(target), str(first)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    probe = subprocess.run([sys.executable, "-c", "import trainctl, trainctl.storage.remote; print(trainctl.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(target))


@pytest.mark.parametrize(("lines", "path", "ignored"), [
    (["*.log"], "a/b/run.log", True),
    (["*.log", "!keep.log"], "keep.log", False),
    (["/build"], "build/x.py", True),
    (["/build"], "src/build/x.py", False),
    (["build/"], "src/build/x.py", True),
    (["build/"], "build", False),  # a folder rule does not match a file of that name
    (["docs/**/*.png"], "docs/a/b/c.png", True),
    (["docs/**/*.png"], "docs/c.png", True),
    (["data/", "!data/keep.csv"], "data/keep.csv", True),  # a folder left out stays out
    (["# comment", "", "x?.py"], "x1.py", True),
    (["x[0-9].py"], "xa.py", False),
    (["\\!important.txt"], "!important.txt", True),
])
def test_ignore_rules(lines, path, ignored):
    assert IgnoreRules(lines).ignored(path) is ignored
