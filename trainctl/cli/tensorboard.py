"""`trainctl tensorboard`: TensorBoard over chosen sessions, one readable run name each."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import click


def logdir_spec(runs: list[tuple[str, Path]]) -> str:
    """TensorBoard's --logdir_spec 'name1:dir1,name2:dir2' for (run name, folder) pairs."""
    from ..errors import UsageError

    parts = []
    for name, folder in runs:
        if "," in str(folder):
            raise UsageError(f"TensorBoard cannot open {folder}: its --logdir_spec does not allow "
                             f"commas in paths.", "Move the project to a folder without a comma.")
        parts.append(f"{name}:{folder}")
    return ",".join(parts)


def run_view(runs: list[tuple[str, Path]], state_dir: Path) -> Path | None:
    """A folder holding one link per run, named as the run should be shown, to its session's
    TensorBoard folder; None where links can't be made.

    With --logdir_spec TensorBoard names a run "<name>/<folder below it>", so the points the
    script logged (in the session's tensorboard/ itself) would show as "train-3fa2c1/.". Over
    this folder they show as "train-3fa2c1", and parsed output as "train-3fa2c1/output". The
    folder is named by a digest of the runs, so the same choice reuses it and another choice
    never disturbs a TensorBoard already serving this one.
    """
    import hashlib

    key = hashlib.sha256("\0".join(f"{name}\0{folder}" for name, folder in sorted(runs)).encode()).hexdigest()[:12]
    view = state_dir / "tensorboard-views" / key
    try:
        view.mkdir(parents=True, exist_ok=True)
        for name, folder in runs:
            link = view / name
            target = str(Path(folder).resolve())
            if link.is_symlink() and os.readlink(link) == target:
                continue
            tmp = view / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target, target_is_directory=True)
            os.replace(tmp, link)
    except (OSError, NotImplementedError):  # no symlinks here (Windows without the privilege)
        return None
    return view


def tensorboard_command(runs: list[tuple[str, Path]], *, port: int | None, host: str,
                        view: Path | None = None) -> list[str]:
    """The command that serves these runs (same interpreter, so the installed tensorboard)."""
    # "default": TensorBoard tries 6006, then the next free ports
    where = ["--logdir", str(view), "--load_fast", "false"] if view is not None else \
        ["--logdir_spec", logdir_spec(runs)]  # --load_fast=false: the loader that follows the links
    return [sys.executable, "-m", "tensorboard.main", *where,
            "--port", "default" if port is None else str(port), "--host", host]


def choose_runs(refs: tuple[str, ...]) -> tuple[list[tuple[str, Path]], list[str]]:
    """(run name, TensorBoard folder) for the chosen sessions (all when none), and notes."""
    from ..errors import NotFoundError
    from ..session import CorruptSessionError
    from .compare import open_store, resolve_sessions, run_label

    store = open_store()
    if refs:
        sessions = resolve_sessions(store, refs)
    else:
        sessions = [store.get(i) for i in store.ids()]
        if not sessions:
            raise NotFoundError("No sessions in this project yet.",
                                "Start one with: trainctl local SCRIPT")
    runs: list[tuple[str, Path]] = []
    notes: list[str] = []
    for session in sessions:
        data: dict[str, Any]
        try:
            data = session.read()
        except CorruptSessionError:  # a broken session.json must not hide the others' curves
            data = {}
        if not session.tensorboard_dir.is_dir():
            notes.append(f"note: session {session.id} has no TensorBoard folder; left out.")
            continue
        runs.append((run_label(session.id, data), session.tensorboard_dir))
    if not runs:
        raise NotFoundError("None of the chosen sessions has a TensorBoard folder.",
                            "Sessions recorded by trainctl local or trainctl.init() have one.")
    return runs, notes


@click.command("tensorboard")
@click.argument("sessions", nargs=-1, metavar="[SESSION]...")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port to serve on (default: 6006, or the next free one; 0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes TensorBoard to the network.")
@click.option("--print-command", is_flag=True, help="Print the TensorBoard command instead of running it.")
def tensorboard(sessions: tuple[str, ...], port: int | None, host: str, print_command: bool) -> None:
    """Start TensorBoard over recorded sessions (all of this project's by default).

    SESSION is an id, an id prefix, a name or 'latest'. Each session shows as one run named
    '<name or script>-<short id>' (metrics parsed from its output as '<run>/output'). Stop it
    with Ctrl-C.
    """
    from ..config import load

    runs, notes = choose_runs(sessions)
    for note in notes:
        click.echo(note, err=True)
    command = tensorboard_command(runs, port=port, host=host, view=run_view(runs, load().state_dir))
    if print_command:
        click.echo(shlex.join(command))
        return
    click.echo(f"TensorBoard over {len(runs)} session(s): {', '.join(name for name, _ in runs)}", err=True)
    sys.exit(_serve(command))


def _serve(command: list[str]) -> int:
    """Run TensorBoard in the foreground; pass stop signals on so it never outlives us."""
    try:
        child = subprocess.Popen(command)
    except OSError as e:
        from ..errors import TrainctlError

        raise TrainctlError(f"cannot start TensorBoard ({e}).",
                            "Install it with: pip install tensorboard") from e

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled by `forward`
                continue
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # stopped by Ctrl-C or a signal we forwarded: a normal way to end a server
    return 0 if code in (0, -signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP) else code
