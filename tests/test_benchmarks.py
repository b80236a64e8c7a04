"""The benchmark harness works: every figure script runs at its --smoke size and prints a result
of the agreed shape, and benchmarks/run.py turns results into a table and a JSON file.

Correctness of the harness only: no timing is asserted anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env

BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import run as bench_run  # noqa: E402  (benchmarks/run.py)

ROW_KEYS = {"name", "trainctl", "baseline", "baseline_name", "unit", "ratio", "goal", "pass"}


def _run_script(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=clean_env(), cwd=REPO)


def _check_result(result: dict, figure: str) -> None:
    assert result["figure"] == figure
    assert result["mode"] == "smoke"
    assert isinstance(result["title"], str) and result["title"]
    assert isinstance(result["params"], dict)
    assert result["rows"], "a figure reports at least one row"
    gated = [r for r in result["rows"] if r["pass"] is not None]
    assert gated, "every figure has at least one row checked against the issue's goal"
    for r in result["rows"]:
        assert set(r) >= ROW_KEYS, r
        assert r["name"].startswith(figure + " ")
        assert isinstance(r["trainctl"], (int, float))
        assert r["baseline"] is None or isinstance(r["baseline"], (int, float))
        assert r["ratio"] is None or isinstance(r["ratio"], (int, float))
        assert r["pass"] in (True, False, None)
        assert r["goal"]
        for key in ("trainctl_stats", "baseline_stats"):
            if key in r:
                assert {"median", "min", "max"} <= set(r[key])
                assert r[key]["min"] <= r[key]["median"] <= r[key]["max"]


@pytest.mark.parametrize("figure", list(bench_run.FIGURES))
def test_figure_script_smoke(figure: str) -> None:
    proc = _run_script(bench_run.FIGURES[figure], "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    _check_result(result, figure)
    if figure == "B9":  # the one figure whose goal is correctness: every event is read back
        assert result["rows"][0]["unit"] == "bool" and result["rows"][0]["pass"] is True
        for runs in result["extra"]["runs"].values():
            assert all(r["complete"] and r["lines_valid"] for r in runs)


def test_runner_prints_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results" / "smoke.json"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--only", "b10,B6",
                           "--json", str(out)], capture_output=True, text=True, timeout=240,
                          env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = proc.stdout.splitlines()[0].split()
    assert header == ["figure", "what", "trainctl", "baseline", "ratio", "goal", "result"]
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke"
    assert [f["figure"] for f in report["figures"]] == ["B10", "B6"]
    assert {"nproc", "cpu", "python", "torch", "date"} <= set(report["machine"])
    assert report["table"] and all(r["result"] in ("pass", "FAIL", "report") for r in report["table"])
    assert len(report["table"]) == sum(len(f["rows"]) for f in report["figures"])
    for line in proc.stdout.splitlines()[1:]:
        if line.strip():
            assert line.split()[0] in ("B6", "B10")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--only", "B99"], "unknown figure B99"),
    (["--quick", "--smoke"], "not allowed with"),
])
def test_runner_rejects_bad_arguments(tmp_path: Path, args: list[str], fragment: str) -> None:
    out = tmp_path / "never.json"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=60, env=clean_env(), cwd=REPO)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_table_formatting_marks_failures_and_errors() -> None:
    results = [
        {"figure": "B1", "rows": [
            {"name": "B1 thing", "trainctl": 1.0, "baseline": 4.0, "baseline_name": "raw", "unit": "us",
             "ratio": 0.25, "goal": "<= 0.5x", "pass": True},
            {"name": "B1 other", "trainctl": 3.0, "baseline": 4.0, "baseline_name": "", "unit": "s",
             "ratio": 0.75, "goal": "<= 0.5x", "pass": False}]},
        {"figure": "B2", "error": "exit code 1: boom", "rows": []},
    ]
    rows = bench_run.table_rows(results)
    assert [r[-1] for r in rows] == ["pass", "FAIL", "exit code 1: boom"]
    assert rows[1][2] == "3000.0 ms"
    text = bench_run.format_table(rows, markdown=True)
    assert text.splitlines()[0].startswith("| figure | what |")
    assert len(text.splitlines()) == 2 + len(rows)
