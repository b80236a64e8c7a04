"""`trainctl init`, `trainctl local` and `trainctl sessions`: parse, call, print."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from .. import env as env_mod

STATUS_CHOICES = ["pending", "running", "completed", "failed", "preempted", "killed", "crashed"]


def _config():
    from .. import config

    return config.load()


@click.command("init")
@click.option("--force", is_flag=True, help="Overwrite an existing trainctl.toml.")
def init_cmd(force: bool) -> None:
    """Write a commented trainctl.toml (every key at its default) in this folder."""
    from ..config import CONFIG_FILE, template
    from ..errors import UsageError

    path = Path.cwd() / CONFIG_FILE
    if path.exists() and not force:
        raise UsageError(f"{path} already exists.", "Keep it, or overwrite it with: trainctl init --force")
    from ..config import find_project_root

    outer_root, outer = find_project_root(Path.cwd().parent)
    path.write_text(template(), encoding="utf-8")
    click.echo(f"Wrote {path}.")
    if outer is not None:
        click.secho(f"note: {outer} also configures the folder above; runs started here now belong "
                    f"to this new project, not to {outer_root}.", fg="yellow", err=True)
    gitignore = Path.cwd() / ".gitignore"
    if not gitignore.exists() or ".trainctl" not in gitignore.read_text(errors="replace"):
        click.echo("Consider adding '.trainctl/' and 'checkpoints/' to .gitignore.")
    click.echo("Next: trainctl local train.py [ARGS]...")


LOCAL_EPILOG = "\b\nThe script gets these variables:\n" + env_mod.help_table() + """

\b
Exit codes: the script's own; 75 when it stopped on a preemption signal
after an emergency checkpoint; 130 when trainctl was interrupted; 2 when a
pre-flight check failed."""


@click.command("local", epilog=LOCAL_EPILOG,
               context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("script", type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--name", help="A name for this run (used by --resume auto and in listings).")
@click.option("--resume", "resume", metavar="auto|PATH",
              help="Resume from a checkpoint; 'auto' picks the newest valid one of this script.")
@click.option("--max-restarts", type=int, default=None,
              help="Restart after a preemption or crash, resuming from the newest valid checkpoint.")
@click.option("--restart-on", default=None, metavar="STATUSES",
              help="Which endings restart: preempted,failed (default from trainctl.toml).")
@click.option("--restart-delay", type=float, default=None, metavar="SECONDS",
              help="Seconds to wait before a restart.")
@click.option("--grace-period", type=float, default=None, metavar="SECONDS",
              help="Seconds between forwarding a stop signal and SIGKILL (default 30).")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1,
              help="Processes to start through torchrun (torch.distributed.run).")
@click.option("--gpus", type=click.IntRange(min=0), default=None, help="GPUs the script needs (checked before start).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or status lines.")
@click.option("--no-preflight", is_flag=True, help="Skip the pre-flight checks.")
def local_cmd(script: Path, args: tuple[str, ...], name: str | None, resume: str | None,
              max_restarts: int | None, restart_on: str | None, restart_delay: float | None,
              grace_period: float | None, nproc_per_node: int, gpus: int | None, quiet: bool,
              no_preflight: bool) -> None:
    """Run SCRIPT [ARGS]... here as a recorded session.

    The script runs as it would with `python SCRIPT ARGS`, with TRAIN_OPS_* variables telling it
    where its session, checkpoints and TensorBoard logs go.
    """
    from ..backends.base import RunSpec
    from ..errors import ScriptNotFoundError
    from ..launcher.supervisor import Supervisor, restart_policy, split_resume_arg

    if not script.exists():
        raise ScriptNotFoundError(f"script {script} does not exist.",
                                  "Check the path (relative to the current folder).", path=str(script))
    if script.is_dir():
        raise ScriptNotFoundError(f"{script} is a directory, not a script.",
                                  f"Name the file to run, e.g. trainctl local {script / 'train.py'}",
                                  path=str(script))
    cfg = _config()
    args_list = list(args)
    if resume is None:
        resume, args_list = split_resume_arg(args_list, cfg.resume_flag)
    restart = restart_policy(cfg, max_restarts=max_restarts, restart_on=restart_on,
                             restart_delay_s=restart_delay, grace_period_s=grace_period)
    resources: dict[str, Any] = {"nproc_per_node": nproc_per_node}
    if gpus is not None:
        resources["gpus"] = gpus
    spec = RunSpec(script=script, args=args_list, resources=resources, resume=resume,
                   restart=restart, name=name, quiet=quiet)
    code = Supervisor(spec, cfg, backend="local", preflight=not no_preflight).run()
    sys.exit(code)


@click.group("sessions")
def sessions() -> None:
    """List, show, compare and plot recorded sessions."""


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
    from .render import age, duration, metrics_line, table

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
        ended = r.get("ended_at") or (now if r["status"] == "running" else None)
        started = r.get("started_at") or r.get("created_at")
        label = r.get("name") or Path(r.get("script") or "?").name
        rows.append([r["id"], label, r["status"], age(r.get("created_at"), now),
                     duration(ended - started) if ended and started else "-",
                     str(len(r.get("attempts") or []) or 1),
                     str(summary.get("checkpoints", 0)), metrics_line(summary, limit=2)])
    click.echo(table(["ID", "NAME", "STATUS", "STARTED", "DURATION", "ATTEMPTS", "CKPTS", "METRICS"], rows))


@sessions.command("show")
@click.argument("session_ref", metavar="ID|latest")
@click.option("--json", "as_json", is_flag=True, help="The session record as JSON.")
def sessions_show(session_ref: str, as_json: bool) -> None:
    """One session: what ran, how it ended, metrics, checkpoints, diagnosis, how to resume."""
    from ..session import effective_status, summarize_metrics
    from .render import age, duration, metrics_line, number, resume_command

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
        ("duration", duration((ended or time.time()) - started) if started else "-"),
        ("attempts", str(len(data.get("attempts") or []) or 1)),
        ("backend", data.get("backend")),
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
        for c in checkpoints[-5:]:
            m = ", ".join(f"{k} {number(v)}" for k, v in (c.get("metrics") or {}).items())
            where = " ".join(f"{k} {c[k]}" for k in ("epoch", "step") if c.get(k) is not None)
            click.echo(f"  {c.get('path')}  {where}" + (f"  {m}" if m else ""))
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
    if data["status"] in ("failed", "preempted", "killed", "crashed") and not (diag and diag.get("command")):
        last = summary.get("last_checkpoint") or (checkpoints[-1].get("path") if checkpoints else None)
        label = "resume" if last else "run again"
        click.echo(f"{label:<15} {resume_command(str(data.get('script')), list(data.get('args') or []), last)}")


def _add_extra_commands() -> None:
    try:
        from . import compare as sessions_extra
    except ImportError:
        return
    for name in ("plot", "compare"):
        cmd = getattr(sessions_extra, name, None)
        if isinstance(cmd, click.Command):
            sessions.add_command(cmd, name)


_add_extra_commands()
