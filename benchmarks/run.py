"""Run the benchmark figures B1-B14 and print one table: figure, trainctl, baseline, ratio, goal, result.

    python benchmarks/run.py [--quick] [--smoke] [--only B1,B3] [--json OUT]

Each figure runs as its own process (one script per figure, one JSON line out), one after
another so they don't compete for the CPUs. The table and the machine it ran on are also
written as JSON (default benchmarks/results/latest.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import clean_env, machine  # noqa: E402

FIGURES = {
    "B1": "b01_log_blocking.py",
    "B2": "b02_log_cpu.py",
    "B3": "b03_checkpoint_save.py",
    "B4": "b04_checkpoint_info.py",
    "B5": "b05_checkpoint_list.py",
    "B6": "b06_cli_startup.py",
    "B7": "b07_local_overhead.py",
    "B8": "b08_output_throughput.py",
    "B9": "b09_concurrent_events.py",
    "B10": "b10_rss.py",
    "B11": "b11_storage_upload.py",
    "B12": "b12_spot_notice.py",
    "B13": "b13_sync_overhead.py",
    "B14": "b14_checkpoint_watch.py",
}
DEFAULT_JSON = HERE / "results" / "latest.json"


def run_figure(figure: str, mode: str, timeout_s: float) -> dict[str, Any]:
    """One figure's result object, or one with an `error` when its script failed."""
    argv = [sys.executable, str(HERE / FIGURES[figure])]
    if mode != "full":
        argv.append(f"--{mode}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=clean_env())
    except subprocess.TimeoutExpired:
        return {"figure": figure, "error": f"timed out after {timeout_s:.0f} s", "rows": []}
    elapsed = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"figure": figure, "error": f"exit code {proc.returncode}: " + " | ".join(tail),
                "rows": [], "elapsed_s": elapsed}
    result = json.loads(lines[-1])
    result["elapsed_s"] = round(elapsed, 2)
    return result


def _number(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "bool":
        return "yes" if value else "no"
    if unit == "s":
        return f"{value * 1000:.1f} ms"
    if unit == "us":
        return f"{value:.2f} us"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "events/s":
        return f"{value:,.0f}/s"
    return f"{value:.3g}"


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for result in results:
        if result.get("error"):
            rows.append([result["figure"], "error", "-", "-", "-", "-", result["error"][:80]])
            continue
        for r in result["rows"]:
            verdict = "report" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
            baseline = _number(r["baseline"], r["unit"])
            if r.get("baseline_name"):
                baseline += f" ({r['baseline_name']})"
            rows.append([result["figure"], r["name"].split(" ", 1)[1] if r["name"].startswith("B") else r["name"],
                         _number(r["trainctl"], r["unit"]), baseline,
                         "-" if r["ratio"] is None else f"{r['ratio']:.3f}x", r["goal"], verdict])
    return rows


def format_table(rows: list[list[str]], *, markdown: bool = False) -> str:
    headers = ["figure", "what", "trainctl", "baseline", "ratio", "goal", "result"]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness only")
    parser.add_argument("--only", default="", help="comma-separated figures, e.g. B1,B3")
    parser.add_argument("--json", dest="json_out", type=Path, default=DEFAULT_JSON,
                        help=f"where to write the results (default {DEFAULT_JSON.relative_to(HERE.parent)})")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per figure")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    figures = [f.strip().upper() for f in args.only.split(",") if f.strip()] or list(FIGURES)
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {', '.join(unknown)}; valid: {', '.join(FIGURES)}")
    started = time.perf_counter()
    results = []
    for figure in figures:
        print(f"running {figure} ({FIGURES[figure]}, {mode})...", file=sys.stderr, flush=True)
        results.append(run_figure(figure, mode, args.timeout))
    rows = table_rows(results)
    print(format_table(rows, markdown=args.markdown))
    report = {"mode": mode, "machine": machine(), "elapsed_s": round(time.perf_counter() - started, 1),
              "table": [dict(zip(["figure", "what", "trainctl", "baseline", "ratio", "goal", "result"], r,
                                 strict=True)) for r in rows],
              "figures": results}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    print(f"\n{mode} run, {report['elapsed_s']} s on {m['nproc']} x {m['cpu']}, python {m['python']}, "
          f"torch {m['torch']}; results in {args.json_out}", file=sys.stderr)
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
