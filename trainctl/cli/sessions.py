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
@click.option("--pipeline", "pipeline_id", metavar="ID", default=None,
              help="Only the sessions of pipeline ID's steps (trainctl pipeline list).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
def sessions_list(status: str | None, limit: int | None, pipeline_id: str | None, as_json: bool) -> None:
    """Every session of this project, newest first (reads session.json files only)."""
    from ..formatting import format_duration
    from .render import age, metrics_line, table

    if pipeline_id is None:
        records, problems = _store().list(status=status, limit=limit)
    else:
        records, problems = _store().list(status=status)
        records = [r for r in records if isinstance(r.get("pipeline"), dict)
                   and r["pipeline"].get("id") == pipeline_id][:limit]
    _warn_problems(problems)
    if as_json:
        click.echo(json.dumps(records, indent=2, default=str))
        return
    if not records:
        if pipeline_id is not None:
            click.echo(f"No {status + ' ' if status else ''}sessions of pipeline {pipeline_id}. "
                       "See the pipelines with: trainctl pipeline list")
        else:
            click.echo("No sessions yet. Start one with: trainctl local SCRIPT" if not status
                       else f"No {status} sessions.")
        return
    now = time.time()
    costs: dict = {}
    if any(r.get("cloud") for r in records):  # cloud sessions: price x running time, from the record
        from ..backends.cloud import recorded_cost

        costs = {r["id"]: recorded_cost(r, now) for r in records}
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
    headers = ["ID", "NAME", "STATUS", "STARTED", "DURATION", "ATTEMPTS", "CKPTS", "METRICS"]
    if any(costs.values()):
        headers.insert(-1, "COST")
        for r, row in zip(records, rows, strict=True):
            cost = costs.get(r["id"])
            row.insert(-1, cost.short() if cost else "-")
    click.echo(table(headers, rows))


@sessions.command("show")
@click.argument("session_ref", metavar="ID|latest")
@click.option("--json", "as_json", is_flag=True, help="The session record as JSON.")
def sessions_show(session_ref: str, as_json: bool) -> None:
    """One session: what ran, how it ended, metrics, checkpoints, diagnosis, how to resume."""
    from ..formatting import format_duration, format_value
    from ..launcher.control import refresh
    from ..session import effective_status, summarize_metrics
    from .render import age, continue_command, metrics_line

    session = _store().get(session_ref)
    refresh(session)  # a cloud session: its output, events and end, from storage
    data = session.read()
    data["status"] = effective_status(data)
    checkpoints = list(session.iter_events(("checkpoint",)))
    if not data.get("summary"):
        data["summary"] = summarize_metrics(session.metrics())
    from ..launcher.script_checkpoints import read_manifest

    written = read_manifest(session.dir)
    if as_json:
        data["checkpoint_events"] = checkpoints
        data["script_checkpoints"] = written
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
        ("failed saves", f"{summary['failed_saves']} (last: {summary.get('last_save_error')})"
         if summary.get("failed_saves") else None),
        ("output", str(session.output_log) if not data.get("nodes") else None),
        *_cloud_rows(data),
    ]
    for key, value in rows:
        if value not in (None, ""):
            click.echo(f"{key:<15} {value}")
    if data.get("nodes"):
        _show_nodes(session, data)
    start = _startup_line(list(session.iter_events(("startup",))))
    if start:
        click.echo(f"{'start':<15} {start}")
    if data.get("config"):
        click.echo("config          " + ", ".join(f"{k}={v}" for k, v in data["config"].items()))
    if checkpoints:
        by_script = (summary.get("script_checkpoints") or {}).get("text") or (
            f"{sum(1 for c in checkpoints if c.get('source') == 'script')} written by the script")
        click.echo(f"checkpoints     {len(checkpoints)}"
                   + (f"; {by_script}" if any(c.get("source") == "script" for c in checkpoints) else ""))
        for c in checkpoints[-SHOWN_CHECKPOINTS:]:
            m = ", ".join(f"{k} {format_value(v)}" for k, v in (c.get("metrics") or {}).items())
            where = " ".join(f"{name} {format_value(c[k])}" for k, name in
                             (("epoch", "epoch"), ("step", c.get("step_name") or "step")) if c.get(k) is not None)
            origin = ""
            if c.get("source") == "script":
                origin = "  (by the script" + (f", version {c['version']}" if (c.get("version") or 1) > 1 else "") + ")"
            click.echo(f"  {c.get('display') or c.get('path')}  {where}" + (f"  {m}" if m else "") + origin)
        if len(checkpoints) > SHOWN_CHECKPOINTS:
            click.echo(f"  ... and {len(checkpoints) - SHOWN_CHECKPOINTS} more "
                       f"(all of them: trainctl checkpoint list --session {session.id})")
    for problem in (written or {}).get("problems") or []:
        click.echo(f"  incomplete: {problem.get('path')} ({problem.get('problem')}); never resumed from")
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


