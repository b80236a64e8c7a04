"""`trainctl checkpoint ...`: list, info, verify, cleanup (parse, call trainctl.checkpoint, print)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..formatting import format_duration, format_value
from .groups import group

STATUS_COLORS = {"valid": "green", "foreign": "cyan", "unverified": "yellow", "corrupt": "red",
                 "unreadable": "red", "unsupported": "red", "partial": "yellow", "script": "cyan",
                 "changed": "yellow"}


@group("checkpoint")
def checkpoint() -> None:
    """List, inspect, verify, clean up and resume checkpoints."""


def _config() -> Any:
    from ..config import load

    return load()


def _metrics_text(metrics: dict[str, Any], limit: int = 3) -> str:
    items = [(k, v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " ".join(f"{k}={format_value(v)}" for k, v in items[:limit]) or "-"


def _status_text(info: Any) -> str:
    if info.status == "foreign":
        return f"foreign ({info.kind})"
    return info.status


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _dump_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _require_exists(path: Path) -> None:
    from ..errors import CheckpointNotFoundError

    if not path.exists():
        raise CheckpointNotFoundError(f"no such file or folder: {path}",
                                      "List checkpoints with: trainctl checkpoint list")


def _session_dir(config: Any, ref: str) -> tuple[Path, Path]:
    """Where the session's checkpoints are, as its record says, and the session's own folder."""
    from ..session import SessionStore

    session = SessionStore(config.state_dir).get(ref)
    return Path(session.checkpoint_location() or config.checkpoint_dir / session.id), session.dir


def _script_written(session_dir: Path | None) -> list[tuple[dict[str, Any], str]]:
    """What the session's script wrote itself (recorded by the launcher), newest version of each."""
    if session_dir is None:
        return []
    from ..launcher.script_checkpoints import latest_versions, read_manifest

    manifest = read_manifest(session_dir)
    return latest_versions(manifest["checkpoints"]) if manifest else []


