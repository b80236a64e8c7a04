"""Run a spec as one session on any backend: attempts, restarts with resume, the summary.

This is the template every `trainctl local/aws/runpod` shares; backends only start, wait and
stop one attempt.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as config_mod
from .. import env as env_mod
from .. import sysinfo
from ..backends.base import Backend, Outcome, RestartPolicy, RunSpec
from ..errors import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    UsageError,
)
from ..fsutil import atomic_write_json
from ..redact import redact_args
from ..session import Session, SessionStore, summarize_metrics

CRASH_LOOP_REPEATS = 3
FULL_PARSE_LINES_PER_S = 500.0  # output lines a second parsed one by one
NEWEST_WHEN_FAST = 2  # metric lines parsed per read of output beyond that rate
FAST_TAIL_CHARS = 4096
SAMPLE_INTERVAL_S = 0.05


class _OutputParser:
    """Feeds the script's output to the metric parser without slowing the script.

    Up to FULL_PARSE_LINES_PER_S every line is parsed. Past that nobody reads the lines and
    parsing each one would slow the script (a full pipe blocks its writes), so the newest
    metrics are sampled every SAMPLE_INTERVAL_S and the last unparsed output is read at the end.
    """

    def __init__(self, parser: Any, on_parsed: Any) -> None:
        self.parser = parser
        self.on_parsed = on_parsed
        self.budget = _LineBudget(FULL_PARSE_LINES_PER_S)
        self.lock = threading.Lock()
        self.skip_until = 0.0
        self.unparsed = ""

    def feed(self, text: str) -> None:
        now = time.monotonic()
        if now < self.skip_until:  # in a flood: this call must cost next to nothing
            self.unparsed = text
            return
        if self.budget.take(text.count("\n") + 1, now):
            self._parse(text, None)
            return
        self.skip_until = now + SAMPLE_INTERVAL_S
        self._parse(text, NEWEST_WHEN_FAST)

    def finish(self) -> None:
        text, self.unparsed = self.unparsed, ""
        if text:
            self._parse(text, NEWEST_WHEN_FAST)

    def _parse(self, text: str, limit: int | None) -> None:
        if limit is not None:
            self.unparsed = ""
            if len(text) > FAST_TAIL_CHARS:  # the newest lines are at the end: look only there
                text = text[text.find("\n", len(text) - FAST_TAIL_CHARS) + 1:]
        with self.lock:
            for parsed in self.parser.feed_text(text, limit=limit):
                self.on_parsed(parsed)


class _LineBudget:
    """A token bucket: `rate` lines a second (a second's worth may be saved up)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


def _say(message: str) -> None:
    print(f"[trainctl] {message}", file=sys.stderr, flush=True)


def resolve_resume(ref: str | None, cfg: config_mod.Config, *, script: Path,
                   name: str | None = None) -> str | None:
    """'auto' -> newest valid checkpoint of the same script (or name); a path is verified."""
    if not ref:
        return None
    from .. import checkpoint

    if ref == "auto":
        # never continue from a checkpoint of a session that is still running (a sweep sibling)
        running, _ = SessionStore(cfg.state_dir).list(status="running")
        found, skipped = checkpoint.newest_valid(cfg.checkpoint_dir, script=None if name else str(script.resolve()),
                                                 name=name, skip_sessions={r["id"] for r in running})
        for path, why in skipped:
            _say(f"skipping checkpoint {path}: {why}")
        if found is None:
            _say("--resume auto: no valid checkpoint of this script yet; starting from scratch.")
            return None
        _say(f"resuming from {found}")
        return str(found)
    path = Path(ref)
    checkpoint.require_valid(path, suggestion="--resume {found}")
    return str(path.resolve())


def strip_resume_args(args: Sequence[str], flag: str) -> list[str]:
    """The args without any `flag PATH` / `flag=...` (the resume flag)."""
    name = flag.split("=", 1)[0]
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = "=" not in flag
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def with_resume_args(args: list[str], flag: str, resume: str | None, takes_flag: bool) -> list[str]:
    """When trainctl resumes: args without any old resume flag, plus `flag resume` when the
    script takes the flag. When it doesn't resume, the args are the user's, untouched."""
    if not resume:
        return list(args)
    out = strip_resume_args(args, flag)
    if takes_flag:
        out += [flag] if "=" in flag else [flag, resume]
    return out


def restart_policy(cfg: config_mod.Config, *, max_restarts: int | None, restart_on: str | None,
                   restart_delay_s: float | None, grace_period_s: float | None) -> RestartPolicy:
    """Command-line options over trainctl.toml's [restart]; bad values are a UsageError."""
    policy = RestartPolicy(
        max_restarts=cfg.get("restart", "max_restarts") if max_restarts is None else max_restarts,
        restart_on=tuple(cfg.get("restart", "restart_on")) if restart_on is None
        else validate_restart_options(0, restart_on),
        restart_delay_s=cfg.get("restart", "restart_delay_s") if restart_delay_s is None else restart_delay_s,
        grace_period_s=cfg.get("restart", "grace_period_s") if grace_period_s is None else grace_period_s,
    )
    validate_restart_options(policy.max_restarts, ",".join(policy.restart_on))
    if policy.restart_delay_s < 0 or policy.grace_period_s < 0:
        raise UsageError("--restart-delay and --grace-period must not be negative.",
                         "Use 0 or a positive number of seconds.")
    return policy


def split_resume_arg(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """`train.py --lr 1 --resume x.pt` -> ('x.pt', ['--lr', '1']): a resume the user put among
    the script's own arguments, so trainctl verifies and records it like --resume before SCRIPT."""
    if "=" in flag:  # '--init_from=resume' style: the script resolves its own checkpoint
        return None, list(args)
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1], [*args[:i], *args[i + 2:]]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], [*args[:i], *args[i + 1:]]
    return None, list(args)


