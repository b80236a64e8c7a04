"""`trainctl sessions`: list, show, follow, stop and delete recorded sessions (plot and compare
live in compare.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..session import TERMINAL, State
from .groups import group

STATUS_CHOICES = [s.value for s in State]
SHOWN_CHECKPOINTS = 5  # `sessions show` lists the newest few; `checkpoint list --session` has them all


def _config():
    from .. import config

    return config.load()


@group("sessions")
def sessions() -> None:
    """List, show, follow, stop, delete, compare and plot recorded sessions."""


def _store():
    from ..session import SessionStore

    return SessionStore(_config().state_dir)


def _warn_problems(problems: list[str]) -> None:
    for p in problems:
        click.secho(f"warning: skipped {p}", err=True, fg="yellow")


@sessions.command("list")
@click.option("--status", type=click.Choice(STATUS_CHOICES), help="Only sessions with this status.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show at most N sessions.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
def sessions_list(status: str | None, limit: int | None, as_json: bool) -> None:
    """Every session of this project, newest first (reads session.json files only)."""
    from ..formatting import format_duration
    from .render import age, metrics_line, table

    records, problems = _store().list(status=status, limit=limit)
    _warn_problems(problems)
    if as_json:
        click.echo(json.dumps(records, indent=2, default=str))
        return
    if not records:
        click.echo("No sessions yet. Start one with: trainctl local SCRIPT" if not status
                   else f"No {status} sessions.")
        return
    now = time.time()
    rows = []
    for r in records:
        summary = r.get("summary") or {}
        ended = r.get("ended_at") or (now if r["status"] == State.RUNNING else None)
        started = r.get("started_at") or r.get("created_at")
        label = r.get("name") or Path(r.get("script") or "?").name
        rows.append([r["id"], label, r["status"], age(r.get("created_at"), now),
                     format_duration(ended - started) if ended and started else "-",
                     str(len(r.get("attempts") or []) or 1),
                     str(summary.get("checkpoints", 0)), metrics_line(summary, limit=2)])
    click.echo(table(["ID", "NAME", "STATUS", "STARTED", "DURATION", "ATTEMPTS", "CKPTS", "METRICS"], rows))


@sessions.command("show")
@click.argument("session_ref", metavar="ID|latest")
@click.option("--json", "as_json", is_flag=True, help="The session record as JSON.")
def sessions_show(session_ref: str, as_json: bool) -> None:
    """One session: what ran, how it ended, metrics, checkpoints, diagnosis, how to resume."""
    from ..formatting import format_duration, format_value
    from ..session import effective_status, summarize_metrics
    from .render import age, continue_command, metrics_line

    session = _store().get(session_ref)
    data = session.read()
    data["status"] = effective_status(data)
    checkpoints = list(session.iter_events(("checkpoint",)))
    if not data.get("summary"):
        data["summary"] = summarize_metrics(session.metrics())
    if as_json:
        data["checkpoint_events"] = checkpoints
        click.echo(json.dumps(data, indent=2, default=str))
        return
    summary = data.get("summary") or {}
    started = data.get("started_at") or data.get("created_at")
    ended = data.get("ended_at")
    rows = [
        ("session", data.get("id")),
        ("name", data.get("name")),
        ("status", data["status"] + (f" (exit code {data['exit_code']})" if data.get("exit_code") not in (None, 0) else "")
         + (f" (signal {data['signal']})" if data.get("signal") else "")),
        ("script", " ".join([str(data.get("script") or "?"), *map(str, data.get("args") or [])])),
        ("started", age(started)),
        ("duration", format_duration((ended or time.time()) - started) if started else "-"),
        ("attempts", str(len(data.get("attempts") or []) or 1)),
        ("backend", data.get("backend")),
        ("checkpoints at", session.checkpoint_location(data)),
        ("host", data.get("host")),
        ("git", (data.get("git") or {}).get("commit", "-") and
         f"{(data.get('git') or {}).get('commit', '')[:12]}{' (dirty)' if (data.get('git') or {}).get('dirty') else ''}"
         if data.get("git") else "-"),
        ("python / torch", f"{data.get('python')} / {data.get('torch') or '-'}"),
        ("parent", data.get("parent")),
        ("resumed from", data.get("resume_from")),
        ("metrics", metrics_line(summary, limit=6)),
        ("output", str(session.output_log)),
    ]
    for key, value in rows:
        if value not in (None, ""):
            click.echo(f"{key:<15} {value}")
    if data.get("config"):
        click.echo("config          " + ", ".join(f"{k}={v}" for k, v in data["config"].items()))
    if checkpoints:
        click.echo(f"checkpoints     {len(checkpoints)}")
        for c in checkpoints[-SHOWN_CHECKPOINTS:]:
            m = ", ".join(f"{k} {format_value(v)}" for k, v in (c.get("metrics") or {}).items())
            where = " ".join(f"{k} {c[k]}" for k in ("epoch", "step") if c.get(k) is not None)
            click.echo(f"  {c.get('path')}  {where}" + (f"  {m}" if m else ""))
        if len(checkpoints) > SHOWN_CHECKPOINTS:
            click.echo(f"  ... and {len(checkpoints) - SHOWN_CHECKPOINTS} more "
                       f"(all of them: trainctl checkpoint list --session {session.id})")
    attempts = data.get("attempts") or []
    for a in attempts if len(attempts) > 1 else []:
        why = f"signal {a['signal']}" if a.get("signal") else (
            f"exit code {a['exit_code']}" if a.get("exit_code") not in (None, 0) else "")
        click.echo(f"attempt {a.get('attempt')}: {a.get('status', 'running')}" + (f" ({why})" if why else "")
                   + (f", resumed from {a['resume_from']}" if a.get("resume_from") else ""))
    diag = data.get("diagnosis")
    if diag:
        click.secho(f"what happened   {diag.get('what')}", fg="red")
        for key in ("cause", "fix"):
            if diag.get(key):
                click.echo(f"{'likely cause' if key == 'cause' else 'fix':<15} {diag[key]}")
        if diag.get("command"):
            click.echo(f"{'run':<15} {diag['command']}")
            _secrets_note(diag["command"], 16)
    if data["status"] in (*TERMINAL - {State.COMPLETED}, State.CRASHED) and not (diag and diag.get("command")):
        last = summary.get("last_checkpoint") or (checkpoints[-1].get("path") if checkpoints else None)
        label = "resume" if last else "run again"
        command = continue_command(data, last)
        click.echo(f"{label:<15} {command}")
        _secrets_note(command, 16)


def _secrets_note(command: str, indent: int) -> None:
    from ..redact import secrets_note

    note = secrets_note(command)
    if note:
        click.echo(" " * indent + f"({note})")


@sessions.command("logs")
@click.argument("session_ref", metavar="ID|latest")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the session ends (Ctrl-C stops).")
@click.option("--tail", "-n", "tail", type=click.IntRange(min=0), default=None, metavar="N",
              help="Only the last N lines (default: all of it).")
def sessions_logs(session_ref: str, follow: bool, tail: int | None) -> None:
    """The session's output (every attempt), as its script printed it."""
    from ..launcher.control import follow_output, output_tail

    session = _store().get(session_ref)
    data, offset = output_tail(session, -1 if tail is None else tail)
    out = click.get_binary_stream("stdout")
    out.write(data)
    out.flush()
    if not follow:
        return
    try:
        for chunk in follow_output(session, offset):
            out.write(chunk.data)
            out.flush()
    except KeyboardInterrupt:
        return


