"""B13: what syncing to storage costs the training steps.

The same script (about 20 ms of CPU work a step, a 16 MB checkpoint every 250 steps) runs
under `trainctl local` and under `trainctl local --sync <store>`, interleaved; the figure is the
median step time with the sync loop mirroring the session (every checkpoint verified, hashed
and copied, events and output every 10 s, a heartbeat) against without. The store is a folder
on this disk: the work the sync loop itself does on the machine, without a server's CPU
competing for the same two cores (B11 measures uploads to moto's server).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, clean_env, emit, interleaved, parse_args, pick, row, stats

SCRIPT = """
import json, sys, time
import torch
import trainctl
steps, every = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Linear(2048, 2048)  # 16 MB of weights
x = torch.randn(64, 256)
w = torch.randn(256, 256)
run = trainctl.init()
run.track(model=model)
times = []
for step in range(1, steps + 1):
    t0 = time.perf_counter()
    y = x
    for _ in range(80):
        y = torch.tanh(y @ w)
    run.log({"loss": float(y.mean())}, step=step)
    times.append(time.perf_counter() - t0)
    if step % every == 0:
        run.save_checkpoint(step=step)
run.finish()
print("B13-STEPS " + json.dumps(times))
"""


def run_once(project: Path, steps: int, every: int, sync: Path | None, samples: list[float]) -> float:
    argv = [sys.executable, "-m", "trainctl", "local", "--no-preflight", "--quiet"]
    if sync is not None:
        argv += ["--sync", str(sync)]
    done = subprocess.run([*argv, "train.py", str(steps), str(every)], cwd=project, env=clean_env(),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("B13-STEPS "))
    times = json.loads(line[len("B13-STEPS "):])
    # the steps themselves, not the checkpoint saves (the same in both runs)
    median = statistics.median(times)
    samples.extend(times)
    return median


def main() -> None:
    args = parse_args(__doc__)
    steps = pick(args.mode, 1000, 500, 40)
    every = pick(args.mode, 250, 125, 20)
    repeats = pick(args.mode, 3, 2, 1)
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="trainctl-b13-") as tmp:
        project = Path(tmp) / "proj"
        project.mkdir()
        (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n[retention]\nkeep_last_n = 2\n')
        (project / "train.py").write_text(SCRIPT)
        plain_steps: list[float] = []
        synced_steps: list[float] = []
        plain, synced = interleaved(
            repeats,
            lambda: run_once(project, steps, every, None, plain_steps),
            lambda: run_once(project, steps, every, Path(tmp) / "bucket", synced_steps),
            warmup=0)
        uploaded = sum(1 for _ in (Path(tmp) / "bucket").rglob("checkpoints/*.pt"))
    p, s = stats(plain), stats(synced)
    overhead = s["median"] / p["median"] - 1 if p["median"] else 0.0
    rows = [
        row("B13 median step with --sync vs without", s["median"] * 1000, p["median"] * 1000, unit="ms",
            goal="<= 1.02x", passed=s["median"] <= 1.02 * p["median"], baseline_name="trainctl local (no sync)",
            trainctl_stats={k: v * 1000 if k != "n" else v for k, v in s.items()},
            baseline_stats={k: v * 1000 if k != "n" else v for k, v in p.items()}),
        row("B13 p99 step with --sync vs without", stats(synced_steps)["p99"] * 1000, stats(plain_steps)["p99"] * 1000,
            unit="ms", goal="report", passed=None, baseline_name="trainctl local (no sync)"),
    ]
    emit("B13", "Training steps while the session syncs to storage", args.mode, rows,
         params={"steps": steps, "checkpoint_every": every, "checkpoint_mb": 16, "repeats": repeats},
         extra={"overhead": overhead, "checkpoints_in_store": uploaded})


if __name__ == "__main__":
    main()
