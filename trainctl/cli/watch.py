"""A run on this terminal: the engine's events rendered while `trainctl local` runs it, a run
started in the background (`--detach`), and a terminal attached to a run another process
watches (`sessions attach`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..backends.base import LogChunk, RunSpec
from ..launcher.supervisor import (
    EngineEvents,
    Outcome,
    RestartPolicy,
    RunResult,
    Supervisor,
    exit_code_for,
)
from ..session import Session, State, effective_status
from . import render


class TerminalEvents(EngineEvents):
    """The script's output with a progress bar under it (plain status lines off a terminal,
    nothing with --quiet), trainctl's status lines and the pre-flight report, on stderr."""

    def __init__(self, *, quiet: bool, args: Sequence[str]) -> None:
        self.quiet = quiet
        self.args = list(args)
        self.display: Any = None

    def message(self, text: str) -> None:
        _err(f"[trainctl] {text}")

    def preflight(self, report: Any) -> None:
        if report.ok and all(r.status == "pass" for r in report.results):
            self.message(f"pre-flight: {len(report.results)} checks passed")
            return
        for line in report.lines(error_follows=True):  # a failure's hint comes with the error below
            _err(line)

    def attempt_started(self, session: Session, attempt: int) -> None:
        if self.display is None:
            # built once the script runs: these imports overlap its start-up
            from ..metrics import infer_totals
            from .progress import ProgressDisplay

            self.display = ProgressDisplay(session, totals=infer_totals(self.args), quiet=self.quiet)
            self.display.start()

    def output(self, chunk: LogChunk) -> None:
        if self.display is not None:
            self.display.write_output(chunk.data, stderr=chunk.stream == "stderr")
            return
        stream = sys.stderr if chunk.stream == "stderr" else sys.stdout
        try:
            stream.buffer.write(chunk.data)
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def parsed(self, parsed: dict[str, Any]) -> None:
        if self.display is not None:
            self.display.on_parsed(parsed)

    def attempts_ended(self, status: State) -> None:
        if self.display is not None:
            self.display.close(str(status))