@sessions.command("attach")
@click.argument("session_ref", metavar="ID|latest")
@click.option("--tail", "-n", "tail", type=click.IntRange(min=0), default=10, show_default=True, metavar="N",
              help="Lines of earlier output to show first.")
def sessions_attach(session_ref: str, tail: int) -> None:
    """Show a running session's output and progress until it ends. Ctrl-C detaches: the run
    goes on. Exits as `trainctl local` would have for the run."""
    from .watch import attach

    raise SystemExit(attach(_store().get(session_ref), tail_lines=tail))


@sessions.command("stop")
@click.argument("session_ref", metavar="ID|latest")
@click.option("--now", is_flag=True, help="Kill at once (SIGKILL), without the grace period for a checkpoint.")
@click.option("--grace-period", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Seconds between SIGTERM and SIGKILL (default: the session's own, 30).")
def sessions_stop(session_ref: str, now: bool, grace_period: float | None) -> None:
    """Stop a running session: SIGTERM to its script, which writes its emergency checkpoint;
    SIGKILL if it is still running after the grace period. The session ends `stopped`."""
    from ..launcher.control import stop
    from .render import continue_command

    session = _store().get(session_ref)
    if not now:
        click.echo(f"Stopping session {session.id}: SIGTERM, waiting for its emergency checkpoint...", err=True)
    result = stop(session, now=now, grace_period_s=grace_period)
    if not result.was_running:
        click.echo(f"Session {session.id} is not running ({result.status}); nothing to stop.")
        return
    data = result.data
    if result.status not in TERMINAL:
        click.echo(f"Session {session.id}: stop requested and its script ended; its launcher has not "
                   f"recorded the end yet. See: trainctl sessions show {session.id}")
        return
    last = (data.get("summary") or {}).get("last_checkpoint")
    click.echo(f"Session {session.id} {result.status}" + (f"; newest checkpoint {last}" if last else "; no checkpoint written") + ".")
    command = continue_command(data, last)
    click.echo(f"{'resume' if last else 'run again':<10} {command}")
    _secrets_note(command, 11)


@sessions.command("delete")
@click.argument("session_refs", nargs=-1, required=True, metavar="ID...")
@click.option("--checkpoints", is_flag=True, help="Also delete the sessions' checkpoints.")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Delete without asking.")
def sessions_delete(session_refs: tuple[str, ...], checkpoints: bool, dry_run: bool, yes: bool) -> None:
    """Delete finished sessions (their folder: record, events, output, TensorBoard logs) and,
    with --checkpoints, their checkpoints. A running session is refused."""
    import sys

    from ..config import format_size
    from ..errors import UsageError
    from ..launcher.control import delete, plan_delete

    cfg = _config()
    removals, gone = plan_delete(_store(), list(session_refs), checkpoints=checkpoints,
                                 checkpoint_root=cfg.checkpoint_dir)
    for ref in gone:
        click.echo(f"Session {ref}: already deleted, nothing to do.")
    refused = [r for r in removals if r.refused]
    if refused:
        raise UsageError(f"{refused[0].refused}; nothing deleted.",
                         f"Stop it first: trainctl sessions stop {refused[0].session_id}")
    if not removals:
        return
    freed = sum(r.bytes for r in removals)
    click.echo(f"{'Would delete' if dry_run else 'To delete:'} {len(removals)} session(s), freeing {format_size(freed)}:")
    for r in removals:
        click.echo(f"  session {r.session_id}")
        for path in r.paths:
            click.echo(f"    {path}")
        for path, why in r.kept:
            click.echo(f"    kept: {path} ({why})")
    if dry_run:
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete {len(removals)} session(s) without confirmation.",
                             "Pass --yes to delete, or --dry-run to preview.")
        if not click.confirm("Delete them?", default=False):
            click.echo("Nothing deleted.")
            return
    for r in removals:
        delete(r)
    click.echo(f"Deleted {len(removals)} session(s), freed {format_size(freed)}.")


def _add_extra_commands() -> None:
    from . import compare

    for name in ("plot", "compare"):
        sessions.add_command(getattr(compare, name), name)


_add_extra_commands()