def _show_nodes(session, data: dict) -> None:
    """A multi-node session: each node that recorded here, where c10d put it, how it stands."""
    from .. import sysinfo
    from .render import age, table

    job = data.get("multinode") or {}
    nodes = data.get("nodes") or {}
    click.echo(f"{'nodes':<15} {len(nodes)} of {job.get('nnodes', '?')} recorded here"
               f" (rendezvous {job.get('rdzv_endpoint', '?')}, id {job.get('rdzv_id', '?')})")
    rows = []
    for key, node in sorted(nodes.items(), key=lambda kv: ((kv[1].get("ranks") or [1 << 30])[0], kv[0])):
        if not isinstance(node, dict):
            continue
        ranks = node.get("ranks") or []
        state = str(node.get("state") or "?")
        launcher = node.get("launcher") or {}
        if state not in {t.value for t in TERMINAL} and node.get("host") == sysinfo.host() and launcher.get("pid") \
                and not sysinfo.pid_alive(launcher["pid"], launcher.get("start_ticks")):
            state = "crashed"
        rows.append([str(node.get("host") or "?"), key,
                     (f"{ranks[0]}-{ranks[1]}" if ranks[0] != ranks[1] else str(ranks[0])) if len(ranks) == 2 else "-",
                     state + (" (head)" if node.get("head") else ""),
                     age(node.get("heartbeat_at")) if node.get("heartbeat_at") else "-",
                     str(session.dir / node["output"]) if node.get("output") else "-"])
    for line in table(["host", "node", "ranks", "state", "last heard", "output"], rows).splitlines():
        click.echo("  " + line)


def _secrets_note(command: str, indent: int) -> None:
    from ..redact import secrets_note

    note = secrets_note(command)
    if note:
        click.echo(" " * indent + f"({note})")


def _startup_line(events: list[dict]) -> str:
    """Time to first step on a cloud machine, phase by phase (the agent's `startup` events;
    the newest machine's when several booted)."""
    from ..formatting import format_duration

    boots = [i for i, e in enumerate(events) if e.get("phase") == "boot"]
    events = events[boots[-1]:] if boots else events
    def took(seconds: float) -> str:
        return f"{seconds:.1f}s" if seconds < 10 else format_duration(seconds)

    parts = [f"{e['phase'].replace('_', ' ')} {took(e['seconds'])}" for e in events
             if e.get("phase") != "first_step" and isinstance(e.get("seconds"), (int, float))]
    first = next((e for e in events if e.get("phase") == "first_step"), None)
    if first is not None and isinstance(first.get("since_start_s"), (int, float)):
        parts.append(f"first step {took(first['since_start_s'])} after the machine started")
    return ", ".join(parts)


def _cloud_rows(data: dict) -> list[tuple[str, str | None]]:
    """Where a cloud session runs and what it cost so far (from its record, no network)."""
    if not data.get("cloud"):
        return []
    from ..backends.cloud import recorded_cost

    cost = recorded_cost(data)
    if cost is None:
        return []
    cloud = data.get("cloud") or {}
    machines = [m for m in cloud.get("machines") or [] if isinstance(m, dict)]
    where = f"{cloud.get('provider', '?')} {cloud.get('region') or ''}".strip()
    return [("cloud", where + (f", until {cloud['deadline']}" if cloud.get("deadline") else "")),
            ("machines", ", ".join(f"{m.get('id')} ("
                                   + (f"node {m['node']}, " if m.get("node") is not None else "")
                                   + f"{m.get('type')} {m.get('market')}, {m.get('state') or '?'})"
                                   for m in machines) or "none yet"),
            ("storage", cloud.get("storage")),
            ("cost so far", cost.describe())]


@sessions.command("logs")
@click.argument("session_ref", metavar="ID|latest")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the session ends (Ctrl-C stops).")
@click.option("--tail", "-n", "tail", type=click.IntRange(min=0), default=None, metavar="N",
              help="Only the last N lines (default: all of it).")
