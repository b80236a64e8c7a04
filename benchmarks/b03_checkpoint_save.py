"""B3: `run.save_checkpoint` of a 256 MB state (atomic, durable, digested, manifest), and the
time an asynchronous save (blocking=False) holds the training thread.

Baseline: `torch.save` to the same folder plus `os.fsync` of the file (what a careful script
does by hand, minus atomicity and verification). The three variants run in turn each repeat
and every file is deleted after it is timed, so the disk sees the same load for each.
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


def main() -> None:
    args = parse_args(__doc__)
    size_mb = pick(args.mode, 256, 64, 2)
    repeats = pick(args.mode, 7, 5, 1)
    import torch

    import trainctl

    state = make_state(size_mb)
    with project_dir() as root:
        folder = Path(root) / "checkpoints" / "manual"
        folder.mkdir(parents=True)
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

        def trainctl_save(blocking: bool) -> float:
            # a fresh run per save: finish() waits for an async save, and the next run starts clean
            run = trainctl.init(name="bench-ckpt", tensorboard=False)
            try:
                t0 = time.perf_counter()
                path = run.save_checkpoint(state, step=next(counter), blocking=blocking)
                elapsed = time.perf_counter() - t0
            finally:
                run.finish()
            for p in (path, path.with_name(path.name + ".json")):
                p.unlink(missing_ok=True)
            return elapsed

        base, sync, async_ = interleaved(repeats, baseline, lambda: trainctl_save(True),
                                         lambda: trainctl_save(False))
    b, s, a = stats(base), stats(sync), stats(async_)
    rows = [
        row("B3 save_checkpoint (durable) vs torch.save+fsync", s["median"], b["median"], unit="s",
            goal="<= 1.10x", passed=s["median"] <= 1.10 * b["median"],
            baseline_name="torch.save + fsync", trainctl_stats=s, baseline_stats=b),
        row("B3 save_checkpoint(blocking=False) blocking time", a["median"], b["median"], unit="s",
            goal="<= 0.3x", passed=a["median"] <= 0.3 * b["median"],
            baseline_name="torch.save + fsync", trainctl_stats=a, baseline_stats=b),
    ]
    emit("B3", "save_checkpoint vs torch.save + fsync", args.mode, rows,
         params={"state_mb": size_mb, "repeats": repeats},
         extra={"baseline": b, "sync": s, "async_blocking": a})


if __name__ == "__main__":
    main()
