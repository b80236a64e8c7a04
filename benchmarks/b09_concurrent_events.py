"""B9: 8 processes x 5,000 events appended to one session log, against one process writing
40,000, both through `trainctl.session.Session.append_events`.

Batch size 50: the runtime appends whatever `run.log` buffered since its last flush, once a
second by default, so a loop logging 50 steps a second hands append_events 50 events at a
time (faster loops make bigger batches and fewer lock round trips; 50 is on the small side).
A reported row uses batches of 1, the rate of `Session.event` (status, checkpoint, warning).
Throughput counts events from the first writer's start to the last writer's end, as each
writer timed its own loop (process start-up is excluded for both). The log is then read back:
every event present exactly once, every line valid JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import clean_env, emit, parse_args, pick, row, stats

WRITERS = 8


def worker(session_dir: str, writer: int, count: int, batch: int, go_file: str) -> None:
    """Say ready, append `count` events in batches once `go_file` exists; print (start, end)."""
    from trainctl.session import Session

    session = Session(Path(session_dir))
    go = Path(go_file)
    go.with_name(f"ready-{writer}").touch()
    while not go.exists():
        time.sleep(0.001)
    start = time.time()
    for first in range(0, count, batch):
        session.append_events([
            {"kind": "metric", "step": i, "epoch": None,
             "values": {"loss": 1.0 / (i + 1), "acc": 0.5, "lr": 0.001},
             "attempt": 0, "source": "run", "writer": writer}
            for i in range(first, min(first + batch, count))])
    print(json.dumps({"start": start, "end": time.time()}), flush=True)


def run_writers(writers: int, per_writer: int, batch: int) -> dict:
    """Start the writers, let them go at once, check the log; events/s and completeness."""
    from trainctl.session import SessionStore, read_events

    with tempfile.TemporaryDirectory(prefix="trainctl-b09-") as tmp:
        session = SessionStore(Path(tmp) / "state").create(status="running")
        go = Path(tmp) / "go"
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(session.dir), str(w),
                                   str(per_writer), str(batch), str(go)],
                                  stdout=subprocess.PIPE, env=clean_env())
                 for w in range(writers)]
        deadline = time.time() + 120
        while sum(1 for _ in Path(tmp).glob("ready-*")) < writers and time.time() < deadline:
            time.sleep(0.005)
        go.touch()
        spans = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"writer exited {p.returncode}")
            spans.append(json.loads(out.decode().strip().splitlines()[-1]))
        events, _ = read_events(session.events_path)
        lines = session.events_path.read_bytes().count(b"\n")
    metric = [(e.get("writer"), e.get("step")) for e in events if e.get("kind") == "metric"]
    expected = {(w, i) for w in range(writers) for i in range(per_writer)}
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    return {"events": writers * per_writer, "wall_s": wall,
            "events_per_s": writers * per_writer / wall if wall > 0 else float("inf"),
            "complete": set(metric) == expected and len(metric) == len(expected),
            "lines_valid": lines == len(events)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        session_dir, writer, count, batch, go = sys.argv[2:7]
        worker(session_dir, int(writer), int(count), int(batch), go)
        return
    args = parse_args(__doc__)
    per_writer = pick(args.mode, 5000, 1000, 100)
    repeats = pick(args.mode, 3, 1, 1)
    results: dict[str, list[dict]] = {"multi": [], "single": [], "multi_b1": [], "single_b1": []}
    per_writer_b1 = max(1, per_writer // 10)  # batches of 1 take a lock per event: fewer of them
    for _ in range(repeats):
        results["single"].append(run_writers(1, WRITERS * per_writer, 50))
        results["multi"].append(run_writers(WRITERS, per_writer, 50))
        results["single_b1"].append(run_writers(1, WRITERS * per_writer_b1, 1))
        results["multi_b1"].append(run_writers(WRITERS, per_writer_b1, 1))
    rate = {k: stats([r["events_per_s"] for r in v]) for k, v in results.items()}
    complete = all(r["complete"] and r["lines_valid"] for v in results.values() for r in v)
    m, s = rate["multi"]["median"], rate["single"]["median"]
    rows = [
        row(f"B9 {WRITERS} writers x {per_writer} events (batch 50): every event present", float(complete),
            None, unit="bool", goal="all present", passed=complete),
        row(f"B9 {WRITERS} writers aggregate vs 1 writer (batch 50)", m, s, unit="events/s",
            goal=">= 0.5x", passed=m >= 0.5 * s, baseline_name=f"1 process x {WRITERS * per_writer} events",
            trainctl_stats=rate["multi"], baseline_stats=rate["single"]),
        row(f"B9 {WRITERS} writers aggregate vs 1 writer (batch 1)", rate["multi_b1"]["median"],
            rate["single_b1"]["median"], unit="events/s", goal="report", passed=None,
            baseline_name=f"1 process x {WRITERS * per_writer_b1} events",
            trainctl_stats=rate["multi_b1"], baseline_stats=rate["single_b1"]),
    ]
    emit("B9", "concurrent writers into one session log", args.mode, rows,
         params={"writers": WRITERS, "events_per_writer": per_writer, "batch": 50,
                 "events_per_writer_batch1": per_writer_b1, "repeats": repeats},
         extra={"runs": results})


if __name__ == "__main__":
    main()
