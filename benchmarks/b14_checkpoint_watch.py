"""B14: watching for the checkpoints a script writes itself, on a working directory of 100,000
files, and what registering and snapshotting one version costs.

The tree: 2,000 leaf folders of 50 files (20 x 10 x 10 nested), 1% of the files with
checkpoint suffixes, all older than the session (pre-existing files are tracked, never read).
- first scan: the watcher's first `poll()` (every folder listed once) vs `os.walk` of the same
  tree (the least any scan lists). Goal: <= 1.5x.
- per poll: a later `poll()` with nothing changed (one stat per folder and per candidate, no
  listing), as a share of the poll interval (script_checkpoints.POLL_INTERVAL_S). Goal: <= 0.05x, i.e. at
  most 5% of one core while the script trains.
- one new version of a 256 MB `torch.save` checkpoint: registering it (facts from data.pkl +
  the central-directory digest) and, with `[checkpoints] snapshot = true`, registering and
  copying it (copy, fsync, digest of the copy, manifest), each vs the script's own
  `torch.save` + fsync of it. Reported.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from _common import emit, interleaved, parse_args, pick, project_dir, row, stats


def build_tree(root: Path, top: int, mid: int, leaf: int, files: int) -> dict[str, int]:
    """top x mid x leaf folders of `files` files; every 100th file a checkpoint-suffixed one."""
    old = time.time() - 3600
    n = candidates = 0
    folders = []
    for a in range(top):
        for b in range(mid):
            for c in range(leaf):
                folder = root / f"a{a:02d}" / f"b{b:02d}" / f"c{c:02d}"
                folder.mkdir(parents=True)
                folders.append(folder)
                for i in range(files):
                    suffix = ".pt" if n % 100 == 0 else ".jpg"
                    path = folder / f"f{i:03d}{suffix}"
                    path.write_bytes(b"")
                    if suffix == ".pt":
                        os.utime(path, (old, old))
                        candidates += 1
                    n += 1
    every = {p for f in folders for p in (f, f.parent, f.parent.parent)} | {root}
    for folder in every:  # not "recently changed": a poll lists only what changed since
        os.utime(folder, (old, old))
    return {"files": n, "folders": len(every), "candidates": candidates}


def make_state(total_mb: float) -> dict:
    import torch

    per = max(1, int(total_mb * (1 << 20)) // 16 // 4)
    gen = torch.Generator().manual_seed(0)
    return {"model": {f"layer{i}.weight": torch.randn(per, generator=gen) for i in range(16)},
            "iter_num": 1000, "best_val_loss": 1.5, "config": {"lr": 6e-4}}


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    args = parse_args(__doc__)
    top, mid, leaf, files = pick(args.mode, (20, 10, 10, 50), (10, 5, 4, 50), (2, 2, 2, 10))
    polls = pick(args.mode, 20, 10, 2)
    repeats = pick(args.mode, 5, 3, 1)
    size_mb = pick(args.mode, 256, 32, 1)
    import torch

    from trainctl.launcher import script_checkpoints

    with project_dir() as root:
        root = Path(root)
        tree = root / "work"
        shape = build_tree(tree, top, mid, leaf, files)
        state_dir = root / ".trainctl" / "sessions" / "bench"
        state_dir.mkdir(parents=True)

        def watcher(**kw) -> script_checkpoints.Watcher:
            roots = script_checkpoints.watch_roots([], cwd=tree, checkpoint_dir=None)
            return script_checkpoints.Watcher(roots, manifest_path=state_dir / script_checkpoints.MANIFEST_NAME, cwd=tree,
                                 started_at=time.time(), **kw)

        def first_scan() -> float:
            w = watcher()
            t0 = time.perf_counter()
            w.poll()
            return time.perf_counter() - t0

        def walk() -> float:
            t0 = time.perf_counter()
            count = 0
            for _dirpath, _dirnames, filenames in os.walk(tree):
                count += len(filenames)
            assert count >= shape["files"]
            return time.perf_counter() - t0

        scan_t, walk_t = interleaved(repeats, first_scan, walk)
        steady = watcher()
        steady.poll()
        poll_t = []
        for _ in range(polls):
            t0 = time.perf_counter()
            steady.poll()
            poll_t.append(time.perf_counter() - t0)
        tracked = sum(len(t.listings) for t in steady._trees)

        # one new version of a large checkpoint
        out = root / "out"
        out.mkdir()
        state = make_state(size_mb)
        counter = iter(range(10**9))

        def script_save() -> float:
            path = out / f"manual-{next(counter)}.pt"
            t0 = time.perf_counter()
            torch.save(state, str(path))
            fsync(path)
            elapsed = time.perf_counter() - t0
            path.unlink()
            return elapsed

        def register(snapshot: bool) -> float:
            folder = root / f"run-{next(counter)}"
            (folder / "out").mkdir(parents=True)
            torch.save(state, str(folder / "out" / "ckpt.pt"))
            fsync(folder / "out" / "ckpt.pt")
            roots = script_checkpoints.watch_roots([], cwd=folder)
            w = script_checkpoints.Watcher(roots, manifest_path=state_dir / f"m-{next(counter)}.json", cwd=folder,
                              started_at=time.time() - 10,
                              snapshot_dir=root / "snapshots" / str(next(counter)) if snapshot else None)
            w.poll()  # first sight
            t0 = time.perf_counter()
            w.poll()  # unchanged: examined and registered
            elapsed = time.perf_counter() - t0
            assert len(w.entries) == 1 and (w.entries[0]["snapshot"] is not None) == snapshot
            shutil.rmtree(folder)
            shutil.rmtree(root / "snapshots", ignore_errors=True)
            return elapsed

        save_t, reg_t, snap_t = interleaved(repeats, script_save, lambda: register(False),
                                            lambda: register(True))
    s, w_, p = stats(scan_t), stats(walk_t), stats(poll_t)
    b, r, sn = stats(save_t), stats(reg_t), stats(snap_t)
    interval = script_checkpoints.POLL_INTERVAL_S
    n = f"{shape['files']:,}"
    rows = [
        row(f"B14 first scan of a {n}-file tree vs os.walk", s["median"], w_["median"], unit="s",
            goal="<= 1.5x", passed=s["median"] <= 1.5 * w_["median"], baseline_name="os.walk of the tree",
            trainctl_stats=s, baseline_stats=w_),
        row(f"B14 per poll, {n}-file tree unchanged, vs the poll interval", p["median"], interval,
            unit="s", goal="<= 0.05x (5% of one core)", passed=p["median"] <= 0.05 * interval,
            baseline_name=f"POLL_INTERVAL_S = {interval:g} s", trainctl_stats=p),
        row(f"B14 register a new {size_mb} MB checkpoint version vs torch.save+fsync", r["median"],
            b["median"], unit="s", goal="report", passed=None, baseline_name="torch.save + fsync",
            trainctl_stats=r, baseline_stats=b),
        row(f"B14 snapshot = true: register + copy a {size_mb} MB version vs torch.save+fsync",
            sn["median"], b["median"], unit="s", goal="report", passed=None,
            baseline_name="torch.save + fsync", trainctl_stats=sn, baseline_stats=b),
    ]
    emit("B14", "watching for script-written checkpoints: scan, poll, register, snapshot", args.mode,
         rows, params={**shape, "tracked_folders": tracked, "polls": polls, "repeats": repeats,
                       "checkpoint_mb": size_mb, "poll_interval_s": interval})


if __name__ == "__main__":
    main()
