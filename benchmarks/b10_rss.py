"""B10: resident memory added by `import trainctl; trainctl.init()` (no torch), vs a bare
interpreter.

Each measurement is a fresh `python -c` reading VmRSS from /proc/self/status: the bare one
right at start, the other after importing trainctl and calling init() in a throwaway project
(and checking that torch was not imported). A reported row adds 1,000 `run.log` calls and a
flush, which loads TensorBoard's protobufs for the TensorBoard event file.
"""

from __future__ import annotations

import json
import sys

from _common import clean_env, emit, parse_args, pick, project_dir, row, stats, warm_bytecode

READ_RSS = ("def rss():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmRSS:'):\n"
            "            return int(line.split()[1])\n")
BARE = READ_RSS + "import json, sys; print(json.dumps({'rss_kb': rss(), 'torch': 'torch' in sys.modules}))"
INIT = READ_RSS + ("import json, sys, trainctl\n"
                   "run = trainctl.init(name='rss')\n"
                   "print(json.dumps({'rss_kb': rss(), 'torch': 'torch' in sys.modules}))\n"
                   "run.finish()\n")
LOGGED = READ_RSS + ("import json, sys, trainctl\n"
                     "run = trainctl.init(name='rss')\n"
                     "for i in range(1000):\n"
                     "    run.log({'loss': 1.0 / (i + 1), 'acc': 0.5, 'lr': 0.001})\n"
                     "run.flush()\n"
                     "print(json.dumps({'rss_kb': rss(), 'torch': 'torch' in sys.modules}))\n"
                     "run.finish()\n")


def measure(code: str, cwd: str) -> dict:
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=clean_env(), check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    args = parse_args(__doc__)
    warm_bytecode()
    repeats = pick(args.mode, 7, 2, 1)
    bare, init, logged = [], [], []
    torch_loaded = False
    with project_dir() as root:
        for _ in range(repeats):
            for code, into in ((BARE, bare), (INIT, init), (LOGGED, logged)):
                result = measure(code, str(root))
                into.append(result["rss_kb"] / 1024)
                torch_loaded = torch_loaded or (result["torch"] and code is not LOGGED)
    b, i, lg = stats(bare), stats(init), stats(logged)
    added = i["median"] - b["median"]
    added_logged = lg["median"] - b["median"]
    rows = [
        row("B10 RSS added by import trainctl; trainctl.init()", added, b["median"], unit="MB",
            goal="<= 30 MB", passed=added <= 30 and not torch_loaded,
            baseline_name="bare interpreter RSS (MB)", ratio_value=i["median"] / b["median"],
            trainctl_stats=i, baseline_stats=b),
        row("B10 RSS added after 1,000 run.log + flush (TensorBoard on)", added_logged, b["median"],
            unit="MB", goal="report", passed=None, baseline_name="bare interpreter RSS (MB)",
            ratio_value=lg["median"] / b["median"], trainctl_stats=lg, baseline_stats=b),
    ]
    emit("B10", "memory of the runtime without torch", args.mode, rows,
         params={"repeats": repeats}, extra={"torch_imported_by_init": torch_loaded},
         notes=["trainctl column: MB added over the bare interpreter; ratio: whole RSS"])


if __name__ == "__main__":
    main()