@checkpoint.command("list")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--session", "session_ref", metavar="ID", help="Only this session's checkpoints (id, prefix, name or 'latest').")
@click.option("--all", "show_all", is_flag=True, help="Also list partial files of interrupted saves, with their size.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(directory: Path | None, session_ref: str | None, show_all: bool, as_json: bool) -> None:
    """Every checkpoint under DIR (default: the checkpoint dir), newest first, with its status."""
    from .. import checkpoint as ckpt
    from ..config import format_size

    config = _config()
    session_dir = None
    if session_ref:
        directory, session_dir = _session_dir(config, session_ref)
    directory = directory or config.checkpoint_dir
    written = _script_written(session_dir)
    exists = directory.exists()
    if not exists and not written:
        if as_json:
            _dump_json([])
        else:
            click.echo(f"No checkpoints: {directory} does not exist yet.")
        return
    single = exists and (directory.is_file() or (directory / "trainer_state.json").is_file())
    infos = [] if not exists else [ckpt.inspect(directory)] if single else ckpt.scan(directory)
    base = directory.parent if single else directory
    partials = [] if single or not exists else ckpt.partial_files(directory)
    if as_json:
        _dump_json([i.to_dict() for i in infos]
                   + [{**e, "source": "script", "state": state} for e, state in written]
                   + [p.to_dict() for p in partials if show_all])
        return
    if not infos and not written and not (show_all and partials):
        click.echo(f"No checkpoints under {directory}.")
        _note_partials(partials, show_all)
        return
    now = time.time()
    rows = [("NAME", "EPOCH", "STEP", "METRICS", "SIZE", "AGE", "STATUS")]
    statuses = []
    for i in infos:
        rows.append((_relative(i.path, base), format_value(i.epoch) if i.epoch is not None else "-",
                     str(i.step) if i.step is not None else "-", _metrics_text(i.metrics),
                     format_size(i.bytes), format_duration(now - i.time), _status_text(i)))
        statuses.append(i.status)
    for e, state in written:  # where the script itself saved (its own folders, not trainctl's)
        rows.append((e.get("display") or e["path"], format_value(e["epoch"]) if e.get("epoch") is not None else "-",
                     str(e["step"]) if e.get("step") is not None else "-", _metrics_text(e.get("metrics") or {}),
                     format_size(e.get("bytes") or 0), format_duration(now - (e.get("written_at") or now)),
                     "by the script" + ("" if state == "as registered" else f", {state}")))
        statuses.append("script" if state == "as registered" else "changed")
    if show_all:
        for p in partials:
            rows.append((_relative(p.path, base), "-", "-", f"of {p.target}", format_size(p.bytes),
                         format_duration(now - p.mtime), "partial"))
            statuses.append("partial")
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for n, row in enumerate(rows):
        line = "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths[:-1], strict=True))
        status = row[-1] if n == 0 else click.style(row[-1], fg=STATUS_COLORS.get(statuses[n - 1]))
        click.echo(f"{line}  {status}")
    problems = [i for i in infos if i.status in ("corrupt", "unreadable", "unsupported", "unverified")]
    for i in problems:
        click.echo(f"{_relative(i.path, base)}: {i.status}: {i.error}", err=True)
    _note_partials(partials, show_all)


def _note_partials(partials: list[Any], show_all: bool) -> None:
    from ..config import format_size

    if partials and not show_all:
        total = sum(p.bytes for p in partials)
        click.echo(f"note: {len(partials)} partial file(s) of interrupted saves take {format_size(total)}; "
                   "see them with: trainctl checkpoint list --all (cleanup removes those older than 15 minutes)",
                   err=True)


@checkpoint.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_cmd(path: Path, as_json: bool) -> None:
    """What a checkpoint (file or Hugging Face folder) holds, without loading its tensors."""
    from .. import checkpoint as ckpt
    from ..errors import CorruptCheckpointError, UnsupportedCheckpointError

    _require_exists(path)
    info = ckpt.inspect(path, contents=True)
    if info.status == "unreadable":
        raise CorruptCheckpointError(f"{path}: unreadable: {info.error}.",
                                     "trainctl reads a checkpoint's pickle within bounds, and this one is past them; "
                                     "load it with torch only if you trust where it came from.")
    if info.kind == "unknown" and info.status == "corrupt":
        raise CorruptCheckpointError(f"{path} is {info.error}.",
                                     "Give a checkpoint file, or list them with: trainctl checkpoint list")
    if as_json:
        _dump_json(info.to_dict())
    else:
        _print_info(info)
    if info.status == "unsupported":
        raise UnsupportedCheckpointError(f"{path}: {info.error}.", "Upgrade trainctl: pip install -U trainctl")
    if info.status == "corrupt":
        raise CorruptCheckpointError(f"{path}: {info.error}.", "Verify the folder with: trainctl checkpoint verify")


def _print_info(info: Any) -> None:
    from ..config import format_size

    click.echo(f"path:     {info.path}")
    click.echo(f"kind:     {info.kind}")
    click.echo("status:   " + click.style(info.status, fg=STATUS_COLORS.get(info.status))
               + (f" ({info.error})" if info.error else ""))
    click.echo(f"size:     {format_size(info.bytes)}")
    when = info.time
    if when:
        click.echo(f"saved:    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))} ({format_duration(time.time() - when)} ago)")
    for label, value in (("epoch", info.epoch), ("step", info.step), ("session", info.session_id),
                         ("script", info.script)):
        if value is not None:
            click.echo(f"{label + ':':<10}{value}")
    if info.metrics:
        click.echo("metrics:  " + ", ".join(f"{k}={format_value(v)}" for k, v in info.metrics.items()))
    meta = {k: v for k, v in info.meta.items()
            if k not in ("epoch", "step", "metrics", "session_id", "script", "saved_at")}
    if meta:
        click.echo("meta:")
        for k, v in meta.items():
            click.echo(f"  {k}: {json.dumps(v, default=str)[:300]}")
    if info.summary:
        click.echo("summary:")
        for k, v in info.summary.items():
            text = format_size(v) if k == "tensor_bytes" and isinstance(v, int) else json.dumps(v, default=str)
            click.echo(f"  {k}: {text[:300]}")
    if info.summary.get("untrusted_globals"):
        click.secho("note: loading this file needs trust=True (full unpickling can run code): it references "
                    + ", ".join(info.summary["untrusted_globals"][:5]), fg="yellow", err=True)


@checkpoint.command("verify")
@click.argument("target", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify_cmd(target: Path | None, as_json: bool) -> None:
    """Re-digest checkpoints against their manifests; exits non-zero on any mismatch."""
    from .. import checkpoint as ckpt
    from ..errors import CheckpointError, NotFoundError

    target = target or _config().checkpoint_dir
    _require_exists(target)
    if target.is_file() or (target / "trainer_state.json").is_file():
        paths = [target]
        base = target.parent
    else:
        paths = [i.path for i in ckpt.scan(target)]
        base = target
        if not paths:
            raise NotFoundError(f"no checkpoints under {target}.",
                                "Give a checkpoint file or a folder that holds some.")
    results = [ckpt.verify(p) for p in paths]
    if as_json:
        _dump_json([r.to_dict() for r in results])
    else:
        for r in results:
            mark = click.style("ok  ", fg="green") if r.ok else click.style("FAIL", fg="red")
            click.echo(f"{mark}  {_relative(r.path, base)}  {r.status}: {r.reason}")
    bad = [r for r in results if not r.ok]
    if bad:
        raise CheckpointError(
            f"{len(bad)} of {len(results)} checkpoint(s) failed verification"
            + (f": {bad[0].path.name}: {bad[0].reason}" if len(bad) == 1 else "") + ".",
            "--resume auto skips these and uses the newest valid one; delete a bad file and its .json manifest by hand once you have looked at it.")


@checkpoint.command("cleanup")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--keep-last-n", type=click.IntRange(min=0), help="Keep the newest N checkpoints of each session.")
@click.option("--keep-best", "keep_best_k", type=click.IntRange(min=0), help="Also keep the K best by --metric.")
@click.option("--metric", help="Metric that ranks checkpoints (default: retention.metric, 'loss').")
@click.option("--mode", type=click.Choice(["min", "max"]), help="Which end of --metric is best (default: guessed from its name).")
@click.option("--max-total-size", help="Size cap per session folder, e.g. 20G.")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Delete without asking.")
def cleanup_cmd(directory: Path | None, keep_last_n: int | None, keep_best_k: int | None, metric: str | None,
                mode: str | None, max_total_size: str | None, dry_run: bool, yes: bool) -> None:
    """Delete old checkpoints by retention rules; never the newest valid, the best, or one in use."""
    from .. import checkpoint as ckpt
    from ..config import format_size, parse_size
    from ..errors import UsageError
    from ..launcher.control import running_resume_paths
    from ..session import SessionStore, metric_mode

    config = _config()
    root = config.checkpoint_dir
    directory = (directory or root).resolve()
    _require_exists(directory)
    if directory != root and root not in directory.parents:
        raise UsageError(f"{directory} is outside the checkpoint dir {root}; cleanup only deletes there.",
                         "Give a folder under the checkpoint dir, or set checkpoint_dir in trainctl.toml.")
    if not directory.is_dir():
        raise UsageError(f"{directory} is a file; cleanup works on a folder.", "Give its folder.")
    settings = ckpt.retention_settings(config)
    if keep_last_n is not None or keep_best_k is not None or max_total_size is not None:
        settings = {"keep_last_n": keep_last_n or 0, "keep_best_k": keep_best_k or 0,
                    "metric": settings["metric"], "mode": settings["mode"], "max_total_bytes": 0}
        if max_total_size:
            try:
                settings["max_total_bytes"] = parse_size(max_total_size)
            except ValueError as e:
                raise UsageError(f"--max-total-size: {e}.", "Use a size like 500M or 20G.") from e
    if metric:
        settings["metric"] = metric
        settings["mode"] = mode or metric_mode(metric)
    elif mode:
        settings["mode"] = mode
    if not (settings["keep_last_n"] or settings["keep_best_k"] or settings["max_total_bytes"]):
        raise UsageError("no retention rule: nothing to decide what to delete.",
                         "Give --keep-last-n N, --keep-best K or --max-total-size SIZE, or set [retention] in trainctl.toml.")
    protected = sorted(running_resume_paths(SessionStore(config.state_dir)))
    groups: dict[Path, list[Any]] = {}
    for info in ckpt.scan(directory):
        groups.setdefault(info.path.parent, []).append(info)
    plan, unranked = [], []
    for folder, infos in groups.items():
        try:
            plan += ckpt.plan_retention(infos, protected=protected, **settings)
        except ckpt.UnknownMetricError as e:
            unranked.append((folder, e))
    ranked_groups = sum(1 for infos in groups.values()
                        if any(i.kind == "trainctl" and i.status != "unverified" for i in infos))
    if unranked and len(unranked) == ranked_groups:
        raise ckpt.UnknownMetricError(settings["metric"], (k for _, e in unranked for k in e.known))
    for folder, _ in unranked:
        click.echo(f"note: skipped {_relative(folder, directory) or '.'}: none of its checkpoints records "
                   f"'{settings['metric']}', so keep-best cannot tell which to keep.", err=True)
    temps = ckpt.stale_temp_files(directory, recursive=True)
    if not plan and not temps:
        click.echo("Nothing to delete.")
        return
    freed = sum(i.bytes for i in plan) + sum(t.stat().st_size for t in temps)
    click.echo(f"{'Would delete' if dry_run else 'To delete:'} {len(plan)} checkpoint(s)"
               + (f" and {len(temps)} partial file(s) of interrupted saves" if temps else "")
               + f", freeing {format_size(freed)}:")
    for i in plan:
        click.echo(f"  {_relative(i.path, directory)}  epoch={i.epoch} step={i.step}  {format_size(i.bytes)}  {i.status}")
    for t in temps:
        click.echo(f"  {_relative(t, directory)}  partial file of an interrupted save")
    if dry_run:
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to delete {len(plan) + len(temps)} file(s) without confirmation.",
                             "Pass --yes to delete, or --dry-run to preview.")
        if not click.confirm("Delete them?", default=False):
            click.echo("Nothing deleted.")
            return
    for i in plan:
        ckpt.delete_checkpoint(i.path)
    for t in temps:
        t.unlink(missing_ok=True)
    click.echo(f"Deleted {len(plan) + len(temps)} file(s), freed {format_size(freed)}.")


def _add_resume() -> None:
    from .resume import resume

    checkpoint.add_command(resume, "resume")


_add_resume()
