"""Where a run stands: progress, rate, ETA, metric trends, checkpoints and warnings.

Works from a session (its events log, with times) or from a bare log file (parsed with
MetricParser; times come from timestamps at the start of lines, or from watching it grow).
`Monitor.refresh()` reads only what is new, so `--follow` stays cheap on long runs.
"""

from __future__ import annotations

import os
import re
import shlex
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import metrics
from ..errors import NotFoundError, UsageError
from ..formatting import json_safe
from ..metrics import MetricParser
from ..session import (
    TERMINAL,
    Session,
    State,
    effective_metrics,
    effective_status,
    metric_mode,
    read_events,
)

ENDED_BADLY = (TERMINAL - {State.COMPLETED}) | {State.CRASHED}  # a resume command is shown
MAX_ROWS = 50  # checkpoints a snapshot lists
_LOG_TIME = re.compile(r"^\[?(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})")


@dataclass
class Settings:
    """The [monitor] knobs, plus the free-space floor for the disk warning."""

    stall_s: float = 600.0
    overdue_s: float = 3600.0
    window: int = 50
    min_free_bytes: float = 1 << 30
    patterns: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        return cls(stall_s=float(config.get("monitor", "stall_minutes")) * 60,
                   overdue_s=float(config.get("monitor", "checkpoint_overdue_minutes")) * 60,
                   window=max(2, int(config.get("monitor", "window"))),
                   min_free_bytes=float(config.get("", "min_free_gb")) * (1 << 30),
                   patterns=list(config.get("metrics", "patterns")))