@dataclass
class _OutputMetrics:
    """Metrics parsed from the script's output, recorded unless the script logs its own."""

    session: Session
    attempt: int = 0
    buffer: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attached: bool = False
    tensorboard: Any = None

    totals: dict[str, Any] = field(default_factory=dict)

    def add(self, parsed: dict[str, Any]) -> None:
        if self.attached:
            return
        for key, name in (("total_steps", "steps"), ("total_epochs", "epochs")):
            if parsed.get(key) and self.totals.get(name) != parsed[key]:
                with self.lock:
                    self.totals[name] = parsed[key]
                    self.buffer.append({"v": 1, "t": time.time(), "kind": "totals", "source": "output",
                                        "steps": self.totals.get("steps"), "epochs": self.totals.get("epochs")})
        if not parsed.get("values"):
            return
        event = {"v": 1, "t": time.time(), "kind": "metric", "step": parsed.get("step"),
                 "epoch": parsed.get("epoch"), "values": parsed["values"],
                 "attempt": self.attempt, "source": "output"}
        with self.lock:
            self.buffer.append(event)

    def flush(self) -> None:
        with self.lock:
            events, self.buffer = self.buffer, []
        if not events:
            return
        if not self.attached:
            runtime = (self.session.read().get("runtime") or {})
            self.attached = runtime.get("attempt") == self.attempt and bool(runtime.get("pid"))
        if self.attached:
            return  # the script reports through trainctl.init(): its numbers are the record
        self.session.append_events(events)
        events = [e for e in events if e["kind"] == "metric"]
        if not events:
            return
        if self.tensorboard is None:
            from ..tensorboard_sink import TensorBoardSink

            self.tensorboard = TensorBoardSink(self.session.tensorboard_dir / "output")
        try:
            self.tensorboard.write(events)
        except Exception:
            pass

    def close(self) -> None:
        self.flush()
        if self.tensorboard is not None:
            self.tensorboard.close()


