"""B1: how long `run.log({...3 scalars})` blocks the training thread, per call (median, p99).

Each call is timed alone with perf_counter_ns. Between calls a stand-in training step hashes
32 KB (hashlib releases the GIL, as torch kernels do), so the background flush thread of
trainctl and SummaryWriter's writer thread get to run while the loop goes on. trainctl flushes
every 0.1 s here (10x more often than the default 1 s) so that several flushes land inside the
timed window even at the quick size; TensorBoard writing is on, as by default.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from _common import (
    RawJsonLogger,
    SummaryWriterLogger,
    TrainctlLogger,
    emit,
    extra_loggers,
    parse_args,
    pick,
    project_dir,
    row,
    stats,
    step_values,
)

FLUSH_INTERVAL_S = 0.1
WORK = b"x" * 32768


def timed_calls(make, steps: int) -> list[float]:
    """Per-call blocked time (µs) of `steps` log calls on a fresh logger."""
    logger = make()
    samples = []
    clock = time.perf_counter_ns
    try:
        for step in range(steps):
            hashlib.sha256(WORK).digest()
            values = step_values(step)
            t0 = clock()
            logger.log(values, step)
            samples.append((clock() - t0) / 1000)
        logger.drain()
    finally:
        logger.close()
    return samples


def timer_floor_us(n: int = 10000) -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        samples.append(clock() - t0)
    return stats(samples)["median"] / 1000


def main() -> None:
    args = parse_args(__doc__)
    steps = pick(args.mode, 20000, 3000, 200)
    repeats = pick(args.mode, 5, 3, 1)
    with project_dir() as root:
        folder = Path(root)
        makers = {
            "trainctl": lambda: TrainctlLogger(folder, tensorboard=True, flush_interval_s=FLUSH_INTERVAL_S),
            "raw_json": lambda: RawJsonLogger(folder),
            "summary_writer": lambda: SummaryWriterLogger(folder),
        }
        for key, cls in extra_loggers().items():
            makers[key] = lambda cls=cls: cls(folder)
        for make in makers.values():  # warm-up: imports, first files
            timed_calls(make, min(steps, 200))
        per_repeat: dict[str, list[dict[str, float]]] = {k: [] for k in makers}
        for _ in range(repeats):
            for key, make in makers.items():
                per_repeat[key].append(stats(timed_calls(make, steps)))

    def summary(key: str) -> dict[str, float]:
        medians = [s["median"] for s in per_repeat[key]]
        p99s = [s["p99"] for s in per_repeat[key]]
        return {"median": stats(medians)["median"], "min": min(medians), "max": max(medians),
                "p99": stats(p99s)["median"], "p99_min": min(p99s), "p99_max": max(p99s),
                "calls": steps, "repeats": repeats}

    results = {k: summary(k) for k in makers}
    t, raw, sw = results["trainctl"], results["raw_json"], results["summary_writer"]
    rows = [
        row("B1 run.log blocked/call vs raw JSON (median)", t["median"], raw["median"], unit="us",
            goal="<= 0.5x", passed=t["median"] <= 0.5 * raw["median"],
            baseline_name="json.dumps + buffered write", trainctl_stats=t, baseline_stats=raw),
        row("B1 run.log blocked/call vs SummaryWriter (median)", t["median"], sw["median"], unit="us",
            goal="<= 0.1x", passed=t["median"] <= 0.1 * sw["median"],
            baseline_name="SummaryWriter.add_scalar x3", trainctl_stats=t, baseline_stats=sw),
        row("B1 run.log blocked/call vs raw JSON (p99)", t["p99"], raw["p99"], unit="us",
            goal="report", passed=None, baseline_name="json.dumps + buffered write"),
        row("B1 run.log blocked/call vs SummaryWriter (p99)", t["p99"], sw["p99"], unit="us",
            goal="report", passed=None, baseline_name="SummaryWriter.add_scalar x3"),
    ]
    for key in extra_loggers():
        other = results[key]
        rows.append(row(f"B1 run.log blocked/call vs {key} (median)", t["median"], other["median"],
                        unit="us", goal="report", passed=None, baseline_name=key, baseline_stats=other))
    emit("B1", "run.log: training-thread time per call (3 scalars)", args.mode, rows,
         params={"steps": steps, "repeats": repeats, "flush_interval_s": FLUSH_INTERVAL_S,
                 "step_work": "sha256 of 32 KB between calls"},
         extra={"per_logger": results, "timer_floor_us": timer_floor_us(),
                "absent": [m for m in ("wandb", "mlflow") if m not in extra_loggers()]},
         notes=["timer overhead (timer_floor_us) is included in every column, not subtracted"])


if __name__ == "__main__":
    main()
