"""Human-readable output: run summaries, session tables, ages."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from ..formatting import format_duration, format_value


def age(timestamp: float | None, now: float | None = None) -> str:
    """'3m05s ago' for a unix time; '-' without one."""
    if not timestamp:
        return "-"
    return format_duration((now or time.time()) - timestamp) + " ago"


def metrics_line(summary: dict[str, Any], limit: int = 4) -> str:
    last = summary.get("last") or {}
    best = summary.get("best") or {}
    parts = []
    for name in sorted(last, key=lambda n: (0 if "loss" in n else 1, n))[:limit]:
        text = f"{name} {format_value(last[name])}"
        b = best.get(name)
        if b and b.get("value") != last[name]:
            where = f" @ step {b['step']}" if b.get("step") is not None else ""
            text += f" (best {format_value(b['value'])}{where})"
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


def run_summary(data: dict[str, Any], output_tail: list[str]) -> None:
    """The closing lines of a run (stderr, so the script's stdout stays clean), from its
    session record: how it ended, metrics, checkpoints, diagnosis, how to continue."""
    status = data.get("status", "?")
    summary = data.get("summary") or {}
    diagnosis = data.get("diagnosis")
    newest = summary.get("last_checkpoint")
    color = {"completed": "green", "failed": "red", "killed": "yellow", "preempted": "yellow",
             "stopped": "yellow"}.get(status)

    def out(text: str = "", **style: Any) -> None:
        try:
            click.secho(text, err=True, **style)
        except OSError:  # the terminal is gone (SIGHUP): the record is in session.json
            pass

    if status in ("failed", "crashed") and output_tail:
        out("")
        out(f"── last {min(20, len(output_tail))} lines of output " + "─" * 30, dim=True)
        for line in output_tail[-20:]:
            out(line[:400])
    attempts = summary.get("attempts", 1)
    how = f"exit code {data.get('exit_code')}" if data.get("signal") is None else f"signal {data['signal']}"
    out("")
    out(f"trainctl: session {data.get('id')} {status}" + ("" if status == "completed" else f" ({how})")
        + f" after {format_duration(summary.get('duration_s'))}"
        + (f", {attempts} attempts" if attempts and attempts > 1 else ""), fg=color, bold=True)
    out(f"  metrics      {metrics_line(summary)}")
    n = summary.get("checkpoints") or 0
    by_script = summary.get("script_checkpoints") or {}
    if by_script.get("written") and by_script["written"] >= n:
        out(f"  checkpoints  {by_script['text']}")
    elif by_script.get("written"):
        out(f"  checkpoints  {n} written, newest {newest}; {by_script['text']}")
    else:
        out(f"  checkpoints  {n} written" + (f", newest {newest}" if newest else ""))
    out(f"  output       {data.get('output_log')}")
    if diagnosis:
        out(f"  what         {diagnosis.get('what')}", fg="red")
        if diagnosis.get("cause"):
            out(f"  likely cause {diagnosis.get('cause')}")
        if diagnosis.get("fix"):
            out(f"  fix          {diagnosis.get('fix')}")
    if status != "completed":
        from ..redact import secrets_note

        label = "resume" if newest else "run again"
        command = continue_command(data, newest)
        out(f"  {label:<12} {command}")
        note = secrets_note(command)
        if note:
            out(f"  {'':<12} ({note})")
    out(f"  details      trainctl sessions show {data.get('id')}")
    try:
        sys.stderr.flush()
    except OSError:
        pass


def continue_command(data: dict[str, Any], checkpoint: str | None) -> str:
    """The command that continues a recorded session, with the script as the user typed it."""
    if data.get("backend") == "aws" and data.get("id"):
        return f"trainctl aws resume {data['id']}"  # on a new machine, from the checkpoint in storage
    from ..resume import resume_command

    command = data.get("command") or []
    script = command[2] if len(command) > 2 and command[0] == "trainctl" else str(data.get("script") or "SCRIPT")
    flag = (data.get("trainctl_config") or {}).get("resume_flag") or "--resume"
    job = data.get("multinode")
    if isinstance(job, dict) and job.get("nnodes"):
        from ..launcher.netcheck import ended_at_net_check

        return _multinode_continue(job, script, list(data.get("args") or []), checkpoint, flag,
                                   same_id=ended_at_net_check(data))
    return resume_command(script, list(data.get("args") or []), checkpoint, flag)


def _multinode_continue(job: dict[str, Any], script: str, args: list[str], checkpoint: str | None,
                        flag: str, *, same_id: bool = False) -> str:
    """A multi-node job continues as a new job on every node: under SLURM a new srun (a new job
    id), by hand a new rendezvous id (the old one names the ended session), or the same one
    (`same_id`) for a job that never started (its network check failed)."""
    import shlex

    from ..redact import redact_args
    from ..resume import strip_resume_args

    rest = redact_args(strip_resume_args(args, flag))
    resume = ["--resume", checkpoint] if checkpoint else []
    nproc = ["--nproc-per-node", str(job.get("nproc_per_node") or 1)]
    if job.get("source") == "slurm":
        return "srun " + shlex.join(["trainctl", "local", *nproc, *resume, script, *rest])
    return shlex.join(["trainctl", "local", "--nnodes", str(job["nnodes"]), "--rdzv-endpoint",
                       str(job.get("rdzv_endpoint")), "--rdzv-id",
                       str(job.get("rdzv_id")) if same_id else f"{job.get('rdzv_id')}-2", *nproc, *resume,
                       script, *rest]) + "  # on every node (--node-rank R on each)"