class Supervisor:
    """Runs a RunSpec as one session: pre-flight, attempts, restarts, summary."""

    def __init__(self, spec: RunSpec, cfg: config_mod.Config, *, backend: str = "local",
                 parent: str | None = None, preflight: bool = True,
                 resume_verified: bool = False) -> None:
        self.spec = spec
        self.resume_verified = resume_verified
        self.cfg = cfg
        self.backend_name = backend
        self.parent = parent
        self.preflight = preflight
        self.store = SessionStore(cfg.state_dir)
        self.session: Session | None = None
        self.stop_signal: int | None = None
        self._handle: Any = None
        self._backend: Backend | None = None

    # -------------------------------------------------------------- set-up
    def _run_preflight(self) -> None:
        from .preflight import run_preflight

        report = run_preflight(self.spec.script, self.spec.args, self.cfg, resume=self.spec.resume,
                               gpus=self.spec.resources.get("gpus"))
        bad = [r for r in report.results if r.status != "pass"]
        if bad or not report.ok:
            for line in report.lines():
                print(line, file=sys.stderr)
        else:
            _say(f"pre-flight: {len(report.results)} checks passed")
        report.raise_if_failed()

    def create_session(self) -> Session:
        spec = self.spec
        script = spec.script.resolve()
        session = self.store.create(
            status="running", name=spec.name, backend=self.backend_name, script=str(script),
            args=redact_args(spec.args),
            command=redact_args(["trainctl", self.backend_name, str(spec.script), *spec.args]),
            cwd=os.getcwd(), started_at=time.time(), trainctl_config=self.cfg.resolved(),
            parent=self.parent, resume_from=spec.resume, attempts=[],
            resources=spec.resources,
            processes=[{"pid": os.getpid(), "start_ticks": sysinfo.process_start_ticks(os.getpid()),
                        "role": "launcher"}],
        )
        atomic_write_json(session.config_path, self.cfg.resolved())
        return session

    def _env(self, session: Session, checkpoint_dir: Path, resume: str | None, attempt: int) -> dict[str, str]:
        return env_mod.LaunchEnv(
            session_id=session.id, session_dir=str(session.dir), checkpoint_dir=str(checkpoint_dir),
            tensorboard_dir=str(session.tensorboard_dir), resume=resume, attempt=attempt,
            backend=self.backend_name, config=str(session.config_path)).to_environ()

    # -------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        # plain assignments and a kill(2) only: a handler that takes a lock can deadlock
        self.stop_signal = signum
        if self._handle is not None and self._backend is not None:
            self._backend.stop(self._handle, self.spec.restart.grace_period_s, signum)

    def _install_signals(self) -> dict[int, Any]:
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):
                pass
        return previous

    # -------------------------------------------------------------- the run
    def run(self) -> int:
        spec = self.spec
        # resolved first: a missing checkpoint fails before anything else, and `--resume auto`
        # with nothing to resume from is a fresh start that needs no resume flag
        if self.resume_verified and spec.resume:
            resume = str(Path(spec.resume).resolve())
        else:
            resume = resolve_resume(spec.resume, self.cfg, script=spec.script, name=spec.name)
        spec.resume = resume
        if self.preflight:
            self._run_preflight()
        session = self.session = self.create_session()
        checkpoint_dir = self.cfg.checkpoint_dir / session.id
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        flag = self.cfg.resume_flag
        from ..backends.local import script_takes_flag

        takes_flag = script_takes_flag(spec.script, flag)
        previous = self._install_signals()
        started = time.time()
        try:
            outcome, attempts = self._attempts(session, checkpoint_dir, resume, flag, takes_flag)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self._finish(session, outcome, attempts, started, checkpoint_dir)

    def _attempts(self, session: Session, checkpoint_dir: Path, resume: str | None, flag: str,
                  takes_flag: bool) -> tuple[Outcome, int]:
        from ..backends.local import LocalBackend

        spec = self.spec
        policy = spec.restart
        # the child starts first: building the parser and the display (imports, regexes) then
        # overlaps the script's own start-up instead of adding to it
        backend = self._backend = LocalBackend(session)
        failures: list[tuple[str, int]] = []
        attempt = 0
        display: Any = None
        recorder = _OutputMetrics(session)
        output: _OutputParser | None = None
        flusher_stop = threading.Event()
        final_status = "ended"

        def flush_loop() -> None:
            while not flusher_stop.wait(1.0):
                recorder.flush()

        def attach_output() -> None:
            nonlocal display, output
            from ..cli.progress import ProgressDisplay
            from ..metrics import MetricParser, infer_totals

            display = ProgressDisplay(session, totals=infer_totals(spec.args), quiet=spec.quiet)
            if self.cfg.get("metrics", "parse_output"):
                parser = MetricParser(self.cfg.get("metrics", "patterns"))

                def on_parsed(parsed: dict[str, Any]) -> None:
                    display.on_parsed(parsed)
                    recorder.add(parsed)

                output = _OutputParser(parser, on_parsed)
            backend.attach(display, output.feed if output else None)
            display.start()
            threading.Thread(target=flush_loop, daemon=True, name="trainctl-output-metrics").start()

        try:
            while True:
                recorder.attempt = attempt
                recorder.attached = False
                args = with_resume_args(spec.args, flag, resume, takes_flag)
                env = self._env(session, checkpoint_dir, resume, attempt)
                self._handle = backend.launch(spec, env, attempt, args=args)
                if display is None:
                    attach_output()
                pid = backend.pid(self._handle)
                data = session.read()
                attempts = data.get("attempts") or []
                attempts.append({"attempt": attempt, "started_at": time.time(), "resume_from": resume,
                                 "pid": pid})
                # git status and nvidia-smi (~10-100 ms) run while the script starts, not before
                facts = {} if attempt else {"git": sysinfo.git_info(spec.script.resolve().parent),
                                            "gpus": sysinfo.gpu_description()}
                session.update(attempts=attempts, resume_from=resume, **facts, processes=[
                    {"pid": os.getpid(), "start_ticks": sysinfo.process_start_ticks(os.getpid()), "role": "launcher"},
                    {"pid": pid, "start_ticks": sysinfo.process_start_ticks(pid), "role": "script"}])
                if self.stop_signal is not None:  # a signal raced the launch
                    backend.stop(self._handle, policy.grace_period_s, self.stop_signal)
                outcome = backend.wait(self._handle)
                self._handle = None
                if output is not None:
                    output.finish()
                recorder.flush()
                outcome.status = final_status = self._classify(session, outcome, attempt)
                attempts = session.read().get("attempts") or attempts
                attempts[-1].update(ended_at=time.time(), exit_code=outcome.exit_code,
                                    signal=outcome.signal, status=outcome.status)
                session.update(attempts=attempts)
                if not self._should_restart(outcome, attempt, failures, session, checkpoint_dir):
                    return outcome, attempt + 1
                from .. import checkpoint

                found, skipped = checkpoint.newest_valid(checkpoint_dir)
                for path, why in skipped:
                    _say(f"skipping checkpoint {path}: {why}")
                    session.event("warning", message=f"skipped checkpoint {path}: {why}")
                if found is not None:
                    resume = str(found)
                attempt += 1
                reason = outcome.signal or f"exit code {outcome.exit_code}"
                _say(f"attempt {attempt - 1} {outcome.status} ({reason}); restart {attempt}/{policy.max_restarts} "
                     f"in {policy.restart_delay_s:g}s" + (f", resuming from {resume}" if resume else
                                                          "; no checkpoint written yet: restarting from scratch"))
                session.event("restart", attempt=attempt, reason=f"{outcome.status}: {reason}", resume=resume)
                deadline = time.monotonic() + policy.restart_delay_s
                while self.stop_signal is None and time.monotonic() < deadline:
                    time.sleep(min(0.05, policy.restart_delay_s))
                if self.stop_signal is not None:
                    outcome.stopped_by_user = True
                    outcome.status = "killed"
                    return outcome, attempt
        finally:
            flusher_stop.set()
            if display is not None:
                display.close(final_status)
            recorder.close()

    def _classify(self, session: Session, outcome: Outcome, attempt: int) -> str:
        if outcome.stopped_by_user or self.stop_signal is not None:
            return "killed"
        reported = None
        for event in session.iter_events(("status",)):
            if event.get("source") == "run" and event.get("attempt", 0) == attempt:
                reported = event.get("status")
        if outcome.exit_code == 0:
            return "preempted" if reported == "preempted" else "completed"
        if outcome.exit_code == EXIT_PREEMPTED or reported == "preempted":
            return "preempted"
        if outcome.signal in ("SIGTERM", "SIGUSR1", "SIGINT") and reported != "failed":
            return "preempted"  # stopped from outside (spot notice, cluster), not by us
        return "failed"

    def _should_restart(self, outcome: Outcome, attempt: int, failures: list[tuple[str, int]],
                        session: Session, checkpoint_dir: Path) -> bool:
        policy = self.spec.restart
        if outcome.status not in policy.restart_on or outcome.stopped_by_user:
            return False
        if attempt >= policy.max_restarts:
            if policy.max_restarts:
                _say(f"giving up after {policy.max_restarts} restart(s)")
            return False
        if outcome.status == "failed":
            signature = next((line.strip() for line in reversed(outcome.output_tail) if line.strip()),
                             f"exit code {outcome.exit_code}") if outcome.exit_code != -9 else "SIGKILL"
            n_ckpt = sum(1 for _ in session.iter_events(("checkpoint",)))
            failures.append((signature, n_ckpt))
            recent = failures[-CRASH_LOOP_REPEATS:]
            if len(recent) == CRASH_LOOP_REPEATS and len({s for s, _ in recent}) == 1 \
                    and len({c for _, c in recent}) == 1 and signature != "SIGKILL":
                _say(f"not restarting: the script failed {CRASH_LOOP_REPEATS} times in a row with the same "
                     f"error and no new checkpoint: {signature}")
                session.event("warning", message=f"crash loop stopped: {signature}")
                return False
        else:
            failures.clear()
        return True

    # -------------------------------------------------------------- the end
    def _finish(self, session: Session, outcome: Outcome, attempts: int, started: float,
                checkpoint_dir: Path) -> int:
        ended = time.time()
        metrics = session.metrics()
        summary = summarize_metrics(metrics)
        ckpt_events = list(session.iter_events(("checkpoint",)))
        # every checkpoint this session wrote has an event: none, nothing to look for
        newest = None
        if ckpt_events:
            from .. import checkpoint

            newest = checkpoint.newest_valid(checkpoint_dir, verify_digest=False)[0]
        summary.update(checkpoints=len(ckpt_events), last_checkpoint=str(newest) if newest else None,
                       duration_s=round(ended - started, 3), attempts=attempts)
        diagnosis = None
        if outcome.status == "failed":
            from .diagnose import diagnose

            diag = diagnose("\n".join(outcome.output_tail), exit_code=outcome.exit_code,
                            signal_name=outcome.signal, script=str(self.spec.script),
                            args=self.spec.args, checkpoint=str(newest) if newest else None,
                            resume_flag=self.cfg.resume_flag)
            diagnosis = diag.to_dict() if diag else None
        session.update(status=outcome.status, ended_at=ended, exit_code=outcome.exit_code,
                       signal=outcome.signal, summary=summary, diagnosis=diagnosis)
        session.event("status", status=outcome.status, source="launcher",
                      exit_code=outcome.exit_code, signal=outcome.signal)
        from ..cli.render import print_run_summary

        print_run_summary(session, outcome, summary, diagnosis, spec=self.spec,
                          newest=str(newest) if newest else None)
        if outcome.status == "completed":
            return 0
        if outcome.status == "killed":
            return EXIT_INTERRUPTED
        if outcome.status == "preempted":
            return EXIT_PREEMPTED
        code = outcome.exit_code if outcome.exit_code is not None else 1
        return code if 0 < code < 256 else 128 + abs(code) if code < 0 else 1


def validate_restart_options(max_restarts: int, restart_on: str) -> tuple[str, ...]:
    statuses = tuple(s.strip() for s in restart_on.split(",") if s.strip())
    bad = [s for s in statuses if s not in ("preempted", "failed")]
    if bad:
        raise UsageError(f"--restart-on: unknown status '{bad[0]}'. Valid: preempted, failed.",
                         "Example: --restart-on preempted,failed")
    if max_restarts < 0:
        raise UsageError(f"--max-restarts must be 0 or more, not {max_restarts}.",
                         "Example: --max-restarts 3")
    return statuses
