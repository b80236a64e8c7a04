"""The in-process runtime: `run = trainctl.init()`, then log, save_checkpoint, resume, finish.

Rank-aware: under torchrun only rank 0 writes (events, checkpoints, TensorBoard); every rank
reads the resume state. `run.log` only appends to an in-memory buffer; a background thread
flushes it to the locked events log at most every `flush_interval_s`, and on checkpoint,
finish, exit and preemption.
"""

from __future__ import annotations

import atexit
import collections
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import env as env_mod
from . import resume as resume_mod
from . import sysinfo
from .errors import (
    EXIT_PREEMPTED,
    ResumeMismatchError,
    TrainctlError,
    TrainctlWarning,
    UsageError,
)
from .redact import redact_args, redact_mapping, secrets_note
from .session import Session, SessionStore, State, metric_mode, new_session_id, summarize_metrics
from .values import scalar

DEFAULT_PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
_PLAIN_NUMBERS = (float, int)
SUMMARY_INTERVAL_S = 5.0  # session.json's summary trails the events log by at most this
MAX_UNSENT_EVENTS = 100_000  # kept in memory while the events log can't be written


class CheckpointSaveError(TrainctlError, OSError):
    """A background save (save_checkpoint(..., blocking=False)) failed; raised at the next
    save_checkpoint() or an explicit finish(), carrying every failure not yet reported."""

    def __init__(self, failures: list[dict[str, Any]]) -> None:
        first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(f"background checkpoint save {first['path']} failed: {first['error']}{more}.",
                         "Free space or fix the checkpoint folder, then save again; the failure is "
                         "also in: trainctl sessions show")
        self.failures = failures


