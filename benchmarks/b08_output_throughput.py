"""B8: what each printed line costs under `trainctl local` (metric parsing on), per line.

A script prints N lines (200k; quick 20k), with its output straight to a file (`python lines.py
> file`) and under `trainctl local` (whose own stdout goes to a file too, as a user redirecting
it would; the launcher tees every line to output.log and feeds the metric parser). The goal's
row is the cost **per line**: each whole-process time minus the same command running a script
that prints nothing, measured in the same rounds, divided by N. So the launcher's fixed start
(B7) is left out at any N, and the quick figure means what the full one means; the
whole-process ratios are reported beside it. Every line is a metric line (`epoch E step S
loss=... acc=...`), the parser's worst case; a reported row prints plain text lines instead.
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

SCRIPT = """import sys
n = int(sys.argv[1])
metric = sys.argv[2] == "metric"
for i in range(n):
    if metric:
        print(f"epoch {i // 1000} step {i} loss={1.0 / (i + 1):.5f} acc={i / (i + 1.0):.4f}")
    else:
        print(f"processing shard {i} of {n}: reading records, nothing numeric to see here")
"""


def main() -> None:
    args = parse_args(__doc__)
    warm_bytecode()
    lines = pick(args.mode, 200_000, 20_000, 1000)
    repeats = pick(args.mode, 5, 4, 1)  # quick: enough rounds that the subtraction is not noise
    with project_dir() as root:
        (Path(root) / "lines.py").write_text(SCRIPT)
        out = Path(root) / "out.txt"
        env = clean_env()
        cli = trainctl_command()

        def timed(argv: list[str], expected: int) -> float:
            with open(out, "wb") as f:
                elapsed = time_process(argv, cwd=root, env=env, stdout=f)
            if out.read_bytes().count(b"\n") < expected:
                raise RuntimeError(f"{argv}: fewer than {expected} lines came out")
            return elapsed

        def python(kind: str, n: int = lines) -> float:
            return timed([sys.executable, "lines.py", str(n), kind], n)

        def local(kind: str, n: int = lines) -> float:
            return timed([*cli, "local", "--no-preflight", "lines.py", str(n), kind], n)

        base_m, ours_m, base_p, ours_p, base_0, ours_0 = interleaved(
            repeats, lambda: python("metric"), lambda: local("metric"),
            lambda: python("plain"), lambda: local("plain"),
            lambda: python("metric", 0), lambda: local("metric", 0),
            warmup=pick(args.mode, 1, 0, 0))
    bm, tm, bp, tp, b0, t0 = (stats(s) for s in (base_m, ours_m, base_p, ours_p, base_0, ours_0))
    # per line: whole-process medians minus the same command printing nothing, over N lines
    per_line_us = {key: max(0.0, (whole["median"] - empty["median"]) / lines * 1e6)
                   for key, whole, empty in (("ours_m", tm, t0), ("base_m", bm, b0),
                                             ("ours_p", tp, t0), ("base_p", bp, b0))}
    ratio_m = per_line_us["ours_m"] / per_line_us["base_m"] if per_line_us["base_m"] else float("inf")
    rows = [
        row(f"B8 {lines} metric lines: cost per line under trainctl local vs python > file",
            per_line_us["ours_m"], per_line_us["base_m"], unit="us", goal="<= 1.2x", passed=ratio_m <= 1.2,
            baseline_name="python lines.py > file, per line", ratio_value=ratio_m),
        row(f"B8 {lines} plain lines: cost per line under trainctl local vs python > file",
            per_line_us["ours_p"], per_line_us["base_p"], unit="us", goal="report", passed=None,
            baseline_name="python lines.py > file, per line"),
        row(f"B8 {lines} metric lines, whole process (fixed start included)", tm["median"], bm["median"],
            unit="s", goal="report", passed=None, baseline_name="python lines.py > file",
            trainctl_stats=tm, baseline_stats=bm),
        row("B8 the same commands printing nothing (subtracted above)", t0["median"], b0["median"],
            unit="s", goal="report", passed=None, baseline_name="python lines.py 0 > file",
            trainctl_stats=t0, baseline_stats=b0),
    ]
    emit("B8", "output throughput through the launcher, per line", args.mode, rows,
         params={"lines": lines, "repeats": repeats, "command": " ".join(cli)},
         extra={"per_line_us": per_line_us})


if __name__ == "__main__":
    main()