def open_log(path: str | os.PathLike[str]) -> Path:
    """Check a log file is there and is text; NotFoundError / UsageError otherwise."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"log file {str(p)!r} does not exist.",
                            "Give the path of a file the script's output was written to.")
    if p.is_dir():
        raise UsageError(f"{str(p)!r} is a folder, not a log file.",
                         "Pass the log file itself, e.g. --log runs/train.log")
    try:
        with open(p, "rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise UsageError(f"cannot read log file {str(p)!r}: {e.strerror or e}.",
                         "Check the file's permissions.") from e
    if b"\x00" in head:
        raise UsageError(f"{str(p)!r} looks binary, not a text log.",
                         "Pass the text file the script's output went to (not a checkpoint or "
                         "TensorBoard event file).")
    return p


def _line_time(line: str) -> float | None:
    m = _LOG_TIME.match(line)
    if not m:
        return None
    try:
        return time.mktime(time.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H:%M:%S"))
    except (ValueError, OverflowError):
        return None


class Monitor:
    """Follows one session or one log file."""

    def __init__(self, *, session: Session | None = None, log: Path | None = None,
                 checkpoint_dir: Path | None = None, settings: Settings | None = None,
                 follow: bool = False) -> None:
        assert session is not None or log is not None
        self.session = session
        self.log = log
        self.checkpoint_dir = checkpoint_dir
        self.settings = settings or Settings()
        self.follow = follow
        self.parser = MetricParser(self.settings.patterns)
        self.points: list[dict[str, Any]] = []  # {"t", "step", "epoch", "values"}
        self.events: list[dict[str, Any]] = []
        self.parsed_totals: dict[str, int] = {}
        self._offset = 0
        self._partial = b""
        self._first_read = True
        self._log_grew_at: float | None = None
        self._checkpoint_cache: dict[str, Any] = {}
        self.data: dict[str, Any] = {}

    # -- reading --------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read what was appended since the last call."""
        if self.session is not None:
            self.data = self.session.read()
            # a torn last line is left for the next read; a malformed one is warned about once
            new, self._offset = read_events(self.session.events_path, offset=self._offset)
            self.events.extend(new)
            if not any(e.get("kind") == "metric" for e in self.events) and self.session.output_log.exists():
                # no metric events (parsing off, or an old session): read the output itself
                self.log = self.session.output_log
        if self.log is not None and (self.session is None or not self._metric_events()):
            self._read_log()

    def _metric_events(self) -> list[dict[str, Any]]:
        found = effective_metrics([e for e in self.events if e.get("kind") in ("metric", "supersede")])
        # a script using run.log() and printing its losses too: the logged ones are the record
        logged = [e for e in found if e.get("source") != "output"]
        return logged or found

    def _read_log(self) -> None:
        assert self.log is not None
        try:
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        if not data:
            return
        now = time.time()
        self._log_grew_at = now
        self._offset += len(data)
        data = self._partial + data
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        self._partial, data = data[cut:], data[:cut]
        if len(self._partial) > 1 << 20:
            data, self._partial = data + self._partial, b""
        stamp = None if self._first_read else now  # lines read live arrived about now
        self._first_read = False
        for raw in data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
            if not raw:
                continue
            line = raw.decode("utf-8", "replace")
            parsed = self.parser.feed(line)
            if parsed is None:
                continue
            for key, total in (("total_steps", "steps"), ("total_epochs", "epochs")):
                if parsed.get(key):
                    self.parsed_totals[total] = parsed[key]
            if parsed["values"] or parsed.get("step") is not None or parsed.get("epoch") is not None:
                self.points.append({"t": _line_time(line) or stamp, "step": parsed.get("step"),
                                    "epoch": parsed.get("epoch"), "values": parsed["values"]})

    def parsed_lines(self) -> Any:
        """Each parsed line of the log as (line number, text, parsed dict): for testing patterns."""
        assert self.log is not None
        with open(self.log, "rb") as f:
            for number, raw in enumerate(f, 1):
                for part in raw.rstrip(b"\r\n").split(b"\r"):
                    line = part.decode("utf-8", "replace")
                    parsed = self.parser.feed(line)
                    if parsed is not None:
                        yield number, line, parsed

    # -- analysis -------------------------------------------------------------------------------

    def _points(self) -> list[dict[str, Any]]:
        if self.session is not None:
            events = self._metric_events()
            if events:
                return [{"t": e.get("t"), "step": e.get("step"), "epoch": e.get("epoch"),
                         "values": e.get("values") or {}} for e in events]
        return self.points

    def _totals(self) -> dict[str, int | None]:
        totals: dict[str, int | None] = {"steps": None, "epochs": None}
        sources: list[dict[str, Any]] = [self.parsed_totals]
        if self.session is not None:
            args = self.data.get("args") or []
            sources.insert(0, metrics.infer_totals(args if isinstance(args, list) else []))
            sources.insert(0, self.data.get("totals") or {})
            for e in reversed(self.events):
                if e.get("kind") == "totals":
                    sources.insert(0, e)
                    break
        for key in totals:
            for source in sources:
                value = source.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                    totals[key] = int(value)
                    break
        return totals

    def snapshot(self, now: float | None = None, *, spark_width: int = 24) -> dict[str, Any]:
        """Everything monitor shows, as plain JSON data."""
        now = time.time() if now is None else now
        settings = self.settings
        points = self._points()
        status = effective_status(self.data) if self.session is not None else None
        live = status is State.RUNNING if self.session is not None else self.follow

        # progress: the newest metric says where the run is (epochs counted from 1)
        totals = self._totals()
        timed = [p for p in points if metrics.is_finite(p.get("t"))]
        model = metrics.EpochModel()
        for p in points:
            model.observe(p.get("step"), p.get("epoch"))
        recent = [(p.get("t"), p.get("step"), p.get("epoch")) for p in _latest_attempt(points)]
        where = metrics.run_progress(recent, total_steps=totals["steps"], total_epochs=totals["epochs"],
                                     model=model, finished=status is State.COMPLETED,
                                     window=settings.window)
        step, epoch, fraction, eta = where["step"], where["epoch"], where["fraction"], where["eta_s"]
        step_rate = metrics.rate(_trailing_run(timed, "step")[-settings.window:])
        epoch_rate = metrics.rate(_trailing_run(timed, "epoch")[-settings.window:])
        if status is not None and status is not State.RUNNING:
            eta = None
        last_metric_t = timed[-1]["t"] if timed else None
        started = self.data.get("started_at") or self.data.get("created_at")
        ended = self.data.get("ended_at")
        progress = {
            "step": step, "total_steps": totals["steps"], "epoch": epoch,
            "epoch_logged": where["epoch_logged"], "total_epochs": totals["epochs"],
            "steps_per_epoch": where["steps_per_epoch"],
            "total_steps_estimated": where["total_steps_estimated"],
            "fraction": fraction,
            "step_rate": step_rate, "epoch_rate": epoch_rate, "eta_s": eta,
            "eta_at": (last_metric_t + eta) if eta is not None and last_metric_t else None,
            "elapsed_s": ((ended or now) - started) if started else None,
        }

        # metric trends
        series: dict[str, list[float]] = {}
        steps_of: dict[str, list[Any]] = {}
        for p in points:
            for name, value in p["values"].items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue  # a string where a number belongs: not plottable
                series.setdefault(name, []).append(float(value))
                steps_of.setdefault(name, []).append(p.get("step"))
        table: dict[str, Any] = {}
        for name, values in series.items():
            mode = metric_mode(name)
            t = metrics.trend(values, mode=mode, window=settings.window)
            best_step = steps_of[name][t["best_index"]] if t["best_index"] is not None else None
            table[name] = {"last": json_safe(t["last"]), "best": json_safe(t["best"]),
                           "best_step": best_step, "mode": mode, "slope": t["slope"],
                           "direction": t["direction"], "points": t["points"],
                           "sparkline": metrics.sparkline(values[-settings.window * 4:], spark_width)}
        primary = metrics.primary_metric(list(series))

        # checkpoints and disk
        checkpoints = self._checkpoints(now)
        disk = None
        folder = checkpoints.get("dir")
        if folder:
            disk = metrics.disk_usage(folder)

        # warnings
        resume = self.resume_command() if status in ENDED_BADLY else None
        found: list[dict[str, str] | None] = [metrics.crashed_warning(status, resume),
                                              metrics.nonfinite_warning(series)]
        if primary is not None:
            mode = metric_mode(primary)
            diverging = metrics.divergence_warning(primary, series[primary], mode=mode,
                                                   window=settings.window)
            found.append(diverging)
            if diverging is None:
                found.append(metrics.plateau_warning(primary, series[primary], mode=mode,
                                                     window=settings.window))
        last_output_t = self._last_output_t()
        if checkpoints.get("torn"):
            found.append({"kind": "checkpoint_torn", "message": checkpoints["torn"]})
        if not live and self.session is None and checkpoints.get("source") == "scan" and last_output_t \
                and now - last_output_t < settings.stall_s:
            # a run trainctl did not start (--log FILE --checkpoint DIR): its log still grows
            newest = checkpoints.get("newest") or {}
            found.append(metrics.checkpoint_overdue_warning(now=now, newest_t=newest.get("t"), started_t=None,
                                                            overdue_s=settings.overdue_s))
        if live:
            found.append(metrics.stall_warning(now=now, last_output_t=last_output_t,
                                               last_metric_t=last_metric_t,
                                               stall_s=settings.stall_s))
            found.extend(_silent_nodes(self.data, now))
            newest = checkpoints.get("newest") or {}
            found.append(metrics.checkpoint_overdue_warning(
                now=now, newest_t=newest.get("t"), started_t=started or (None if not self.follow else self._watch_start(now)),
                overdue_s=settings.overdue_s))
        found.append(metrics.disk_warning(disk, min_free_bytes=settings.min_free_bytes))
        found.append(metrics.save_failed_warning(checkpoints["failed"], checkpoints["last_error"]))

        return {
            "session": self.session.id if self.session is not None else None,
            "name": self.data.get("name"),
            "log": str(self.log) if self.log is not None else None,
            "status": status,
            "now": now,
            "last_output_age_s": (now - last_output_t) if last_output_t else None,
            "progress": progress,
            "primary": primary,
            "metrics": table,
            "checkpoints": checkpoints,
            "disk": disk,
            "resume_command": resume,
            "warnings": [w for w in found if w],
        }

    def resume_command(self, cwd: str | None = None) -> str | None:
        """The command that continues this session, complete and runnable as printed: from its
        newest checkpoint that is still there, else the same command again; from the folder the
        run ran in (its config and relative paths) when that is not `cwd`."""
        from ..resume import resume_command

        data = self.data
        script = data.get("script")
        if self.session is None or not isinstance(script, str):
            return None
        flag = str((data.get("trainctl_config") or {}).get("resume_flag") or "--resume")
        command = resume_command(script, [str(a) for a in data.get("args") or []],
                                 self._resume_checkpoint(), flag)
        run_dir = data.get("cwd")
        if isinstance(run_dir, str) and os.path.realpath(run_dir) != os.path.realpath(cwd or os.getcwd()):
            command = f"cd {shlex.quote(run_dir)} && {command}"
        return command

    def _resume_checkpoint(self) -> str | None:
        from ..checkpoint import manifest_path

        for e in reversed([e for e in self.events if e.get("kind") == "checkpoint"]):
            path = e.get("path")
            if isinstance(path, str) and path and Path(path).is_file() and manifest_path(path).is_file():
                return path
        folder = self._checkpoint_dir()
        if folder is None:
            return None
        from .script_checkpoints import describe_folder

        report = describe_folder(folder, now=time.time(), overdue_s=0, cache=self._checkpoint_cache)
        return next((str(r.path) for r in report.rows if r.status != "incomplete"), None)

    def _watch_start(self, now: float) -> float:
        if not hasattr(self, "_watch_t"):
            self._watch_t = now
        return self._watch_t

    def _last_output_t(self) -> float | None:
        times = []
        for path in (self.log, self.session.output_log if self.session is not None else None,
                     self.session.events_path if self.session is not None else None):
            if path is not None:
                try:
                    times.append(path.stat().st_mtime)
                except OSError:
                    pass
        return max(times) if times else None

    def _checkpoint_dir(self) -> Path | None:
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if self.session is None:
            return None
        location = self.session.checkpoint_location(self.data)
        return Path(location) if location and "://" not in location else None

    def _checkpoints(self, now: float) -> dict[str, Any]:
        found = self._checkpoints_found(now)
        failed = [e for e in self.events if e.get("kind") == "checkpoint_failed"]
        found["failed"] = len(failed)
        found["last_error"] = failed[-1].get("error") if failed else None
        return found

    def _checkpoints_found(self, now: float) -> dict[str, Any]:
        folder = self._checkpoint_dir()
        events = [e for e in self.events if e.get("kind") == "checkpoint"]
        if events and self.checkpoint_dir is None:
            e = events[-1]
            path = e.get("path")
            newest = {"path": path, "step": e.get("step"), "epoch": e.get("epoch"),
                      "metrics": e.get("metrics") or {}, "bytes": e.get("bytes"),
                      "t": e.get("t"), "age_s": (now - e["t"]) if e.get("t") else None,
                      "exists": bool(path) and Path(path).exists()}
            if folder is None and path:
                folder = Path(path).parent
            return {"source": "events", "count": len(events), "newest": newest,
                    "dir": str(folder) if folder else None}
        if folder is None:
            return {"source": None, "count": 0, "newest": None, "dir": None}
        # what each file holds (step, metrics; whole or torn), read without loading tensors and
        # again only when it changed
        from .script_checkpoints import describe_folder

        report = describe_folder(folder, now=now, overdue_s=0, cache=self._checkpoint_cache)
        whole = [r for r in report.rows if r.status != "incomplete"]
        newest = None
        if whole:
            r = whole[0]
            newest = {"path": r.path, "display": r.display, "step": r.step, "step_name": r.step_name,
                      "epoch": r.epoch, "metrics": r.metrics, "bytes": r.bytes, "t": r.written_at,
                      "age_s": r.age_s, "exists": True}
        rows = [{"path": r.path, "display": r.display, "status": r.status, "step": r.step,
                 "step_name": r.step_name, "epoch": r.epoch, "metrics": r.metrics, "bytes": r.bytes,
                 "t": r.written_at, "age_s": r.age_s, "problem": r.problem} for r in report.rows[:MAX_ROWS]]
        return {"source": "scan", "count": len(whole), "newest": newest, "dir": str(folder),
                "rows": rows, "torn": report.torn}


