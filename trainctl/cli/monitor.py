"""`trainctl monitor`: where a run stands, once or refreshed in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


@click.command("monitor")
@click.argument("session_ref", metavar="[SESSION|latest]", required=False)
@click.option("--log", "log_file", metavar="FILE",
              help="Watch a bare log file (any script's output, from anywhere) instead of a session.")
@click.option("--checkpoint", "checkpoint_dir", metavar="DIR",
              help="Folder of checkpoints to show: step, metrics, age; warns when the newest is torn or overdue (default: the session's checkpoint location).")
@click.option("--follow/--once", default=False,
              help="Refresh in place until the session ends (Ctrl-C stops), or print once (default).")
@click.option("--json", "as_json", is_flag=True,
              help="JSON for scripts: one object (with --follow, one line per refresh).")
@click.option("--interval", type=float, default=2.0, show_default=True, metavar="S",
              help="Seconds between refreshes with --follow.")
@click.option("--parsed", is_flag=True,
              help="Print every line the metric parser matches in the log, as JSON lines, to test patterns.")
@click.option("--pattern", "patterns", multiple=True, metavar="REGEX",
              help="Extra metric regex with named groups, added to [metrics] patterns (repeatable).")
def monitor(session_ref: str | None, log_file: str | None, checkpoint_dir: str | None,
            follow: bool, as_json: bool, interval: float, parsed: bool,
            patterns: tuple[str, ...]) -> None:
    """Show progress, rate, ETA, metric trends, checkpoints and warnings of a run.

    SESSION is an id, a unique prefix, a name, or 'latest' (the default). With --log FILE it
    reads a log file instead, e.g. `trainctl monitor --log train.log`. Warnings: NaN/Inf
    metrics, divergence, plateau, stall, checkpoint overdue, disk nearly full, crashed.
    """
    import contextlib
    import functools
    import tempfile
    from pathlib import Path

    from .. import config as config_mod
    from ..errors import NotFoundError, UsageError
    from ..launcher.control import refresh
    from ..launcher.monitor import Monitor, Settings, open_log
    from ..session import SessionStore
    from ..storage.errors import StorageError
    from ..storage.mirror import RemoteView, looks_like_uri, remote_of

    if interval <= 0:
        raise UsageError(f"--interval must be positive, not {interval}.", "Use e.g. --interval 2")
    if log_file and session_ref:
        raise UsageError("give a SESSION or --log FILE, not both.",
                         "A session's own output is read by: trainctl monitor SESSION")
    cfg = config_mod.load()
    settings = Settings.from_config(cfg)
    settings.patterns += list(patterns)
    ckpt = Path(checkpoint_dir).resolve() if checkpoint_dir else None
    if ckpt is not None and ckpt.exists() and not ckpt.is_dir():
        raise UsageError(f"--checkpoint {checkpoint_dir!r} is a file, not a folder.",
                         "Pass the folder the checkpoints are written to.")

    view = None  # a session in storage, read there (segments and heartbeat) into a temporary folder
    update: Callable[[], None] = _nothing_to_update
    with contextlib.ExitStack() as cleanup:
        if log_file:
            mon = Monitor(log=open_log(log_file), checkpoint_dir=ckpt, settings=settings, follow=follow)
        else:
            ref = session_ref or "latest"
            remote = remote_of(ref, cfg)
            if remote is not None:
                try:
                    if remote.store.list(remote.key("")):
                        folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="trainctl-monitor-"))
                        view = RemoteView(remote, folder)
                        view.update()  # its record, for the parts of Monitor that read it first
                    problem = "nothing there"
                except StorageError as e:
                    if looks_like_uri(ref):
                        raise
                    view, problem = None, str(e)
                if view is None and looks_like_uri(ref):
                    raise NotFoundError(f"No session at {remote.uri}.",
                                        "Check the URI (and [cloud] endpoint_url in trainctl.toml).")
                if view is None:  # a pulled session: its copy here still says where it stood
                    click.secho(f"warning: cannot read {remote.uri} ({problem}); showing the copy pulled here",
                                err=True, fg="yellow")
            if view is not None:
                update = view.update
                session = view.session
            else:
                session = SessionStore(cfg.state_dir).get(session_ref or "latest")
                if _runs_elsewhere(session):  # launched from here on a cloud: its backend copies from storage
                    update = functools.partial(refresh, session)
            mon = Monitor(session=session, checkpoint_dir=ckpt, settings=settings, follow=follow)
        _watch(mon, view, update, follow=follow, as_json=as_json, interval=interval, parsed=parsed)


def _nothing_to_update() -> None:
    """A local session or a log file: Monitor reads it where it is."""


def _runs_elsewhere(session: Any) -> bool:
    from ..launcher.control import recorded_handle

    try:
        handle = recorded_handle(session.read())
    except Exception:  # an unreadable record: monitor says so itself
        return False
    return handle is not None and handle.backend != "local"


def _watch(mon: Any, view: Any, update: Callable[[], None], *, follow: bool, as_json: bool, interval: float,
           parsed: bool) -> None:
    import json
    import shutil
    import sys
    import time

    from ..formatting import json_safe
    from ..launcher.monitor import open_log, render
    from ..session import TERMINAL

    if parsed:
        if mon.log is None:
            mon.log = open_log(mon.session.output_log)  # type: ignore[union-attr]
        for number, line, result in mon.parsed_lines():
            click.echo(json.dumps(json_safe({"line": number, **result, "text": line[:200]})))
        return

    from ..storage.errors import StorageError

    tty = sys.stdout.isatty() and not as_json
    drawn = 0
    unreachable = False
    try:
        while True:
            try:
                update()
            except StorageError as e:  # storage out of reach for now: the last look stands, following goes on
                if not unreachable:
                    click.secho(f"warning: cannot read storage ({e}); retrying", err=True, fg="yellow")
                unreachable = True
            else:
                unreachable = False
            mon.refresh()
            snap = mon.snapshot()
            if view is not None:
                _add_storage(snap, view)
            if as_json:
                click.echo(json.dumps(json_safe(snap), allow_nan=False))
            else:
                width = shutil.get_terminal_size((100, 24)).columns
                lines = render(snap, width - 1 if tty else 100)
                if tty and drawn:
                    sys.stdout.write(f"\x1b[{drawn}A\r\x1b[J")
                click.echo("\n".join(lines))
                drawn = len(lines)
            if not follow or (mon.session is not None and snap["status"] in (*TERMINAL, "crashed")):
                return
            if view is not None and view.finished:
                return  # its writer let go (the segments were read after that was seen: all of them)
            if not tty and not as_json:
                click.echo("")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a --follow on a log ends



def _add_storage(snap: dict[str, Any], view: Any) -> None:
    """Where a remote session is read from, and what its heartbeat says about its writer."""
    from ..storage.mirror import HEARTBEAT_STALE_S

    age = view.heartbeat_age_s(snap["now"])
    snap["storage"] = {"uri": view.remote.uri, "heartbeat_age_s": age, "heartbeat_step": view.heartbeat.get("step"),
                       "released": bool(view.heartbeat.get("released")), "ended": view.ended}
    if age is not None and age > HEARTBEAT_STALE_S and not view.finished and snap["status"] == "running":
        snap["warnings"].append({"kind": "heartbeat", "message": f"no heartbeat in storage for {age:.0f}s: the "
                                 "machine writing this session may be gone"})