def _say(message: str) -> None:
    """One line on the script's stderr: trainctl's own news, apart from Python warnings."""
    try:
        print(f"[trainctl] {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass

_current: Run | None = None
_current_lock = threading.Lock()


def init(config: Mapping[str, Any] | None = None, project: str | None = None,
         name: str | None = None, total_steps: int | None = None,
         total_epochs: int | None = None, *, capture_rng: bool = True,
         preempt_signals: tuple[str, ...] | None = None, tensorboard: bool = True,
         flush_interval_s: float = 1.0) -> Run:
    """Join the launcher's session (TRAIN_OPS_*), or record a session of our own."""
    global _current
    with _current_lock:
        if _current is not None and not _current.finished:
            return _current
        _current = Run(config=config, project=project, name=name, total_steps=total_steps,
                       total_epochs=total_epochs, capture_rng=capture_rng,
                       preempt_signals=preempt_signals, tensorboard=tensorboard,
                       flush_interval_s=flush_interval_s)
        return _current


def current_run() -> Run | None:
    """The active Run of this process, if any."""
    return _current if _current is not None and not _current.finished else None


def requested_resume(flag: str = "--resume", argv: list[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> str | None:
    """The resume reference a process was given: `flag PATH` in argv, else TRAIN_OPS_RESUME.

    May be 'auto' (resolved by Run.resume_path); None when not resuming.
    """
    argv = sys.argv[1:] if argv is None else argv
    return resume_mod.find_resume_arg(argv, flag) or env_mod.read(environ).resume


def _file_digest(path: str) -> str | None:
    from .checkpoint import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return None


def plain_data(value: Any) -> Any:
    """Config values as JSON-able plain data (Namespace, Path, tuples, numpy scalars...)."""
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain_data(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        return plain_data(vars(value))
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except Exception:
            pass
    return str(value)


class Run:
    """One process's handle on a session. Create it with `trainctl.init()`."""

    def __init__(self, *, config: Mapping[str, Any] | None = None, project: str | None = None,
                 name: str | None = None, total_steps: int | None = None,
                 total_epochs: int | None = None, capture_rng: bool = True,
                 preempt_signals: tuple[str, ...] | None = None, tensorboard: bool = True,
                 flush_interval_s: float = 1.0) -> None:
        self.launch = env_mod.read()
        self.ranks = env_mod.rank_info()
        self.rank = self.ranks.rank
        self.world_size = self.ranks.world_size
        self.is_main = self.ranks.is_main
        self.attempt = self.launch.attempt
        self.capture_rng = capture_rng
        self.config = plain_data(dict(config)) if config is not None else {}
        self.project_config = self._load_project_config()
        self.finished = False
        self._should_stop = False
        self._checkpoint_requested = False
        self.preempted = False
        self.stop_signal: str | None = None
        self._stop_observed = False
        self._stopping = False
        self._tracked: dict[str, Any] = {}
        self._resume_cache: tuple[str, dict[str, Any]] | None = None
        self._resume_meta: dict[str, Any] | None = None
        self._auto_resume: resume_mod.AutoResume | None = None
        self._step = 0
        self._epoch: Any = None
        # a deque: append (training thread) and popleft (flusher) are atomic, so no lock and no
        # window where a swap could drop an event
        self._buffer: collections.deque[tuple[float, Any, Any, dict[str, Any]]] = collections.deque()
        self._unsent: list[dict[str, Any]] = []
        self._exit_code: Any = None
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._flush_interval_s = flush_interval_s
        self._started = time.time()
        self._last: dict[str, Any] = {}
        self._best: dict[str, dict[str, Any]] = {}
        self._checkpoints = 0
        self._last_checkpoint: str | None = None
        self._points = 0
        self._summary_at = 0.0  # monotonic time of the last summary write
        self._degraded: dict[str, Any] | None = None  # the events log can't be written
        self._dropped_events = 0
        self._save_failures: list[dict[str, Any]] = []
        self._unreported_failures: list[dict[str, Any]] = []
        self._saves_done = threading.Condition()
        self._saves_in_flight = 0
        self._tb = None
        self._tb_enabled = tensorboard
        self._tb_purge_step: int | None = None
        self._async_saver = None
        self._static_meta: dict[str, Any] | None = None
        self._exception: BaseException | None = None
        self._at_exit = False
        self.session: Session | None = None
        self.standalone = not self.launch.launched
        self.script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else None

        self.name = name
        self._launcher: tuple[int, int | None] | None = None
        self._checkpoints_before = 0  # written by earlier attempts of this session
        if self.launch.launched:
            self.session = Session(Path(self.launch.session_dir))
            try:
                recorded = self.session.read()
            except TrainctlError:
                recorded = {}
            if name is None:  # `trainctl local --name X`: checkpoints carry it for --resume auto --name X
                self.name = recorded.get("name")
            if self.attempt:
                self._continue_summary(recorded.get("summary") or {})
            # the launcher's process, to notice when it is gone (see _launcher_gone)
            self._launcher = next(((p["pid"], p.get("start_ticks")) for p in recorded.get("processes") or []
                                   if isinstance(p, dict) and p.get("role") == "launcher" and p.get("pid")), None)
            self.id = self.launch.session_id
            self.checkpoint_dir = Path(self.launch.checkpoint_dir or self.session.dir / "checkpoints")
            self.tensorboard_dir = Path(self.launch.tensorboard_dir or self.session.tensorboard_dir)
        elif self.is_main:
            store = SessionStore(self.project_config.state_dir)
            args = sys.argv[1:]
            session_id = new_session_id()
            self.session = store.create(
                session_id=session_id, checkpoint_location=str(self.project_config.checkpoint_dir / session_id),
                status=State.RUNNING, name=name, project=project, backend="local",
                script=self.script, args=redact_args(args),
                command=redact_args([sys.executable, *sys.argv]), cwd=os.getcwd(),
                started_at=time.time(),
                git=sysinfo.git_info(os.path.dirname(self.script) if self.script else os.getcwd()),
                gpus=sysinfo.gpu_description(),
                trainctl_config=self.project_config.resolved(),
                processes=[{"pid": os.getpid(), "start_ticks": sysinfo.process_start_ticks(os.getpid()),
                            "role": "script"}],
                attempts=[{"attempt": 0, "started_at": time.time()}],
            )
            self.id = self.session.id
            self.checkpoint_dir = Path(self.session.checkpoint_location() or self.project_config.checkpoint_dir / self.id)
            self.tensorboard_dir = self.session.tensorboard_dir
        else:
            # a non-zero rank without a launcher can't learn rank 0's session: it reads, never writes
            self.id = None
            self.checkpoint_dir = self.project_config.checkpoint_dir
            self.tensorboard_dir = None

        self._writes = self.is_main and self.session is not None
        if self._writes:
            fields: dict[str, Any] = {"config": redact_mapping(self.config)}
            if name:
                fields["name"] = name
            if project:
                fields["project"] = project
            if total_steps or total_epochs:
                fields["totals"] = {"steps": total_steps, "epochs": total_epochs}
            fields["runtime"] = {"pid": os.getpid(), "rank": self.rank, "world_size": self.world_size,
                                 "attempt": self.attempt, "checkpoint_signals": self._checkpoint_signal_names()}
            self.session.update(**fields)
            events: list[dict[str, Any]] = [{"kind": "status", "status": State.RUNNING, "source": "run",
                                            "attempt": self.attempt, "pid": os.getpid()}]
            if total_steps or total_epochs:
                events.append({"kind": "totals", "steps": total_steps, "epochs": total_epochs})
            self.session.append_events(events)
            self._flusher = threading.Thread(target=self._flush_loop, name="trainctl-flush",
                                             daemon=True)
            self._flusher.start()
        self._install_signal_handlers(preempt_signals)
        self._install_checkpoint_handlers()
        self._prev_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        self._prev_exit = sys.exit
        sys.exit = self._exit
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ configuration
    def _load_project_config(self) -> config_mod.Config:
        """The launcher's resolved config (TRAIN_OPS_CONFIG), else the project's trainctl.toml."""
        if self.launch.config:
            try:
                return config_mod.Config.from_resolved(self.launch.config)
            except (OSError, ValueError) as e:
                warnings.warn(f"TRAIN_OPS_CONFIG {self.launch.config} is unreadable ({e}); using trainctl.toml",
                              TrainctlWarning, stacklevel=3)
        return config_mod.load()

    @property
    def resume_flag(self) -> str:
        return self.project_config.resume_flag

    # ------------------------------------------------------------------ logging
    def log(self, values: Mapping[str, Any], step: int | None = None, epoch: Any = None) -> None:
        """Record metrics for `step` (default: one past the last) and `epoch` (recorded as given:
        values logged without one have none). Cheap: no I/O here.

        Also a safe point: after a preemption signal the emergency checkpoint is written here,
        labelled with this step (the state the script has reached when it reports it).
        """
        if step is None:
            self._step += 1
            step = self._step
        else:
            self._step = step
        if epoch is not None:
            self._epoch = epoch
        if self._writes:
            # the epoch given with these values only: one carried over from an earlier call, a
            # checkpoint or a resume would label them with an epoch the run has left
            self._buffer.append((time.time(), step, epoch, dict(values)))
        if self._should_stop and not self._stopping:
            self._on_stop_request()
        elif self._checkpoint_requested:
            self._checkpoint_on_request()

    def step(self, n: int = 1) -> int:
        """Advance the step counter by `n` (a safe point for a pending preemption)."""
        self._step += n
        if self._should_stop and not self._stopping:
            self._on_stop_request()
        elif self._checkpoint_requested:
            self._checkpoint_on_request()
        return self._step

    @property
    def current_step(self) -> int:
        return self._step

    def _take_buffer(self) -> list[dict[str, Any]]:
        buffer = self._buffer
        buffered = [buffer.popleft() for _ in range(len(buffer))]
        events = []
        attempt = self.attempt
        for t, step, epoch, values in buffered:
            for v in values.values():
                if type(v) not in _PLAIN_NUMBERS:  # tensors, numpy scalars, bools: convert here
                    values = {str(k): s for k, v in values.items() if (s := scalar(v)) is not None}
                    break
            events.append({"v": 1, "t": t, "kind": "metric", "step": step, "epoch": epoch,
                           "values": values, "attempt": attempt, "source": "run"})
        return events

    def flush(self) -> None:
        """Write buffered metrics to TensorBoard and the session log now.

        Never raises for a log that can't be written (a full disk): the events stay in memory
        (up to MAX_UNSENT_EVENTS) and are retried at the next flush; training goes on.
        """
        if not self._writes:
            return
        with self._flush_lock:
            fresh = self._take_buffer()
            if fresh:
                # TensorBoard first: its file never trails the session log
                self._write_tensorboard(fresh)
                self._update_summary(fresh)
            events = self._unsent + fresh
            if events:
                try:
                    self.session.append_events(events)
                except OSError as e:
                    self._keep_unsent(events, e)
                    return
                self._unsent = []
                if self._degraded is not None:
                    self._log_recovered()
        self._write_summary()

    def _event(self, kind: str, **fields: Any) -> None:
        """Append one event now, or keep it for the next flush when the log can't be written."""
        if not self._writes:
            return
        event = {"v": 1, "t": time.time(), "kind": kind, **fields}
        with self._flush_lock:
            if self._unsent:  # keep the order: behind what is already waiting
                self._unsent.append(event)
                return
            try:
                self.session.append_events([event])
            except OSError as e:
                self._keep_unsent([event], e)

    def _keep_unsent(self, events: list[dict[str, Any]], error: OSError) -> None:
        """The events log failed (caller holds the flush lock): keep a bounded backlog, say so once."""
        if len(events) > MAX_UNSENT_EVENTS:
            drop = len(events) - MAX_UNSENT_EVENTS
            self._dropped_events += drop
            events = events[drop:]
        self._unsent = events
        if self._degraded is None:
            reason = error.strerror or str(error)
            self._degraded = {"since": time.time(), "reason": reason}
            _say(f"warning: cannot write the session log {self.session.events_path} ({reason}). "
                 f"Training continues: metrics are kept in memory (up to {MAX_UNSENT_EVENTS}) and "
                 "written once it can be; the session is marked degraded.")
            try:
                self.session.update(degraded=dict(self._degraded))
            except OSError:
                pass  # the same disk: recorded once writes work again

    def _log_recovered(self) -> None:
        degraded, self._degraded = self._degraded or {}, None
        lost = self._dropped_events
        record = {**degraded, "until": time.time(), "dropped_events": lost}
        message = (f"the session log could not be written from {time.ctime(degraded.get('since'))} "
                   f"({degraded.get('reason')}); " + (f"{lost} event(s) were dropped" if lost
                                                       else "nothing was lost"))
        _say(f"the session log is writable again; {message.split('; ')[-1]}")
        try:
            self.session.append_events([{"kind": "warning", "message": message, "source": "run"}])
            self.session.update(degraded=record)
        except OSError:
            pass

    def _flush_loop(self) -> None:
        while not self.finished:
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception as e:  # never kill training over the log; say it once
                warnings.warn(f"trainctl could not write the session log: {e}", TrainctlWarning,
                              stacklevel=1)
                time.sleep(self._flush_interval_s)

    def _continue_summary(self, summary: dict[str, Any]) -> None:
        """A restarted attempt carries on the session's counts (list reads them mid-run)."""
        if isinstance(summary.get("checkpoints"), int):
            self._checkpoints = summary["checkpoints"]
        if isinstance(summary.get("last_checkpoint"), str):
            self._last_checkpoint = summary["last_checkpoint"]
        if isinstance(summary.get("points"), int):
            self._points = summary["points"]
        if isinstance(summary.get("last"), dict):
            self._last.update(summary["last"])
        for name, best in (summary.get("best") or {}).items():
            if isinstance(best, dict) and isinstance(best.get("value"), (int, float)) and best.get("mode") in ("min", "max"):
                self._best[name] = dict(best)

    def _update_summary(self, events: list[dict[str, Any]]) -> None:
        last, best = self._last, self._best
        self._points += len(events)
        for e in events:
            for name, value in e["values"].items():
                last[name] = value
                cur = best.get(name)
                if cur is None:
                    if math.isfinite(value):
                        best[name] = {"value": value, "step": e["step"], "epoch": e["epoch"],
                                      "mode": metric_mode(name)}
                elif (value < cur["value"] if cur["mode"] == "min" else value > cur["value"]) \
                        and math.isfinite(value):
                    cur.update(value=value, step=e["step"], epoch=e["epoch"])

    def summary(self) -> dict[str, Any]:
        """What session.json's summary holds: last/best metrics, checkpoints, failed saves."""
        failures = self._save_failures
        summary: dict[str, Any] = {
            "last": dict(self._last), "best": {k: dict(v) for k, v in self._best.items()},
            "points": self._points, "checkpoints": self._checkpoints,
            "last_checkpoint": self._last_checkpoint, "failed_saves": len(failures),
            "duration_s": round(time.time() - self._started, 3), "updated_at": time.time(),
        }
        notes = []
        if failures:
            summary["last_save_error"] = failures[-1]["error"]
            attempted = len(failures) + self._checkpoints
            notes.append(f"{len(failures)} of {attempted} checkpoint save(s) failed"
                         + ("; none succeeded" if not self._checkpoints else "")
                         + f"; last: {failures[-1]['error']}")
        if self._degraded is not None or self._dropped_events:
            notes.append("the session log could not always be written"
                         + (f"; {self._dropped_events} event(s) dropped" if self._dropped_events else ""))
        summary["warnings"] = notes
        return summary

    def _write_summary(self, *, force: bool = False) -> None:
        """Keep session.json's summary current (sessions list reads only that), cheaply."""
        now = time.monotonic()
        if not self._writes or (not force and now - self._summary_at < SUMMARY_INTERVAL_S):
            return
        self._summary_at = now
        try:
            self.session.update(summary=self.summary())
        except OSError:
            pass  # the events log says the same: degraded is reported there

    def _write_tensorboard(self, events: list[dict[str, Any]]) -> None:
        if not self._tb_enabled:
            return
        if self._tb is None:
            try:
                from .tensorboard_sink import TensorBoardSink
            except ImportError:
                self._tb_enabled = False
                return
            self._tb = TensorBoardSink(self.tensorboard_dir, purge_step=self._tb_purge_step)
        try:
            self._tb.write(events)
            self._tb.flush()  # visible now, and a kill -9 loses at most one flush interval
        except Exception as e:
            self._tb_enabled = False
            warnings.warn(f"TensorBoard logging stopped: {e}", TrainctlWarning, stacklevel=1)

    # ------------------------------------------------------------------ checkpoints
    def track(self, **objects: Any) -> Run:
        """Remember objects with state_dict()/load_state_dict() (model, optimizer, scheduler...)."""
        for key, obj in objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise UsageError(f"run.track({key}=...) needs an object with state_dict() and load_state_dict(); got {type(obj).__name__}.",
                                 "Track models, optimizers, schedulers, GradScalers; put plain values in save_checkpoint(state).")
            self._tracked[key] = obj
        return self

    def _tracked_state(self) -> dict[str, Any]:
        return {key: obj.state_dict() for key, obj in self._tracked.items()}

    def _checkpoint_path(self, epoch: Any, step: int | None, name: str | None) -> Path:
        if name:
            filename = name if name.endswith((".pt", ".pth", ".ckpt")) else f"{name}.pt"
        elif step is not None:
            filename = f"ckpt-step{int(step):08d}.pt"
        elif epoch is not None:
            filename = f"ckpt-epoch{int(epoch):04d}.pt"
        else:
            filename = f"ckpt-{self._checkpoints + 1:04d}.pt"
        return self.checkpoint_dir / filename

    def checkpoint_metadata(self, epoch: Any, step: int | None, metrics: Mapping[str, Any] | None = None,
                            name: str | None = None) -> dict[str, Any]:
        """The `trainctl` entry of a checkpoint written now (for callbacks that save through a framework)."""
        from . import checkpoint

        if self._static_meta is None:
            # facts that don't change during a run: computed once, not at every save
            self._static_meta = {
                "script_digest": _file_digest(self.script) if self.script else None,
                # what --resume auto compares with a later run's (redacted, without the resume flag)
                "args": redact_args(resume_mod.strip_resume_args(sys.argv[1:], self.resume_flag)),
                "git": sysinfo.git_info(os.path.dirname(self.script) if self.script else os.getcwd()),
                "python": sysinfo.python_version(),
                "torch": sysinfo.torch_version(), "gpus": sysinfo.gpu_description(),
            }
        meta: dict[str, Any] = {
            "session_id": self.id, "script": self.script, **self._static_meta,
            "name": name, "run_name": self.name, "epoch": epoch, "step": step,
            "metrics": {str(k): scalar(v) for k, v in (metrics or {}).items()},
            "config": redact_mapping(self.config), "world_size": self.world_size,
            "wall_time_s": round(time.time() - self._started, 3), "attempt": self.attempt,
            "tracked": sorted(self._tracked),
        }
        if self.capture_rng:
            meta["rng"] = checkpoint.capture_rng()
        return meta

    def save_checkpoint(self, state: Mapping[str, Any] | None = None, *, epoch: Any = None,
                        step: int | None = None, metrics: Mapping[str, Any] | None = None,
                        name: str | None = None, blocking: bool = True) -> Path | None:
        """Write a verified checkpoint (rank 0 only); state defaults to the tracked objects.

        With blocking=False the state is copied and written by a background thread.
        Returns the checkpoint path (None on ranks that don't write).
        """
        if epoch is not None:
            self._epoch = epoch
        if step is not None:
            self._step = step
        step = self._step if step is None else step
        epoch = self._epoch if epoch is None else epoch
        if not self.is_main:
            self._after_checkpoint_safe_point()
            return None
        if self._unreported_failures:
            failures, self._unreported_failures = self._unreported_failures, []
            raise CheckpointSaveError(failures)
        if state is None:
            if not self._tracked:
                raise UsageError("save_checkpoint() got no state and nothing is tracked.",
                                 "Pass a dict, e.g. run.save_checkpoint({'model': model.state_dict()}), or call run.track(model=model, optimizer=opt) first.")
            state = self._tracked_state()
        from . import checkpoint

        self.flush()
        path = self._checkpoint_path(epoch, step, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.checkpoint_metadata(epoch, step, metrics, name)
        if blocking:
            try:
                manifest = checkpoint.save(path, dict(state), meta)
            except Exception as e:
                self._save_failed(path, step, e, background=False)
                raise
            self.record_checkpoint(path, manifest)
        else:
            if self._async_saver is None:
                self._async_saver = checkpoint.AsyncSaver()
            with self._saves_done:
                self._saves_in_flight += 1
            try:
                future = self._async_saver.submit(path, dict(state), meta)
            except BaseException:
                self._async_finished()
                raise
            future.add_done_callback(lambda f, p=path, s=step: self._async_done(p, s, f))
        self._after_checkpoint_safe_point()
        return path

    def _async_done(self, path: Path, step: Any, future: Any) -> None:
        try:
            try:
                manifest = future.result()
            except Exception as e:
                self._save_failed(path, step, e, background=True)
                return
            self.record_checkpoint(path, manifest)
        finally:
            self._async_finished()

    def _async_finished(self) -> None:
        with self._saves_done:
            self._saves_in_flight -= 1
            self._saves_done.notify_all()

    def _wait_for_saves(self) -> None:
        """Until every background save and its bookkeeping is done (a future's result comes
        before its callbacks have run)."""
        if self._async_saver is not None:
            try:
                self._async_saver.wait()
            except Exception:
                pass  # _async_done records it
        with self._saves_done:
            self._saves_done.wait_for(lambda: self._saves_in_flight <= 0, timeout=60)

    def _save_failed(self, path: Path, step: Any, error: BaseException, *, background: bool) -> None:
        """A save failed: say it on the terminal now, record it, count it in the summary."""
        text = f"{type(error).__name__}: {error}"
        try:  # torch reports a full disk as "unexpected pos": name the likely cause
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        if free is not None and free < 64 << 20:
            text += f" (the checkpoint disk at {path.parent} has only {free >> 10} KiB free)"
        failure = {"path": str(path), "step": step if isinstance(step, int) else None,
                   "error": text, "t": time.time()}
        self._save_failures.append(failure)
        if background:
            self._unreported_failures.append(failure)
        _say(f"checkpoint save failed{' (in the background)' if background else ''}: {path}: {text}"
             + (". save_checkpoint() raises it next time; the run goes on." if background else ""))
        self._event("checkpoint_failed", path=str(path), step=failure["step"], error=text,
                    attempt=self.attempt, background=background)
        self._write_summary(force=True)

    def save_failures(self) -> list[dict[str, Any]]:
        """Every failed checkpoint save of this run so far: {path, step, error, t}."""
        return list(self._save_failures)

    def record_checkpoint(self, path: Path, manifest: dict[str, Any]) -> None:
        """A durable, manifested checkpoint exists at `path`: event, summary, retention."""
        from . import checkpoint

        self._checkpoints += 1
        self._last_checkpoint = str(path)
        meta = manifest.get("meta", {})
        self._event("checkpoint", path=str(path), step=meta.get("step"),
                    epoch=meta.get("epoch"), metrics=meta.get("metrics"),
                    bytes=manifest.get("bytes"), digest=manifest.get("digest"),
                    attempt=self.attempt)
        self._write_summary(force=True)
        protected = [self._resume_cache[0]] if self._resume_cache else []
        try:
            removed = checkpoint.apply_retention(self.checkpoint_dir, self.project_config,
                                                 protected=protected)
        except Exception as e:
            removed = []
            self._event("warning", message=f"checkpoint retention failed: {e}")
        if removed:
            self._event("retention", removed=[str(p) for p in removed])

    def _after_checkpoint_safe_point(self) -> None:
        if self._should_stop and not self._stopping and not self._stop_observed:
            # a checkpoint was just written: stop here without another one
            self._stop(emergency=False)

    def resume_path(self) -> str | None:
        """The checkpoint this run resumes from: --resume PATH, TRAIN_OPS_RESUME, or None."""
        ref = requested_resume(self.resume_flag)
        if not ref:
            return None
        if ref == resume_mod.AUTO:
            if self._auto_resume is None:  # resolved (and said) once
                found = resume_mod.resolve_auto(
                    self.project_config.checkpoint_dir, self.project_config.state_dir, script=self.script,
                    name=self.name, args=sys.argv[1:], config=self.config, resume_flag=self.resume_flag)
                for p, why in found.skipped:
                    warnings.warn(f"skipping checkpoint {p}: {why}", TrainctlWarning, stacklevel=2)
                refusal = found.refusal(in_message=True)
                if refusal is not None:
                    raise refusal
                if self.is_main:
                    for line in found.lines():
                        print(f"[trainctl] {line}", file=sys.stderr, flush=True)
                self._auto_resume = found
            return str(self._auto_resume.path) if self._auto_resume.path else None
        return ref

    def resume_state(self, *, trust: bool = False) -> dict[str, Any] | None:
        """The state to resume from (loaded with weights_only=True unless trust=True), or None."""
        path = self.resume_path()
        if path is None:
            return None
        if self._resume_cache and self._resume_cache[0] == path:
            return self._resume_cache[1]
        from . import checkpoint

        checkpoint.require_valid(path)
        state = checkpoint.load(path, trust=trust)
        self._resume_cache = (path, state)
        meta = state.get(checkpoint.META_KEY) if isinstance(state, dict) else None
        self._resume_meta = meta if isinstance(meta, dict) else {}
        step = self._resume_meta.get("step")
        self.mark_resumed(path, step if isinstance(step, int) else None)
        if isinstance(step, int):
            self._step = step
        if self._resume_meta.get("epoch") is not None:
            self._epoch = self._resume_meta.get("epoch")
        return state

    def mark_resumed(self, path: str | None, step: int | None) -> None:
        """This attempt continues from `path` at `step`: later metrics of earlier attempts are void.

        Writes the `supersede` event and makes TensorBoard drop points from step+1 on.
        """
        if step is not None:
            self._tb_purge_step = step + 1
            self._event("supersede", attempt=self.attempt, from_step=step + 1, resume=path)
        if self._writes:
            try:
                self.session.update(resume_from=path)
            except OSError:
                pass

    def restore(self, *, trust: bool = False, restore_rng: bool = True) -> dict[str, Any] | None:
        """Load tracked objects in place from the resume checkpoint; return its metadata.

        Returns None (and changes nothing) when there is nothing to resume from.
        """
        state = self.resume_state(trust=trust)
        if state is None:
            return None
        from . import checkpoint

        missing = [k for k in self._tracked if k not in state]
        if missing:
            holds = ", ".join(str(k) for k in state if k != checkpoint.META_KEY) or "nothing"
            raise ResumeMismatchError(
                f"{self.resume_path()} holds {holds}, not the tracked {', '.join(missing)}",
                "Resume from a checkpoint this script wrote (trainctl checkpoint list), or load this one "
                "yourself: state = run.resume_state(); model.load_state_dict(state)")
        for key, obj in self._tracked.items():
            obj.load_state_dict(state[key])
        meta = dict(self._resume_meta or {})
        if restore_rng and meta.get("rng"):
            checkpoint.restore_rng(meta["rng"])
        return meta

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self, names: tuple[str, ...] | None) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if names is None:
            names = tuple(self.project_config.get("signals", "preempt") or DEFAULT_PREEMPT_SIGNALS)
        self._prev_handlers: dict[int, Any] = {}
        for sig_name in names:
            signum = getattr(signal, str(sig_name).upper(), None)
            if signum is None:
                continue
            try:
                self._prev_handlers[signum] = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):
                continue

    def _on_signal(self, signum: int, frame: Any) -> None:
        # flags only (and, when the launcher is gone, two dup2s): the work happens at the next safe point
        if self._launcher_gone():
            self._write_output_to_log()
        self._should_stop = True
        self.preempted = True
        self.stop_signal = signal.Signals(signum).name
        prev = self._prev_handlers.get(signum)
        if callable(prev) and prev not in (signal.SIG_DFL, signal.SIG_IGN):
            prev(signum, frame)

    def _ignore_further_stops(self) -> None:
        """The stop is under way (emergency checkpoint, then exit 75): later stop signals are
        ignored. While the interpreter shuts down, Python gives its handlers back to the
        default, and one more SIGTERM there killed the script by the signal, so the launcher
        read a kill where a preemption with its checkpoint had happened."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in getattr(self, "_prev_handlers", {}):
            if signal.getsignal(signum) == self._on_signal:
                try:
                    signal.signal(signum, signal.SIG_IGN)
                except (ValueError, OSError):
                    continue

    @property
    def should_stop(self) -> bool:
        """True once a preemption signal arrived; a script that reads it stops on its own terms."""
        if self._should_stop:
            self._stop_observed = True
        return self._should_stop

    def request_stop(self) -> None:
        """Act as if a preemption signal arrived (e.g. when another rank got one)."""
        self._should_stop = True
        self.preempted = True
        self.stop_signal = self.stop_signal or "requested"

    def checkpoint_if_requested(self) -> None:
        """A safe point: when a preemption signal arrived, checkpoint the tracked state and exit;
        when a checkpoint signal arrived, checkpoint it and return."""
        if self._should_stop and not self._stopping:
            self._stop(emergency=True)
        elif self._checkpoint_requested:
            self._checkpoint_on_request()

    def _checkpoint_signal_names(self) -> list[str]:
        preempt = {str(n).upper() for n in (self.project_config.get("signals", "preempt") or DEFAULT_PREEMPT_SIGNALS)}
        names = [str(n).upper() for n in self.project_config.get("signals", "checkpoint") or []]
        return [n for n in dict.fromkeys(names) if n not in preempt and hasattr(signal, n)]

    def _install_checkpoint_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self._checkpoint_signal_names():
            try:
                self._prev_handlers[getattr(signal, name)] = signal.signal(getattr(signal, name),
                                                                           self._on_checkpoint_signal)
            except (ValueError, OSError, AttributeError):
                continue

    def _on_checkpoint_signal(self, signum: int, frame: Any) -> None:
        self._checkpoint_requested = True  # a flag only: the checkpoint is written at the next safe point

    def _checkpoint_on_request(self) -> None:
        self._checkpoint_requested = False
        if not self._tracked:
            self._event("warning", message="checkpoint requested, but nothing is tracked "
                                           "(use run.track(model=..., optimizer=...))")
            return
        try:
            self.save_checkpoint(name=f"ckpt-step{int(self._step):08d}-requested")
        except Exception as e:
            self._event("warning", message=f"requested checkpoint failed: {e}")

    def _on_stop_request(self) -> None:
        if self._stop_observed and not self._tracked:
            return  # the script watches run.should_stop and stops on its own
        self._stop(emergency=True)

    def _stop(self, *, emergency: bool) -> None:
        self._stopping = True
        self._ignore_further_stops()
        if emergency and self._tracked and self.is_main:
            # a failed background save is recorded already: it must not cost the emergency one
            self._wait_for_saves()
            self._unreported_failures = []
            try:
                path = self.save_checkpoint(name=f"ckpt-step{int(self._step):08d}-emergency")
                self._event("warning", message=f"{self.stop_signal}: emergency checkpoint {path}")
            except Exception as e:
                self._event("warning", message=f"emergency checkpoint failed: {e}")
        elif emergency and self._writes:
            self._event("warning", message=f"{self.stop_signal}: stopping without a checkpoint (nothing is tracked; use run.track(model=..., optimizer=...))")
        self.finish(status=State.PREEMPTED)
        sys.exit(EXIT_PREEMPTED)

    # ------------------------------------------------------------------ without a launcher
    def _launcher_gone(self) -> bool:
        """The launcher that started this process has died (killed, out of memory): its
        parent-death signal is what stops us, and nobody else will record how the run ends."""
        return self._launcher is not None and not sysinfo.pid_alive(*self._launcher)

    def _write_output_to_log(self) -> None:
        """The launcher read our stdout and stderr; with it gone, a print would fail (a closed
        pipe): send both to the session's output.log from now on."""
        if self.session is None or getattr(self, "_output_redirected", False):
            return
        self._output_redirected = True
        try:
            fd = os.open(self.session.output_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            for target in (1, 2):
                os.dup2(fd, target)
            os.close(fd)
        except OSError:
            pass

    def _record_end_without_launcher(self, status: str, error: str | None) -> None:
        """What the launcher would have recorded at the end: status, summary, how to resume."""
        assert self.session is not None
        self._write_output_to_log()
        try:
            data = self.session.read()
        except TrainctlError:
            data = {}
        if data.get("stop_request") and status == State.PREEMPTED:
            status = State.STOPPED  # `trainctl sessions stop` asked for this end
        checkpoints = [e for e in self.session.iter_events(("checkpoint",))]
        newest = self._last_checkpoint or (checkpoints[-1].get("path") if checkpoints else None)
        # this attempt's counts (failed saves, warnings), then the whole session's from its log
        summary = {**self.summary(), **summarize_metrics(self.session.metrics()),
                   "checkpoints": len(checkpoints), "last_checkpoint": newest}
        for note in summary["warnings"]:
            _say(f"warning: {note}")
        now = time.time()
        code = EXIT_PREEMPTED if status == State.PREEMPTED else (0 if status == State.COMPLETED else None)
        attempts = data.get("attempts") or []
        if attempts and isinstance(attempts[-1], dict) and not attempts[-1].get("ended_at"):
            attempts[-1].update(ended_at=now, status=status, exit_code=code, signal=self.stop_signal)
        try:
            with self._flush_lock:
                if self._unsent:  # a last try for what the full disk held back
                    self.session.append_events(self._unsent)
                    self._unsent = []
            self.session.update(status=status, ended_at=now, exit_code=code, signal=self.stop_signal,
                                error=error, summary=summary, attempts=attempts)
            self.session.event("status", status=status, source="run", attempt=self.attempt, launcher="gone")
        except OSError as e:
            _say(f"could not record the end of session {self.id} ({e.strerror or e}); "
                 "`trainctl sessions list` will show it as crashed.")
        script = data.get("script") or self.script or "SCRIPT"
        again = resume_mod.resume_command(script, list(data.get("args") or []), newest, self.resume_flag)
        self._write_output_to_log()
        note = secrets_note(again)
        print(f"[trainctl] the launcher is gone: session {self.id} {status}"
              + (f" after an emergency checkpoint {newest}" if newest else "") + f".\n"
              f"[trainctl] {'resume' if newest else 'run again'}: {again}"
              + (f"\n[trainctl] ({note})" if note else ""), file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ lifecycle
    def _excepthook(self, exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        self._exception = exc
        self._prev_excepthook(exc_type, exc, tb)

    def _exit(self, code: Any = None) -> None:
        # sys.exit raises SystemExit, which no excepthook sees: remember the code for _atexit
        self._exit_code = code
        self._prev_exit(code)

    def _atexit(self) -> None:
        if sys.exit == self._exit:
            sys.exit = self._prev_exit
        if self.finished:
            return
        self._at_exit = True
        exc, code = self._exception, self._exit_code
        if isinstance(exc, KeyboardInterrupt):
            self.finish(status=State.KILLED, error="KeyboardInterrupt")
        elif exc is not None:
            self.finish(status=State.FAILED, error=f"{type(exc).__name__}: {exc}")
        elif self.preempted:
            self.finish(status=State.PREEMPTED)
        elif code not in (None, 0):
            self.finish(status=State.FAILED, error=f"sys.exit({code!r})")
        else:
            self.finish()

    def finish(self, status: str | None = None, *, error: str | None = None) -> None:
        """Flush everything and record how the run ended (also done at exit).

        Waits for background saves first. When one failed and no save_checkpoint() call has
        raised it yet, an explicit finish() of a completing run raises CheckpointSaveError (the
        run is then recorded as failed); at exit the run ends `completed` with the failure in
        its summary's warnings and on stderr.
        """
        if self.finished:
            return
        self._wait_for_saves()
        status = status or (State.PREEMPTED if self.preempted else State.COMPLETED)
        if status == State.PREEMPTED:
            self._ignore_further_stops()
        if status == State.COMPLETED and self._unreported_failures and not self._at_exit:
            failures, self._unreported_failures = self._unreported_failures, []
            raise CheckpointSaveError(failures)
        self._unreported_failures = []
        if self._async_saver is not None:
            try:
                self._async_saver.close()  # also frees its staging buffers
            except Exception:
                pass  # _async_done recorded any failure; the session must still end
        try:
            self.flush()
        finally:
            self.finished = True
            self._wake.set()
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception:
                pass
        if not self._writes:
            return
        event: dict[str, Any] = {"status": status, "source": "run", "attempt": self.attempt}
        if error:
            event["error"] = error
        if self.stop_signal:
            event["signal"] = self.stop_signal
        if not self.standalone and self._launcher_gone():
            self._record_end_without_launcher(status, error)
            return
        self._event("status", **event)
        summary = self.summary()
        for note in summary["warnings"]:
            _say(f"warning: {note}")
        fields: dict[str, Any] = {"summary": summary}
        if self.standalone:  # under a launcher, the launcher records how the session ended
            fields.update(status=status, ended_at=time.time(), exit_code=None, error=error)
        try:
            with self._flush_lock:
                if self._unsent:  # a last try for what the full disk held back
                    self.session.append_events(self._unsent)
                    self._unsent = []
            self.session.update(**fields)
        except OSError as e:
            _say(f"could not record the end of session {self.id} ({e.strerror or e}); "
                 "`trainctl sessions list` will show it as crashed.")

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish(status=State.KILLED)
        elif issubclass(exc_type, SystemExit):
            if not self.finished:
                self.finish(status=State.PREEMPTED if self.preempted else
                            (State.COMPLETED if not exc.code else State.FAILED))
        else:
            self.finish(status=State.FAILED, error=f"{exc_type.__name__}: {exc}")

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, rank={self.rank}, attempt={self.attempt})"