def _silent_nodes(data: dict[str, Any], now: float) -> list[dict[str, str]]:
    """Nodes of a running multi-node job that stopped saying they are alive."""
    from ..backends.torchrun import NODE_SILENT_S
    from ..formatting import format_duration

    found = []
    for key, node in (data.get("nodes") or {}).items():
        if not isinstance(node, dict) or node.get("state") in {s.value for s in TERMINAL}:
            continue
        heard = node.get("heartbeat_at")
        if isinstance(heard, (int, float)) and now - heard > NODE_SILENT_S:
            ranks = node.get("ranks") or []
            where = f", ranks {ranks[0]}-{ranks[1]}" if len(ranks) == 2 else ""
            found.append({"kind": "node_silent",
                          "message": f"node {key} ({node.get('host')}{where}) has not reported for "
                                     f"{format_duration(now - heard)}: its machine or its trainctl may be gone; "
                                     "the job stops when its collectives fail, then restarts on every node."})
    return found


def _latest_attempt(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points since the step last went back (a restart resumed from an earlier step)."""
    start, last = 0, None
    for i, p in enumerate(points):
        step = p.get("step")
        if isinstance(step, int):
            if last is not None and step < last:
                start = i
            last = step
    return points[start:]


def _trailing_run(points: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(t, position) of the newest stretch where `key` never went back (the latest attempt)."""
    run: list[tuple[float, float]] = []
    for p in points:
        value = p.get(key)
        if not metrics.is_finite(value):
            continue
        if run and value < run[-1][1]:
            run = []
        run.append((p["t"], value))
    return run


# -- text -------------------------------------------------------------------------------------


def render(snap: dict[str, Any], width: int = 80) -> list[str]:
    """The snapshot for a person, each line at most `width` characters."""
    width = max(20, width)
    lines: list[str] = []
    head = f"session {snap['session']}" if snap["session"] else f"log {snap['log']}"
    if snap.get("name"):
        head += f" ({snap['name']})"
    if snap["status"]:
        head += f"  {snap['status']}"
    p = snap["progress"]
    if p.get("elapsed_s") is not None:
        head += f"  {metrics.format_duration(p['elapsed_s'])} elapsed"
    lines.append(head)

    parts = []
    if p["epoch"] is not None:
        e = metrics.format_value(p["epoch"])
        parts.append(f"epoch {e}/{p['total_epochs']}" if p["total_epochs"] else f"epoch {e}")
    if p["step"] is not None:
        total = p["total_steps"] or p.get("total_steps_estimated")
        parts.append(f"step {p['step']}/{total}" if total else f"step {p['step']}")
    if p["fraction"] is not None:
        parts.append(f"({100 * p['fraction']:.0f}%)")
    parts += metrics.format_pace(p["step_rate"], p["epoch_rate"], p["eta_s"])
    lines.append("progress  " + (" ".join(parts) if parts else "no step or epoch reported yet"))

    if not snap["metrics"]:
        lines.append("metrics   none yet")
    names = list(snap["metrics"])
    if snap["primary"] in names:
        names.remove(snap["primary"])
        names.insert(0, snap["primary"])
    label_w = min(max((len(n) for n in names), default=6), 18)
    for name in names[:12]:
        m = snap["metrics"][name]
        best = f"best {metrics.format_value(m['best'])}" if m["best"] is not None else "best -"
        if m["best_step"] is not None:
            best += f" @{m['best_step']}"
        slope = f"slope {m['slope']:+.2e}" if m["slope"] is not None else ""
        text = f"{name[:label_w]:<{label_w}}  {metrics.format_value(m['last']):>8}  {best}  {slope}"
        room = width - len(text) - 2
        if room >= 8:
            text += "  " + m["sparkline"][-room:]
        lines.append(text)

    c = snap["checkpoints"]
    if c["count"]:
        n = c["newest"] or {}
        name = n.get("display") or os.path.basename(n.get("path") or "")
        where = f"{name} {n.get('step_name') or 'step'} {n['step']}" if n.get("step") is not None else name
        at = ", ".join(f"{k} {metrics.format_value(v)}" for k, v in list((n.get("metrics") or {}).items())[:3])
        lines.append(f"checkpoints {c['count']}, newest {where} "
                     f"({metrics.format_duration(n.get('age_s'))} ago){': ' + at if at else ''}")
    else:
        lines.append("checkpoints none" + (f" in {c['dir']}" if c.get("dir") else ""))
    for r in (c.get("rows") or [])[1:6] if c["count"] > 1 or len(c.get("rows") or []) > 1 else []:
        step = f"  {r['step_name']} {r['step']}" if r.get("step") is not None else ""
        state = "  incomplete" if r["status"] == "incomplete" else ""
        lines.append(f"  {r['display']}{step}  {metrics.format_duration(r['age_s'])} ago{state}")
    lines = [line if len(line) <= width else line[:width - 1] + "…" for line in lines]
    store = snap.get("storage")
    if store:  # a session read from storage: where (never cut: it is copied), what its writer last said
        beat = store.get("heartbeat_age_s")
        state = ("ended" if store.get("ended") else "released" if store.get("released")
                 else f"heartbeat {metrics.format_duration(beat)} ago" if beat is not None else "no heartbeat yet")
        lines.append(f"storage   {store['uri']} ({state})")
    if snap.get("resume_command") and snap["status"] != State.CRASHED:  # crashed: in its warning
        lines.append(f"resume    {snap['resume_command']}")  # never cut: it must run as printed
    for w in snap["warnings"]:  # warnings are wrapped, never cut
        text, command = w["message"], w.get("command")
        if command and text.endswith(command):  # a command goes on a line of its own, whole
            text = text[:-len(command)].rstrip()
        lines += textwrap.wrap(f"! {w['kind']}: {text}", width, subsequent_indent="  ")
        if command:
            lines.append(f"  {command}")
    return lines