def sessions_logs(session_ref: str, follow: bool, tail: int | None) -> None:
    """The session's output (every attempt), as its script printed it. A session in storage
    (its URI, or one pulled with `sessions pull`) is read from storage: with --follow, as its
    machine writes it."""
    from ..launcher.control import follow_output, output_tail

    remote = _remote_of(session_ref)
    if remote is not None:
        _remote_logs(remote, follow=follow, tail=tail)
        return
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


def _remote_of(session_ref: str):
    """The remote session `session_ref` names: a storage URI, or a session pulled from storage."""
    from ..storage.mirror import remote_of

    return remote_of(session_ref, _config())


def _remote_logs(remote, *, follow: bool, tail: int | None) -> None:
    from ..storage.mirror import follow_output

    out = click.get_binary_stream("stdout")
    if not follow:
        data = remote.output_reader().poll()
        out.write(b"".join(data.splitlines(keepends=True)[-tail:]) if tail is not None else data)
        out.flush()
        return
    first = True
    try:
        for data in follow_output(remote, say=lambda text: click.echo(f"[trainctl] {text}", err=True)):
            if first and tail is not None:
                data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
            first = False
            out.write(data)
            out.flush()
    except KeyboardInterrupt:
        return
    ended = remote.ended()
    click.echo(f"[trainctl] session ended: {ended.get('reason')}" if ended else "[trainctl] the machine released the session",
               err=True)


@sessions.command("pull")
@click.argument("ref", metavar="ID|URI")
@click.option("--checkpoints", is_flag=True, help="Also download the checkpoint files (their manifests always come).")
def sessions_pull(ref: str, checkpoints: bool) -> None:
    """Mirror a session from storage into this project, incrementally (only what changed):
    sessions show, monitor, plot, checkpoint list and tensorboard then work on it.

    ID is looked up under [cloud] storage for this project; a URI names the session itself
    (s3://bucket/prefix/project/ID, or a folder)."""
    from ..errors import NotFoundError
    from ..storage.mirror import pull_session, remote_session

    cfg = _config()
    if _pull_cloud_session(ref, checkpoints):
        return
    from ..launcher.cloud_session import launched_here, pull_launched

    launched = launched_here(_store(), ref)
    if launched is not None:  # started from here on a cloud machine: its backend keeps it current
        for line in pull_launched(launched, remote_session(launched.read()["storage"], cfg),
                                  checkpoint_dir=cfg.checkpoint_dir if checkpoints else None):
            click.echo(line)
        return
    remote = remote_session(ref, cfg)
    if not remote.store.list(remote.key("")):
        raise NotFoundError(f"No session at {remote.uri}.",
                            "Check the id or URI (and [cloud] storage / endpoint_url in trainctl.toml).")
    pulled = pull_session(remote, cfg.state_dir, checkpoints=checkpoints)
    left = [n for n in pulled.result.skipped if n.startswith("checkpoints/")]
    click.echo(f"Pulled {remote.uri} into session {pulled.session_id}: {len(pulled.result.downloaded)} object(s) "
               f"fetched, {pulled.result.unchanged} unchanged"
               + (f"; {len(left)} checkpoint file(s) left in storage (--checkpoints fetches them)" if left else "")
               + ".")
    click.echo(f"  show     trainctl sessions show {pulled.session_id}")
    click.echo(f"  follow   trainctl sessions logs {pulled.session_id} --follow")


def _pull_cloud_session(ref: str, checkpoints: bool) -> bool:
    """A session launched from here on a cloud (trainctl aws launch): its folder brought up to
    date through its backend, its checkpoints fetched when asked. False for any other ref."""
    from ..backends.base import Handle, get_backend
    from ..errors import NotFoundError

    if "/" in ref:
        return False
    try:
        session = _store().get(ref)
        data = session.read()
        handle = Handle.from_json(data.get("handle"))
    except (NotFoundError, ValueError):
        return False
    if handle.backend == "local" or data.get("pulled_at"):
        return False
    backend = get_backend(handle.backend)
    if not hasattr(backend, "pull_checkpoints"):
        return False  # a backend without its own pull: the storage mirror below brings it up to date
    state = backend.describe(handle).state
    line = f"Session {session.id} ({handle.backend}) is up to date here: {state}"
    if checkpoints:
        folder = session.dir / "checkpoints"
        fetched = backend.pull_checkpoints(handle, folder)  # type: ignore[attr-defined]
        line += f"; {len(fetched)} checkpoint(s) fetched into {folder}"
    click.echo(line + ".")
    click.echo(f"  show     trainctl sessions show {session.id}")
    return True


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
