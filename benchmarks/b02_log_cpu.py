"""B2: total CPU per logged record, background flush (and TensorBoard writing) included.

CPU is `time.process_time()` of the whole process (every thread) across a tight loop of log
calls plus the drain that writes everything out (trainctl: `run.flush()`; SummaryWriter:
`flush()`; raw JSON: the file's flush), divided by the number of records. Creating the logger
and closing it are outside the window; each variant runs once untimed first (imports, files).
"""

from __future__ import annotations

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


def cpu_per_record(make, steps: int) -> float:
    """CPU µs per record for `steps` log calls plus the drain, on a fresh logger."""
    logger = make()
    try:
        values = [step_values(s) for s in range(steps)]
        c0 = time.process_time()
        for step in range(steps):
            logger.log(values[step], step)
        logger.drain()
        cpu = time.process_time() - c0
    finally:
        logger.close()
    return cpu / steps * 1e6


def main() -> None:
    args = parse_args(__doc__)
    steps = pick(args.mode, 20000, 3000, 200)
    repeats = pick(args.mode, 5, 3, 1)
    with project_dir() as root:
        folder = Path(root)
        # flush_interval_s stays at the default: the drain writes whatever the thread has not
        makers = {
            "trainctl": lambda: TrainctlLogger(folder, tensorboard=False, flush_interval_s=1.0),
            "trainctl_tb": lambda: TrainctlLogger(folder, tensorboard=True, flush_interval_s=1.0),
            "raw_json": lambda: RawJsonLogger(folder),
            "summary_writer": lambda: SummaryWriterLogger(folder),
        }
        for key, cls in extra_loggers().items():
            makers[key] = lambda cls=cls: cls(folder)
        for make in makers.values():
            cpu_per_record(make, min(steps, 200))
        samples: dict[str, list[float]] = {k: [] for k in makers}
        for _ in range(repeats):
            for key, make in makers.items():
                samples[key].append(cpu_per_record(make, steps))
    s = {k: stats(v) for k, v in samples.items()}
    t, t_tb, raw, sw = (s[k]["median"] for k in ("trainctl", "trainctl_tb", "raw_json", "summary_writer"))
    rows = [
        row("B2 CPU/record, no TensorBoard, vs raw JSON", t, raw, unit="us", goal="<= 2x",
            passed=t <= 2 * raw, baseline_name="json.dumps + buffered write",
            trainctl_stats=s["trainctl"], baseline_stats=s["raw_json"]),
        row("B2 CPU/record, with TensorBoard, vs SummaryWriter", t_tb, sw, unit="us", goal="report",
            passed=None, baseline_name="SummaryWriter.add_scalar x3",
            trainctl_stats=s["trainctl_tb"], baseline_stats=s["summary_writer"]),
        row("B2 CPU/record, with TensorBoard, vs raw JSON", t_tb, raw, unit="us", goal="report",
            passed=None, baseline_name="json.dumps + buffered write",
            trainctl_stats=s["trainctl_tb"], baseline_stats=s["raw_json"]),
    ]
    for key in extra_loggers():
        rows.append(row(f"B2 CPU/record, with TensorBoard, vs {key}", t_tb, s[key]["median"], unit="us",
                        goal="report", passed=None, baseline_name=key, baseline_stats=s[key]))
    emit("B2", "run.log: total CPU per record incl. background flush", args.mode, rows,
         params={"steps": steps, "repeats": repeats},
         extra={"per_logger": s, "absent": [m for m in ("wandb", "mlflow") if m not in extra_loggers()]})


if __name__ == "__main__":
    main()
