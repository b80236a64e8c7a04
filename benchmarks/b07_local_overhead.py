"""B7: what `trainctl local noop.py` adds to `python noop.py`, whole process, start to exit.

noop.py does nothing. The launcher runs with `--no-preflight` (the goal's row) and, reported
beside it, with the pre-flight checks on. Output goes to a file for both, as a user
redirecting it would (no terminal: no progress bar).
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


def main() -> None:
    args = parse_args(__doc__)
    warm_bytecode()
    repeats = pick(args.mode, 15, 4, 1)
    with project_dir() as root:
        script = Path(root) / "noop.py"
        script.write_text("")
        out = Path(root) / "out.txt"
        env = clean_env()
        cli = trainctl_command()

        def timed(argv: list[str]) -> float:
            with open(out, "wb") as f:
                return time_process(argv, cwd=root, env=env, stdout=f)

        def python() -> float:
            return timed([sys.executable, "noop.py"])

        def local() -> float:
            return timed([*cli, "local", "--no-preflight", "noop.py"])

        def local_preflight() -> float:
            return timed([*cli, "local", "noop.py"])

        base, plain, checked = interleaved(repeats, python, local, local_preflight)
    b, t, c = stats(base), stats(plain), stats(checked)
    added = (t["median"] - b["median"]) * 1000
    added_checked = (c["median"] - b["median"]) * 1000
    rows = [
        row("B7 trainctl local --no-preflight noop.py: added", added, b["median"] * 1000, unit="ms",
            goal="adds <= 150 ms", passed=added <= 150, baseline_name="python noop.py (ms)",
            ratio_value=t["median"] / b["median"], trainctl_stats=t, baseline_stats=b),
        row("B7 trainctl local noop.py (pre-flight on): added", added_checked, b["median"] * 1000,
            unit="ms", goal="report", passed=None, baseline_name="python noop.py (ms)",
            ratio_value=c["median"] / b["median"], trainctl_stats=c, baseline_stats=b),
    ]
    emit("B7", "trainctl local overhead on a script that does nothing", args.mode, rows,
         params={"repeats": repeats, "command": " ".join(cli)},
         notes=["trainctl column: milliseconds added over python noop.py; ratio: whole-process times"])


if __name__ == "__main__":
    main()
