"""Human-readable output: run summaries, session tables, durations and ages."""

from __future__ import annotations

import shlex
import sys
import time
from typing import Any

import click


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{m:02d}m"
    return f"{hours // 24}d{hours % 24}h"


def age(timestamp: float | None, now: float | None = None) -> str:
    if not timestamp:
        return "-"
    return duration((now or time.time()) - timestamp) + " ago"


def number(value: Any) -> str:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def metrics_line(summary: dict[str, Any], limit: int = 4) -> str:
    last = summary.get("last") or {}
    best = summary.get("best") or {}
    parts = []
    for name in sorted(last, key=lambda n: (0 if "loss" in n else 1, n))[:limit]:
        text = f"{name} {number(last[name])}"
        b = best.get(name)
        if b and b.get("value") != last[name]:
            where = f" @ step {b['step']}" if b.get("step") is not None else ""
            text += f" (best {number(b['value'])}{where})"
        parts.append(text)
    return ", ".join(parts) if parts else "none recorded"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def resume_command(script: str, args: list[str], checkpoint: str | None) -> str:
    """How to continue: from the newest checkpoint, or (none written) simply run it again."""
    if checkpoint:
        return shlex.join(["trainctl", "checkpoint", "resume", checkpoint, script, *args])
    return shlex.join(["trainctl", "local", script, *args])


def print_run_summary(session: Any, outcome: Any, summary: dict[str, Any],
                      diagnosis: dict[str, Any] | None, *, spec: Any, newest: str | None) -> None:
    """The launcher's closing lines (stderr, so the script's stdout stays clean)."""
    status = outcome.status
    color = {"completed": "green", "failed": "red", "killed": "yellow", "preempted": "yellow"}.get(status)

    def out(text: str = "", **style: Any) -> None:
        click.secho(text, err=True, **style)

    if status == "failed" and outcome.output_tail:
        out("")
        out(f"── last {min(20, len(outcome.output_tail))} lines of output " + "─" * 30, dim=True)
        for line in outcome.output_tail[-20:]:
            out(line[:400])
    attempts = summary.get("attempts", 1)
    how = f"exit code {outcome.exit_code}" if outcome.signal is None else f"signal {outcome.signal}"
    out("")
    out(f"trainctl: session {session.id} {status}" + ("" if status == "completed" else f" ({how})")
        + f" after {duration(summary.get('duration_s'))}"
        + (f", {attempts} attempts" if attempts and attempts > 1 else ""), fg=color, bold=True)
    out(f"  metrics      {metrics_line(summary)}")
    n = summary.get("checkpoints") or 0
    out(f"  checkpoints  {n} written" + (f", newest {newest}" if newest else ""))
    out(f"  output       {session.output_log}")
    if diagnosis:
        out(f"  what         {diagnosis.get('what')}", fg="red")
        if diagnosis.get("cause"):
            out(f"  likely cause {diagnosis.get('cause')}")
        if diagnosis.get("fix"):
            out(f"  fix          {diagnosis.get('fix')}")
    if status != "completed":
        label = "resume" if newest else "run again"
        out(f"  {label:<12} {resume_command(str(spec.script), spec.args, newest)}")
    out(f"  details      trainctl sessions show {session.id}")
    sys.stderr.flush()
