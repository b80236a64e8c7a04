"""B8: a script printing 200k lines under `trainctl local` (metric parsing on), whole process.

Baseline: the same script with its output straight to a file (`python lines.py > file`).
Under trainctl the launcher's own stdout goes to a file too (not a terminal), as a user
redirecting it would; the launcher tees every line to output.log and feeds the metric parser.
Every line is a metric line (`epoch E step S loss=... acc=...`), the parser's worst case; a
reported row prints plain text lines instead. `--no-preflight` keeps B7's fixed cost apart.
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
    repeats = pick(args.mode, 5, 2, 1)
    with project_dir() as root:
        (Path(root) / "lines.py").write_text(SCRIPT)
        out = Path(root) / "out.txt"
        env = clean_env()
        cli = trainctl_command()

        def timed(argv: list[str]) -> float:
            with open(out, "wb") as f:
                elapsed = time_process(argv, cwd=root, env=env, stdout=f)
            if out.read_bytes().count(b"\n") < lines:
                raise RuntimeError(f"{argv}: fewer than {lines} lines came out")
            return elapsed

        def python(kind: str) -> float:
            return timed([sys.executable, "lines.py", str(lines), kind])

        def local(kind: str) -> float:
            return timed([*cli, "local", "--no-preflight", "lines.py", str(lines), kind])

        base_m, ours_m, base_p, ours_p = interleaved(
            repeats, lambda: python("metric"), lambda: local("metric"),
            lambda: python("plain"), lambda: local("plain"),
            warmup=pick(args.mode, 1, 0, 0))
    bm, tm, bp, tp = stats(base_m), stats(ours_m), stats(base_p), stats(ours_p)
    rows = [
        row(f"B8 {lines} metric lines under trainctl local vs python > file", tm["median"], bm["median"],
            unit="s", goal="<= 1.2x", passed=tm["median"] <= 1.2 * bm["median"],
            baseline_name="python lines.py > file", trainctl_stats=tm, baseline_stats=bm),
        row(f"B8 {lines} plain lines under trainctl local vs python > file", tp["median"], bp["median"],
            unit="s", goal="report", passed=None, baseline_name="python lines.py > file",
            trainctl_stats=tp, baseline_stats=bp),
    ]
    emit("B8", "output throughput through the launcher", args.mode, rows,
         params={"lines": lines, "repeats": repeats, "command": " ".join(cli)})


if __name__ == "__main__":
    main()
