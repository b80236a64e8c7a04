"""`trainctl sessions plot` and `trainctl sessions compare`: curves and side-by-side differences."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click


def open_store() -> Any:
    """The session store of the project around the current folder."""
    from ..config import load
    from ..session import SessionStore

    return SessionStore(load().state_dir)


def resolve_sessions(store: Any, refs: tuple[str, ...] | list[str]) -> list[Any]:
    """Sessions for ids, prefixes, names or 'latest', in the order given, without repeats."""
    sessions = []
    seen = set()
    for ref in refs:
        session = store.get(ref)
        if session.id not in seen:
            seen.add(session.id)
            sessions.append(session)
    return sessions


def short_id(session_id: str) -> str:
    """The random tail of a session id: unique enough to tell runs apart, and a valid reference."""
    return session_id.rsplit("-", 1)[-1]


def run_label(session_id: str, data: dict[str, Any]) -> str:
    """'<name or script stem>-<short id>', e.g. 'train-3fa2c1'."""
    base = data.get("name") or (Path(str(data["script"])).stem if data.get("script") else "") or "session"
    label = f"{base}-{short_id(session_id)}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", label)


def _read(session: Any) -> dict[str, Any]:
    from ..session import CorruptSessionError

    try:
        return session.read()
    except CorruptSessionError:
        return {"id": session.id}


@click.command("plot", short_help="Draw metric curves of sessions, in the terminal or to a PNG.")
@click.argument("sessions", nargs=-1, required=True, metavar="SESSION...")
@click.option("--metric", "-m", default=None,
              help="Metric to draw (default: loss, or the first metric with 'loss' in its name).")
@click.option("--out", "-o", default=None, metavar="FILE.png",
              help="Write an image instead (PNG, SVG or PDF by suffix); needs: pip install 'trainctl[plot]'.")
@click.option("--width", type=click.IntRange(min=1), default=None,
              help="Terminal: plot columns (default: fit the terminal). Image: pixels (default 1000).")
@click.option("--height", type=click.IntRange(min=1), default=None,
              help="Terminal: plot rows (default 15). Image: pixels (default 600).")
def plot(sessions: tuple[str, ...], metric: str | None, out: str | None, width: int | None,
         height: int | None) -> None:
    """Draw a metric's curves of one or more sessions, overlaid: in the terminal, or to an image.

    SESSION is an id, an id prefix, a name or 'latest'.
    """
    from . import plot as plotting

    out_path = plotting.check_out_path(out) if out else None
    chosen = resolve_sessions(open_store(), sessions)
    series = plotting.collect_series(
        [(s.id, run_label(s.id, _read(s)), s.metrics()) for s in chosen], metric)
    for note in series.notes:
        click.echo(note, err=True)
    if out_path is not None:
        plotting.write_image(series, out_path, width=width, height=height)
        click.echo(f"wrote {out_path}")
        return
    click.echo(plotting.render_terminal(series, width=width, height=height))


@click.command("compare", short_help="Compare sessions: settings that differ, final and best metrics.")
@click.argument("sessions", nargs=-1, required=True, metavar="SESSION...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def compare(sessions: tuple[str, ...], as_json: bool) -> None:
    """Show how sessions differ: config, arguments, script, versions; final and best metrics.

    SESSION is an id, an id prefix, a name or 'latest'.
    """
    from ..errors import UsageError

    chosen = resolve_sessions(open_store(), sessions)
    if len(chosen) < 2:
        raise UsageError("compare needs at least two different sessions.",
                         "List sessions with: trainctl sessions list")
    report = compare_sessions([(s, _read(s)) for s in chosen])
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_comparison(report))


# --- comparison (plain data; the commands above only print it) ---------------------------------

_MISSING = object()


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def parse_args(args: Any) -> dict[str, Any]:
    """Script arguments as {flag: value}: '--lr 0.1', '--lr=0.1', '--amp' (True), positionals by index."""
    if not isinstance(args, list):
        return {} if args is None else {"args": args}
    out: dict[str, Any] = {}
    position = 0
    i = 0
    while i < len(args):
        token = str(args[i])
        if token.startswith("-") and len(token) > 1 and not _is_number(token):
            if "=" in token:
                key, value = token.split("=", 1)
                out[key] = value
            elif i + 1 < len(args) and not (str(args[i + 1]).startswith("-") and not _is_number(str(args[i + 1]))):
                out[token] = str(args[i + 1])
                i += 1
            else:
                out[token] = True
        else:
            out[f"[{position}]"] = token
            position += 1
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def compare_sessions(items: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """{'sessions': [...], 'differences': {key: [value per session]}, 'metrics': {name: {...}}}."""
    from ..formatting import json_safe
    from ..session import effective_status, summarize_metrics

    flat: list[dict[str, Any]] = []
    for _session, data in items:
        row: dict[str, Any] = {}
        _flatten(data.get("config") or {}, "config", row)
        for key, value in parse_args(data.get("args")).items():
            row[f"args.{key}"] = value
        row["script"] = data.get("script")
        row["git.commit"] = (data.get("git") or {}).get("commit")
        row["git.dirty"] = (data.get("git") or {}).get("dirty")
        row["torch"] = data.get("torch")
        row["python"] = data.get("python")
        flat.append(row)
    order = ("config.", "args.", "script", "git.", "torch", "python")
    keys = sorted(dict.fromkeys(k for row in flat for k in row),
                  key=lambda k: next(i for i, p in enumerate((*order, "")) if k.startswith(p)))
    differences = {}
    for key in keys:
        values = [row.get(key, _MISSING) for row in flat]
        if any(v != values[0] for v in values[1:]):
            differences[key] = [None if v is _MISSING else v for v in values]

    summaries = [summarize_metrics(session.metrics()) for session, _ in items]
    names = list(dict.fromkeys(n for s in summaries for n in s["last"]))
    metrics: dict[str, Any] = {}
    for name in names:
        best = [s["best"].get(name) for s in summaries]
        metrics[name] = {
            "mode": next((b["mode"] for b in best if b), None),
            "final": [json_safe(s["last"].get(name)) for s in summaries],
            "best": [json_safe(b["value"]) if b else None for b in best],
            "best_step": [b["step"] if b else None for b in best],
        }
    sessions = [{"id": session.id, "label": run_label(session.id, data), "name": data.get("name"),
                 "status": effective_status(data) if "status" in data else None,
                 "points": s["points"]}
                for (session, data), s in zip(items, summaries, strict=True)]
    return {"sessions": sessions, "differences": differences, "metrics": metrics}


def _cell(value: Any, limit: int = 44) -> str:
    if value is None:
        text = "—"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
    else:
        text = str(value)
    if len(text) > limit:  # cut in the middle: a path's file name and an id's end tell runs apart
        head = (limit - 1) // 2
        text = text[:head] + "…" + text[len(text) - (limit - 1 - head):]
    return text


def format_comparison(report: dict[str, Any]) -> str:
    """A table: one column per session; differing settings, then final and best metrics."""
    header = ["", *(s["label"] for s in report["sessions"])]
    rows: list[list[str]] = [["status", *(_cell(s["status"]) for s in report["sessions"])]]
    section_rows: list[tuple[str, list[list[str]]]] = []
    diff_rows = [[key, *(_cell(v) for v in values)] for key, values in report["differences"].items()]
    section_rows.append(("differences", diff_rows or [["(none: same config, args, script and versions)"]]))
    metric_rows = []
    for name, info in report["metrics"].items():
        metric_rows.append([f"{name} final", *(_cell(v) for v in info["final"])])
        best = [_cell(v) + (f" @{step}" if v is not None and step is not None else "")
                for v, step in zip(info["best"], info["best_step"], strict=True)]
        metric_rows.append([f"{name} best ({info['mode']})", *best])
    section_rows.append(("metrics", metric_rows or [["(no metrics recorded)"]]))

    all_rows = [header, *rows, *(r for _, rs in section_rows for r in rs if len(r) > 1)]
    widths = [max(len(r[i]) for r in all_rows if i < len(r)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        if len(row) == 1:
            return "  " + row[0]
        return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()

    out = [line(header), *(line(r) for r in rows)]
    for title, rs in section_rows:
        out.append("")
        out.append(title)
        out.extend(line(r) for r in rs)
    return "\n".join(out)
