"""B3: `run.save_checkpoint` of a 256 MB and a 1 GB state (atomic, durable, digested, manifest),
and the time an asynchronous save (blocking=False) holds the training thread.

Baseline: `torch.save` to the same folder plus `os.fsync` of the file (what a careful script
does by hand, minus atomicity and verification). The variants run in turn each repeat and every
file is deleted after it is timed, so the disk sees the same load for each.

Asynchronous saves are timed as a training loop meets them: a run that saves repeatedly (the
goal's row: its staging buffers were allocated by an earlier save), and, reported beside it,
the first asynchronous save of a fresh run (which allocates them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from _common import emit, interleaved, parse_args, pick, project_dir, row, stats


def make_state(total_mb: int) -> dict:
    """A model-like state: 16 float32 tensors summing to `total_mb`, plus plain values."""
    import torch

    per = max(1, total_mb * (1 << 20) // 16 // 4)
    gen = torch.Generator().manual_seed(0)
    model = {f"layer{i}.weight": torch.randn(per, generator=gen) for i in range(16)}
    return {"model": model, "epoch": 3, "step": 1200}


def measure(size_mb: int, repeats: int, folder: Path) -> tuple[list[dict], dict]:
    """The rows for one state size."""
    import torch

    import trainctl

    state = make_state(size_mb)
    counter = iter(range(10**9))

    def baseline() -> float:
        path = folder / f"manual-{next(counter)}.pt"
        t0 = time.perf_counter()
        torch.save(state, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - t0
        path.unlink()
        return elapsed

    def remove(path: Path) -> None:
        for p in (path, path.with_name(path.name + ".json")):
            p.unlink(missing_ok=True)

    def durable() -> float:
        # a fresh run per save (trainctl.init() hands back the current run until it finishes)
        run = trainctl.init(name="bench-ckpt", tensorboard=False)
        try:
            t0 = time.perf_counter()
            path = run.save_checkpoint(state, step=next(counter))
            elapsed = time.perf_counter() - t0
        finally:
            run.finish()
        remove(path)
        return elapsed

    steady: list[float] = []

    def asynchronous() -> float:
        """A run that saves twice, as a training loop does every N steps: the first save of the run
        allocates the staging buffers (returned), the next reuses them (kept in `steady`)."""
        run = trainctl.init(name="bench-ckpt-async", tensorboard=False)
        times = []
        try:
            for _ in range(2):
                t0 = time.perf_counter()
                path = run.save_checkpoint(state, step=next(counter), blocking=False)
                times.append(time.perf_counter() - t0)
                run._async_saver.wait()  # training steps would overlap the write; not timed
                remove(path)
        finally:
            run.finish()
        steady.append(times[1])
        return times[0]

    base, sync, first = interleaved(repeats, baseline, durable, asynchronous)
    steady = steady[-repeats:]  # the warm-up round's save is not counted
    b, s, a, f = stats(base), stats(sync), stats(steady), stats(first)
    label = f"{size_mb} MB" if size_mb < 1024 else f"{size_mb // 1024} GB"
    rows = [
        row(f"B3 save_checkpoint (durable) vs torch.save+fsync, {label}", s["median"], b["median"], unit="s",
            goal="<= 1.10x", passed=s["median"] <= 1.10 * b["median"],
            baseline_name="torch.save + fsync", trainctl_stats=s, baseline_stats=b),
        row(f"B3 save_checkpoint(blocking=False) blocking time, {label}", a["median"], b["median"], unit="s",
            goal="<= 0.3x", passed=a["median"] <= 0.3 * b["median"],
            baseline_name="torch.save + fsync", trainctl_stats=a, baseline_stats=b),
        row(f"B3 first save_checkpoint(blocking=False) of a run, {label}", f["median"], b["median"], unit="s",
            goal="report", passed=None, baseline_name="torch.save + fsync", trainctl_stats=f, baseline_stats=b),
    ]
    return rows, {"baseline": b, "sync": s, "async_blocking": a, "async_first_blocking": f}


def main() -> None:
    args = parse_args(__doc__)
    sizes_mb = pick(args.mode, [256, 1024], [64, 128], [2])
    repeats = pick(args.mode, 7, 5, 1)
    rows, extra = [], {}
    with project_dir() as root:
        folder = Path(root) / "checkpoints" / "manual"
        folder.mkdir(parents=True)
        for size_mb in sizes_mb:
            size_rows, size_extra = measure(size_mb, repeats, folder)
            rows += size_rows
            extra[f"{size_mb}MB"] = size_extra
    emit("B3", "save_checkpoint vs torch.save + fsync", args.mode, rows,
         params={"state_mb": sizes_mb, "repeats": repeats}, extra=extra)


if __name__ == "__main__":
    main()
