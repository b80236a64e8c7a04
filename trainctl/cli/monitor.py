"""`trainctl monitor`: where a run stands, once or refreshed in place."""

from __future__ import annotations

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
    import json
    import shutil
    import sys
    import time
    from pathlib import Path

    from .. import config as config_mod
    from ..errors import UsageError
    from ..formatting import json_safe
    from ..launcher.monitor import Monitor, Settings, open_log, render
    from ..session import TERMINAL, SessionStore

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

    if log_file:
        mon = Monitor(log=open_log(log_file), checkpoint_dir=ckpt, settings=settings, follow=follow)
    else:
        session = SessionStore(cfg.state_dir).get(session_ref or "latest")
        mon = Monitor(session=session, checkpoint_dir=ckpt, settings=settings, follow=follow)

    if parsed:
        if mon.log is None:
            mon.log = open_log(mon.session.output_log)  # type: ignore[union-attr]
        for number, line, result in mon.parsed_lines():
            click.echo(json.dumps(json_safe({"line": number, **result, "text": line[:200]})))
        return

    tty = sys.stdout.isatty() and not as_json
    drawn = 0
    try:
        while True:
            mon.refresh()
            snap = mon.snapshot()
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
            if not tty and not as_json:
                click.echo("")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a --follow on a log ends