def _err(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # the terminal is gone (SIGHUP); the run goes on
        pass


def run_here(spec: RunSpec, policy: RestartPolicy, cfg: Any, *, quiet: bool, preflight: bool,
             parent: str | None = None, resume_verified: bool = False,
             sync_uri: str | None = None, force: bool = False, net_check: bool | None = None,
             net_check_timeout_s: float | None = None) -> tuple[Supervisor, RunResult]:
    """Run on this terminal until the session ends; its summary printed. With `sync_uri`, the
    session is mirrored to storage while it runs (the cloud agent's sync loop)."""
    supervisor = Supervisor(spec, policy, cfg, events=TerminalEvents(quiet=quiet, args=spec.args), parent=parent,
                            force=force, net_check=net_check, net_check_timeout_s=net_check_timeout_s)
    session = supervisor.prepare(preflight=preflight, resume_verified=resume_verified)
    if sync_uri is None:
        result = supervisor.run()
    else:
        from ..agent.sync import synced
        from ..storage.mirror import project_name

        with synced(session, sync_uri, project=project_name(cfg), cfg=cfg) as loop:
            _err(f"[trainctl] syncing to {loop.remote.uri}")
            result = supervisor.run()
        _err(f"[trainctl] synced: {len(loop.uploaded)} checkpoint(s) uploaded"
             + (f", latest {loop.uploaded[-1]['file']}" if loop.uploaded else "") + f" ({loop.remote.uri})")
    output = supervisor.output_path(result.session)
    show_end(result.session, [], result.record, output=output)  # the script's output, its traceback included, is on screen
    return supervisor, result


def start_in_background(spec: RunSpec, policy: RestartPolicy, cfg: Any, *, preflight: bool,
                        parent: str | None = None, resume_verified: bool = False, force: bool = False,
                        sync_uri: str | None = None, net_check: bool | None = None,
                        net_check_timeout_s: float | None = None) -> Session:
    """Resolve, check and create the session here, then leave the run to a background process.
    With `sync_uri`, the session's lease in storage is taken here (a storage that can't be
    written is said now) and the background process syncs under it."""
    from ..launcher import detached

    supervisor = Supervisor(spec, policy, cfg, backend_options={"use_pty": False},
                            events=TerminalEvents(quiet=False, args=spec.args), parent=parent, force=force,
                            net_check=net_check, net_check_timeout_s=net_check_timeout_s)
    session = supervisor.prepare(preflight=preflight, resume_verified=resume_verified)  # the network check too
    sync = None
    if sync_uri is not None:
        from ..agent.sync import claim_sync
        from ..storage.mirror import project_name

        project = project_name(cfg)
        sync = {"storage": sync_uri, "project": project,
                "lease_term": claim_sync(session, sync_uri, project=project, cfg=cfg)}
    pid = detached.start(supervisor, sync=sync)
    click.echo(f"Started session {session.id} in the background (pid {pid}).")
    if sync is not None:
        click.echo(f"  syncing  to {session.read().get('storage')}")
    click.echo(f"  attach   trainctl sessions attach {session.id}     (Ctrl-C detaches; the run goes on)")
    click.echo(f"  output   trainctl sessions logs {session.id} --follow")
    click.echo(f"  stop     trainctl sessions stop {session.id}       (emergency checkpoint, then stopped)")
    return session


def show_plan(spec: RunSpec, policy: RestartPolicy, cfg: Any, *, force: bool = False, net_check: bool | None = None,
              net_check_timeout_s: float | None = None) -> None:
    """`--dry-run`: the launch plan, secrets redacted; nothing is created or started."""
    import shlex

    supervisor = Supervisor(spec, policy, cfg, events=TerminalEvents(quiet=True, args=spec.args), force=force,
                            net_check=net_check, net_check_timeout_s=net_check_timeout_s)
    plan = supervisor.plan().display()
    check = supervisor.net_check_plan()
    click.echo(f"backend      {plan['backend']}")
    click.echo(f"command      {shlex.join(plan['command'])}")
    click.echo(f"cwd          {plan['cwd']}")
    for key, value in sorted(plan["env"].items()):
        click.echo(f"env          {key}={value}")
    click.echo(f"resources    {', '.join(f'{k}={v}' for k, v in plan['resources'].items()) or '-'}")
    click.echo(f"output       {plan['output']}")
    click.echo(f"checkpoints  {plan['checkpoint_location']}")
    click.echo(f"restarts     up to {policy.max_restarts} on {', '.join(policy.restart_on)}, "
               f"{policy.restart_delay_s:g}s apart; grace period {policy.grace_period_s:g}s")
    if check is not None:
        click.echo(f"net check    before the first attempt, all {check.nnodes} nodes all-reduce (waits up to "
                   f"{check.timeout_s:g} s for them): {shlex.join(check.command)}")
    elif supervisor.node is not None:
        click.echo("net check    skipped (--no-net-check or net_check = false)")
    click.echo("cost         " + (f"~${plan['cost_per_hour']:.2f}/h" if plan["cost_per_hour"] is not None else "none (this machine)"))


def show_end(session: Session, output_tail: list[str], record: dict[str, Any] | None = None,
             output: Path | None = None) -> None:
    """The closing lines of a run, from what session.json recorded (and `record`, the end the
    engine saw, should the disk have refused it); `output_tail` only when the output was not
    on this screen already (a run that ended while detached)."""
    try:
        data = session.read()
    except Exception:  # unreadable: what the engine saw is all there is
        data = {"id": session.id}
    render.run_summary({**data, **(record or {}), "output_log": str(output or session.output_log)}, output_tail)


def recorded_exit_code(data: dict[str, Any]) -> int:
    """The exit code `trainctl local` gave (or would give) for how the session ended."""
    status = effective_status(data)
    return exit_code_for(Outcome(status if status is not State.CRASHED else State.FAILED, data.get("exit_code")))


def attach(session: Session, *, tail_lines: int) -> int:
    """Show the session's output and progress until it ends; Ctrl-C detaches. The exit code is
    the run's own, as `trainctl local` would have returned it."""
    from ..launcher.control import follow_output, output_tail
    from ..metrics import infer_totals
    from .progress import ProgressDisplay

    data = session.read()
    status = effective_status(data)
    if status not in (State.RUNNING, State.PENDING):
        failed = status in (State.FAILED, State.CRASHED)
        if not failed and tail_lines:  # its last lines, as attaching a moment earlier would have shown
            text, _offset = output_tail(session, tail_lines)
            try:
                sys.stdout.buffer.write(text)
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
        _err(f"session {session.id} has already ended ({status}).")
        show_end(session, _tail_lines(session) if failed else [])  # a failure's tail comes with its diagnosis
        return recorded_exit_code(data)
    text, offset = output_tail(session, tail_lines)
    display = ProgressDisplay(session, totals=infer_totals(list(data.get("args") or [])), parsed_from_events=True)
    display.write_output(text)
    display.start()
    try:
        for chunk in follow_output(session, offset):
            display.write_output(chunk.data)
    except KeyboardInterrupt:
        display.close("detached")
        _err(f"detached from session {session.id}; it keeps running. Reattach with: "
             f"trainctl sessions attach {session.id}")
        return 0
    data = session.read()
    status = effective_status(data)
    display.close(str(status))
    show_end(session, [])  # followed to its end: the output is on screen
    return recorded_exit_code(data)


def _tail_lines(session: Session, lines: int = 20) -> list[str]:
    from ..launcher.control import output_tail

    data, _end = output_tail(session, lines)
    return [line for line in data.decode("utf-8", "replace").replace("\r", "\n").split("\n") if line]
