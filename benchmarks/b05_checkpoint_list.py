"""B5: `trainctl checkpoint list` over 50 checkpoints of 20 MB, as a whole process.

The checkpoints are written by trainctl (each with its manifest), as a run leaves them; a
reported row lists 50 plain `torch.save` files (no manifest: each file's pickle is walked).
Baseline: one process that imports torch and does `torch.load(mmap=True, weights_only=True)`
on each of the 50 files, the cheapest way to read their epoch/step with torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import (
    clean_env,
    emit,
    interleaved,
    parse_args,
    pick,
    project_dir,
    row,
    stats,
    time_process,
    trainctl_command,
    warm_bytecode,
)

LOAD_ALL = ("import sys, torch\n"
            "for p in sys.argv[1:]:\n"
            "    sd = torch.load(p, mmap=True, weights_only=True)\n"
            "    print(p, sd.get('trainctl', sd).get('epoch'))\n")


def make_state(total_mb: float, index: int) -> dict:
    """32 parameters and Adam's two moments for each (96 tensors), plus epoch/step."""
    import torch

    per = max(1, int(total_mb * (1 << 20)) // 96 // 4)
    model = {f"layer{i}.weight": torch.full((per,), float(index)) for i in range(32)}
    optim = {"state": {i: {"exp_avg": torch.zeros(per), "exp_avg_sq": torch.zeros(per)}
                       for i in range(32)},
             "param_groups": [{"lr": 0.001, "params": list(range(32))}]}
    return {"model": model, "optimizer": optim, "epoch": index, "step": index * 100}


def main() -> None:
    args = parse_args(__doc__)
    warm_bytecode()
    count = pick(args.mode, 50, 25, 3)
    size_mb = pick(args.mode, 20, 1, 0.1)
    repeats = pick(args.mode, 7, 2, 1)
    import torch

    from trainctl import checkpoint

    with project_dir() as root:
        ours_dir = Path(root) / "checkpoints" / "run1"
        plain_dir = Path(root) / "plain"
        plain_dir.mkdir()
        ours, plain = [], []
        for i in range(count):
            state = make_state(size_mb, i)
            path = ours_dir / f"ckpt-step{i * 100:08d}.pt"
            checkpoint.save(path, state, {"epoch": i, "step": i * 100,
                                          "metrics": {"val_loss": 1.0 / (i + 1)}})
            ours.append(str(path))
            path = plain_dir / f"epoch{i:03d}.pt"
            torch.save(state, str(path))
            plain.append(str(path))
        env = clean_env()
        cli = trainctl_command()
        def list_ours():
            return time_process([*cli, "checkpoint", "list"], cwd=root, env=env)
        def list_plain():
            return time_process([*cli, "checkpoint", "list", "plain"], cwd=root, env=env)
        def load():
            return time_process([sys.executable, "-c", LOAD_ALL, *ours], cwd=root, env=env)
        t_ours, t_plain, base = interleaved(repeats, list_ours, list_plain, load,
                                                warmup=pick(args.mode, 1, 0, 0))
    o, p, b = stats(t_ours), stats(t_plain), stats(base)
    rows = [
        row(f"B5 checkpoint list ({count} trainctl files) vs {count} x torch.load mmap",
            o["median"], b["median"], unit="s", goal="<= 0.1x (>= 10x faster)",
            passed=o["median"] <= 0.1 * b["median"],
            baseline_name=f"{count} x torch.load(mmap=True), one process",
            trainctl_stats=o, baseline_stats=b),
        row(f"B5 checkpoint list ({count} plain torch files)", p["median"], b["median"], unit="s",
            goal="report", passed=None, baseline_name=f"{count} x torch.load(mmap=True), one process",
            trainctl_stats=p, baseline_stats=b),
    ]
    emit("B5", "checkpoint list over many checkpoints, whole process", args.mode, rows,
         params={"checkpoints": count, "checkpoint_mb": size_mb, "repeats": repeats})


if __name__ == "__main__":
    main()
