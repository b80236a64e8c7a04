"""Run a spec as one session on any backend: attempts, restarts with resume, the end.

This is the template `trainctl local` (and, on a rented machine, the agent) runs. It calls
nothing on a backend outside `Backend` (plan, launch, describe, log_iter, stop, release), and it
learns how the script is doing through the session store (status events, the runtime's record,
a stop request) and the checkpoint location recorded in session.json, not through paths of its
own. It prints nothing: what a person should see goes to the `EngineEvents` it is given, and
`run()` returns the end as data (`RunResult`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import config as config_mod
from .. import resume as resume_mod
from .. import sysinfo
from ..backends.base import Backend, Description, Handle, LaunchPlan, LogChunk, RunSpec, get_backend
from ..backends.torchrun import NODE_HEARTBEAT_S, NodeSpec
from ..errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, DiskError, UsageError, disk_problem
from ..fsutil import temp_beside
from ..redact import redact_args
from ..session import TERMINAL, Session, SessionStore, State, new_session_id, summarize_metrics
from .netcheck import ended_at_net_check
from .output import OutputMetrics, OutputParser, OutputText

CRASH_LOOP_REPEATS = 3
POLL_MAX_S = 0.1  # longest pause between two looks at a running attempt
STOP_POLL_S = 0.25  # how often a restart delay looks for a stop request
OUTPUT_DRAIN_S = 60.0  # longest wait for an ended attempt's output to be read and recorded
RESTARTABLE = (State.PREEMPTED, State.FAILED)


@dataclass
class RestartPolicy:
    max_restarts: int = 0
    restart_on: tuple[str, ...] = (State.PREEMPTED.value, State.FAILED.value)
    restart_delay_s: float = 2.0
    grace_period_s: float = 30.0


@dataclass
class Outcome:
    """How one attempt ended."""

    status: State
    exit_code: int | None
    signal: str | None = None
    output_tail: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    """How the session ended, for the caller to show: the record is already in session.json."""

    session: Session
    outcome: Outcome
    summary: dict[str, Any]
    diagnosis: dict[str, Any] | None
    newest_checkpoint: str | None
    exit_code: int
    # the end as recorded, also when session.json could not be written (a full disk)
    record: dict[str, Any] = field(default_factory=dict)


class EngineEvents:
    """What the engine tells whoever watches it. Every method does nothing here; the CLI
    renders them on a terminal, a detached run writes them to the session's output.log."""

    def message(self, text: str) -> None:
        """A status line ("resuming from ...", "restart 1/3 in 2s")."""

    def preflight(self, report: Any) -> None:
        """The pre-flight report, before it is acted on (a failure raises after this)."""

    def attempt_started(self, session: Session, attempt: int) -> None:
        """Attempt `attempt` is running (output follows through `output`)."""

    def output(self, chunk: LogChunk) -> None:
        """A piece of the script's output, as the backend delivered it."""

    def parsed(self, parsed: dict[str, Any]) -> None:
        """Metrics parsed from the output (MetricParser's dicts)."""

    def attempts_ended(self, status: State) -> None:
        """No more attempts: the last ended with `status`."""


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


def validate_restart_options(max_restarts: int, restart_on: str) -> tuple[str, ...]:
    statuses = tuple(s.strip() for s in restart_on.split(",") if s.strip())
    bad = [s for s in statuses if s not in RESTARTABLE]
    if bad:
        raise UsageError(f"--restart-on: unknown status '{bad[0]}'. Valid: preempted, failed.",
                         "Example: --restart-on preempted,failed")
    if max_restarts < 0:
        raise UsageError(f"--max-restarts must be 0 or more, not {max_restarts}.",
                         "Example: --max-restarts 3")
    return statuses


def exit_code_for(outcome: Outcome) -> int:
    """The launcher's exit code: 0, the script's own, 75 preempted, 130 killed or stopped."""
    if outcome.status is State.COMPLETED:
        return 0
    if outcome.status in (State.KILLED, State.STOPPED):
        return EXIT_INTERRUPTED
    if outcome.status is State.PREEMPTED:
        return EXIT_PREEMPTED
    code = outcome.exit_code if outcome.exit_code is not None else 1
    return code if 0 < code < 256 else 128 + abs(code) if code < 0 else 1


class Supervisor:
    """Runs a RunSpec as one session: pre-flight, attempts, restarts, the end."""

    def __init__(self, spec: RunSpec, policy: RestartPolicy, cfg: config_mod.Config, *,
                 backend: str = "local", backend_options: dict[str, Any] | None = None,
                 events: EngineEvents | None = None, parent: str | None = None, force: bool = False,
                 net_check: bool | None = None, net_check_timeout_s: float | None = None) -> None:
        # one node of a multi-node job: records its own part under session.json's "nodes"
        self.node = NodeSpec.from_resources(spec.resources)
        # ... and all-reduces with the others before its first attempt (launcher/netcheck.py)
        self.net_check = cfg.get("", "net_check") if net_check is None else net_check
        self.net_check_timeout_s = float(cfg.get("", "net_check_timeout_s") if net_check_timeout_s is None
                                         else net_check_timeout_s)
        if not (self.net_check_timeout_s >= 1 and self.net_check_timeout_s != float("inf")):
            raise UsageError(f"--net-check-timeout must be a number of seconds, 1 or more, not {self.net_check_timeout_s:g}.",
                             "e.g. --net-check-timeout 120 (it bounds how long the nodes wait for each other)")
        self.node_key = ""
        if self.node is not None:
            self.node_key = spec.resources.get("node_key") or (
                f"{sysinfo.host()}-{self.node.node_rank if self.node.node_rank is not None else os.getpid()}")
            spec = replace(spec, resources={**spec.resources, "node_key": self.node_key})
        self._node_entry: dict[str, Any] = {}
        self.spec = spec
        self.force = force  # resume a checkpoint another script wrote
        self.policy = policy
        self.cfg = cfg
        self.backend_name = backend
        self.backend_options = dict(backend_options or {})
        self.events = events or EngineEvents()
        self.parent = parent
        self.store = SessionStore(cfg.state_dir)
        self.session: Session | None = None
        self.stop_signal: int | None = None
        self._handle: Handle | None = None
        self._backend: Backend | None = None
        self._watching: ScriptCheckpoints | None = None
        self._warned: set[str] = set()
        self._unrecorded_metrics: list[dict[str, Any]] = []
        self._final_attempts: list[dict[str, Any]] | None = None
        self.unrecorded: list[str] = []  # what the session store could not take (a full disk)

    # -------------------------------------------------------------- set-up
    def prepare(self, *, preflight: bool = True, resume_verified: bool = False) -> Session:
        """Resolve the resume, run the pre-flight checks, create the session; one node of several
        then runs the network check with the others (not skipped by `preflight=False`: every node
        must run it, or none)."""
        spec = self.spec
        # resolved first: a missing checkpoint fails before anything else, and `--resume auto`
        # with nothing to resume from is a fresh start that needs no resume flag
        if resume_verified and spec.resume:
            self.say_resume(spec.resume)
            resume = str(Path(spec.resume).resolve())
        else:
            resume = self.resolve_resume(spec.resume)
        self.spec = replace(spec, resume=resume)
        if preflight:
            self._run_preflight()
        self.session = self._create_session()
        if self.node is not None:
            self._net_check(self.session)
        return self.session

    def net_check_plan(self) -> Any:
        """The network check this node runs before its first attempt (a NetCheckPlan), or None:
        one machine, the check turned off, or a backend whose nodes are not this machine."""
        if self.node is None or not self.net_check or self.backend_name != "local":
            return None
        from . import netcheck

        python = self.backend_options.get("python") or sys.executable
        return netcheck.plan(self.node, python=python, timeout_s=self.net_check_timeout_s)

    def _net_check(self, session: Session) -> None:
        """Before the first attempt only: a restart of the whole job follows a run in which the
        nodes did meet, and its rendezvous failing is diagnosed like any other."""
        from . import netcheck

        check = self.net_check_plan()
        if check is None:
            return
        self.events.message(f"pre-flight: network check: one process on each of the {check.nnodes} nodes all-reduces "
                            f"through {check.endpoint} (waiting up to {check.timeout_s:g} s for every node)")
        output = session.dir / netcheck.output_name(self.node_key)
        try:
            result = netcheck.run(check, output_path=output)
        except BaseException:  # interrupted while waiting for the others: the run never started
            self._end_before_start(session, State.KILLED, None, {"ok": False, "kind": "interrupted"})
            raise
        facts = {"node": self.node_key, "output": output.name, **result.record()}
        if result.ok:
            self.events.message(netcheck.summary(result, check))
            self._record("the network check", session.event, "net_check", **facts)
            self._save_node(session, net_check={"ok": True, "wall_s": result.wall_s})
            if self.node is not None and not netcheck.may_host_store(self.node):
                time.sleep(netcheck.SETTLE_S)
            return
        error, diagnosis = netcheck.failure(result, check)
        self._record("the network check", session.event, "net_check", problem=error.kind, message=error.message,
                     hint=error.hint, **facts)
        self._end_before_start(session, State.FAILED, diagnosis, {"ok": False, "kind": error.kind})
        raise error

    def _end_before_start(self, session: Session, status: State, diagnosis: dict[str, Any] | None,
                          net_check: dict[str, Any]) -> None:
        """The session ends before any attempt (the network check failed): recorded as this node's
        end, and the session's unless another node recorded here is running its attempt."""
        ended = time.time()
        self._save_node(session, state=status.value, ended_at=ended, net_check=net_check)
        try:
            nodes = session.read().get("nodes") or {}
        except Exception:
            nodes = {}
        if any(key != self.node_key and isinstance(n, dict) and n.get("state") == State.RUNNING.value
               for key, n in nodes.items()):
            return
        self._record("how the session ended", session.update, status=status, ended_at=ended, exit_code=None,
                     signal=None, diagnosis=diagnosis)
        self._record("how the session ended", session.event, "status", status=status, source="launcher",
                     reason="net_check")

    def plan(self) -> LaunchPlan:
        """What the first attempt would run, where its output and checkpoints would go, with
        nothing created or started (what `--dry-run` shows). Resolves the resume first."""
        spec = self.spec = replace(self.spec, resume=self.resolve_resume(self.spec.resume, dry_run=True))
        session_id = "<new session id>" if self.node is None else self.node.session_id
        session_dir = self.cfg.state_dir / "sessions" / session_id
        takes_flag = self._takes_resume_flag()
        args = resume_mod.with_resume_args(spec.args, self.cfg.resume_flag, spec.resume, takes_flag)
        backend = get_backend(self.backend_name, **self.backend_options)
        return backend.plan(replace(spec, args=tuple(args), session_id=session_id, session_dir=session_dir,
                                    checkpoint_location=str(self.cfg.checkpoint_dir / session_id),
                                    config_path=session_dir / "config.json", cwd=spec.cwd or Path.cwd()))

    def resolve_resume(self, ref: str | None, *, dry_run: bool = False) -> str | None:
        """'auto' -> the checkpoint of the same script (or name) whose settings match this run's,
        else the newest; said with where it comes from and what differs; a checkpoint the script
        wrote itself wins when it is newer. A path is verified. Another script's checkpoint is
        refused unless `force`. `dry_run`: change nothing on disk (a snapshot is named, not put back)."""
        if not ref:
            return None
        from .. import checkpoint

        script = str(self.spec.script.resolve())
        if ref == resume_mod.AUTO:
            found = resume_mod.resolve_auto(self.cfg.checkpoint_dir, self.cfg.state_dir, script=script,
                                            name=self.spec.name, args=list(self.spec.args),
                                            resume_flag=self.cfg.resume_flag, force=self.force)
            written = self._auto_resume_script_checkpoint(found.path, dry_run=dry_run)
            if written is not None:
                return written
            for path, why in found.skipped:
                self.events.message(f"skipping checkpoint {path}: {why}")
            refusal = found.refusal()
            if refusal is not None:
                raise refusal
            for line in found.lines():
                self.events.message(line)
            return str(found.path) if found.path else None
        path = Path(ref)
        checkpoint.require_valid(path, suggestion="--resume {found}")
        self.say_resume(path)
        return str(path.resolve())

    def _auto_resume_script_checkpoint(self, theirs: Path | None, *, dry_run: bool = False) -> str | None:
        """`--resume auto`: a checkpoint the script wrote itself in an earlier session (recorded by
        its watcher, verified now), when it is newer than trainctl's own `theirs`."""
        from .. import checkpoint
        from .script_checkpoints import choose_resume, recorded_entries, restore_snapshot

        records, _problems = self.store.list(status=State.RUNNING)
        entries = recorded_entries(self.store.sessions_dir, script=str(self.spec.script.resolve()),
                                   name=self.spec.name, skip_sessions={r["id"] for r in records})
        if not entries:
            return None
        choice = choose_resume(entries, takes_path="=" not in self.cfg.resume_flag)
        if choice.path is None or (theirs is not None and checkpoint.inspect(theirs).time >= (choice.written_at or 0)):
            return None
        for path, why in choice.skipped:
            self.events.message(f"not resuming from {path}: {why}")
        target = choice.path
        if choice.restore_to is not None and dry_run:
            self.events.message(f"would put back {choice.label} from its snapshot {choice.path}")
            target = choice.restore_to
        elif choice.restore_to is not None:
            moved = restore_snapshot(choice.path, choice.restore_to)
            self.events.message(f"put back {choice.label} from its snapshot {choice.path}"
                                + (f" (the torn file is kept as {moved})" if moved else ""))
            target = choice.restore_to
        self.events.message(f"resuming from {choice.label}, written by the script"
                            + (f" (session {choice.entry.get('session_id')})" if choice.entry else ""))
        return str(target)

    def say_resume(self, path: str | Path) -> None:
        """Where a checkpoint named by path comes from and what differs; another script's is
        refused unless `force`."""
        judged = resume_mod.judge_path(path, self.cfg.state_dir, script=str(self.spec.script.resolve()),
                                       args=list(self.spec.args), resume_flag=self.cfg.resume_flag)
        chosen = judged.chosen
        if chosen is not None and chosen.script_state == "other" and not self.force:
            raise resume_mod.CheckpointRefusedError(
                f"checkpoint {path} was written by another script, {chosen.script}, not {self.spec.script}.",
                "Resume it anyway with --force, or resume a checkpoint this script wrote (trainctl checkpoint list).")
        for line in judged.lines():
            self.events.message(line)

    def _run_preflight(self) -> None:
        from .preflight import run_preflight

        report = run_preflight(self.spec.script, list(self.spec.args), self.cfg, resume=self.spec.resume,
                               gpus=self.spec.resources.get("gpus"), force=self.force)
        self.events.preflight(report)
        report.raise_if_failed()

    def _create_session(self) -> Session:
        session_id = new_session_id() if self.node is None else self.node.session_id
        try:
            if self.node is not None:
                return self._join_or_create(session_id)
            return self._new_session(session_id)
        except OSError as e:
            problem = disk_problem(e)
            if problem is None:
                raise
            folder = self.store.sessions_dir / session_id
            if folder.is_dir() and not (folder / "session.json").exists():
                import shutil

                shutil.rmtree(folder, ignore_errors=True)  # ours, begun a moment ago, holds nothing
            raise DiskError(problem, self.cfg.state_dir, e) from e

    def _new_session(self, session_id: str) -> Session:
        spec = self.spec
        session = self.store.create(
            session_id=session_id, status=State.RUNNING, name=spec.name, backend=self.backend_name,
            script=str(spec.script.resolve()), args=redact_args(list(spec.args)),
            command=redact_args(["trainctl", self.backend_name, str(spec.script), *spec.args]),
            cwd=os.getcwd(), started_at=time.time(), trainctl_config=self.cfg.resolved(),
            parent=self.parent, resume_from=spec.resume, attempts=[], resources=spec.resources,
            checkpoint_location=str(self.cfg.checkpoint_dir / session_id),
            restart=asdict(self.policy),
            # a multi-node session's launchers are on several machines: each node lists its own
            processes=[_this_process("launcher")] if self.node is None else [],
            **({"multinode": self._multinode_fields()} if self.node is not None else {}),
        )
        _write_derived_json(session.config_path, self.cfg.resolved())
        return session

    # -------------------------------------------------------------- one node of several
    def _multinode_fields(self) -> dict[str, Any]:
        node = self.node
        assert node is not None
        return {"nnodes": node.nnodes, "nproc_per_node": self.spec.nproc_per_node, "rdzv_endpoint": node.endpoint,
                "rdzv_id": node.rdzv_id, "source": node.source}

    def _join_or_create(self, session_id: str) -> Session:
        """The job's one session: created by the first node to get here; a node that finds it
        (a state dir the nodes share) joins it. One left from an earlier job is refused."""
        try:
            session = self._new_session(session_id)
        except FileExistsError:
            session = self.store.get(session_id)
            data = self._wait_readable(session)
            same = (data.get("multinode") or {}).get("rdzv_id") == (self.node.rdzv_id if self.node else None)
            if same and ended_at_net_check(data):
                # the same command again, once the network is fixed: the job never started
                self._record("the retry", session.update, status=State.RUNNING, ended_at=None, exit_code=None,
                             signal=None, diagnosis=None)
                self._record("the retry", session.event, "status", status=State.RUNNING, source="launcher",
                             reason="started again after a failed network check")
            elif not same or data.get("status") in {s.value for s in TERMINAL}:
                raise UsageError(
                    f"session {session_id} already exists from an earlier run with rendezvous id "
                    f"'{self.node.rdzv_id if self.node else ''}' ({data.get('status')}).",
                    "Give this job a new id on every node: --rdzv-id NEW_ID (resume it with --resume auto).") from None
        self._node_entry = {"host": sysinfo.host(), "node_rank": self.node.node_rank if self.node else None,
                            "launcher": _this_process("launcher"), "state": State.PENDING.value,
                            "output": self._output_name(),
                            "attempts": [], "heartbeat_at": time.time()}
        self._save_node(session)
        return session

    def output_path(self, session: Session) -> Path:
        """Where this launcher's attempts keep the script's output (one file per node, multi-node)."""
        return session.dir / self._output_name() if self.node is not None else session.output_log

    def _output_name(self) -> str:
        from ..backends.torchrun import node_output_name

        return node_output_name(self.node_key)

    @staticmethod
    def _wait_readable(session: Session, timeout_s: float = 30.0) -> dict[str, Any]:
        """session.json of a session another node is creating this moment."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return session.read()
            except Exception:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _save_node(self, session: Session, **fields: Any) -> None:
        self._node_entry.update(fields, heartbeat_at=time.time())
        self._record("this node's state", session.update, nodes={self.node_key: dict(self._node_entry)})

    def _saw_node(self, session: Session, end: Description) -> None:
        """The attempt's workers are up: record where c10d put this node (GROUP_RANK, RANK)."""
        node = end.details.get("node")
        if not node or self._node_entry.get("seen_attempt") == self._node_entry.get("attempt"):
            return
        ranks = node.get("ranks") or [None, None]
        self._save_node(session, group_rank=node.get("group_rank"), ranks=ranks,
                        world_size=node.get("world_size"), master_addr=node.get("master_addr"),
                        head=ranks[0] == 0, seen_attempt=self._node_entry.get("attempt"))

    def _other_head(self, session: Session) -> bool:
        """Another node recorded here held global rank 0 (a session folder the nodes share)."""
        try:
            nodes = session.read().get("nodes") or {}
        except Exception:
            return False
        return any(key != self.node_key and isinstance(n, dict) and n.get("head") for key, n in nodes.items())

    # -------------------------------------------------------------- signals
    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop the run as if this process got `signum` (what a caller running sessions in
        threads forwards, the pipeline engine's): the script's emergency checkpoint, then the
        session ends stopped; asked twice, it ends at once. Safe in a signal handler."""
        self._on_signal(signum, None)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # plain assignments and a kill(2) only: a handler that takes a lock can deadlock
        first = self.stop_signal is None
        self.stop_signal = signum
        if self._handle is None or self._backend is None:
            return
        if first:
            self._backend.stop(self._handle, self.policy.grace_period_s, signal_name=_stop_signal_name(signum))
        else:
            self._backend.stop(self._handle, 0)  # asked twice: now

    def _install_signals(self) -> dict[int, Any]:
        return install_stop_signals(self._on_signal)

    # -------------------------------------------------------------- a disk that fails
    def _warn_once(self, kind: str, text: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self.events.message(text)

    def _record(self, what: str, write: Any, *args: Any, **kwargs: Any) -> bool:
        """Write to the session store; when its disk is full (or read-only) the run goes on
        without the record, and one line says so."""
        try:
            write(*args, **kwargs)
            return True
        except OSError as e:
            problem = disk_problem(e)
            if problem is None:
                raise
            self.unrecorded.append(what)
            where = self.session.dir if self.session is not None else self.cfg.state_dir
            self._warn_once("session_store", f"cannot record {what} in {where}: {problem} ({e.strerror}); "
                                             "the run goes on, and what it could not record is named at the end")
            return False

    # -------------------------------------------------------------- the run
    def run(self) -> RunResult:
        """Attempts until the script ends for good; the record in session.json, the end returned."""
        session = self.session or self.prepare()
        data = session.read()
        recorded = data.get("processes") or []
        if self.node is not None:
            # a detached engine: the node's record was begun by the process that prepared it
            entry = (data.get("nodes") or {}).get(self.node_key)
            self._node_entry = {**(entry if isinstance(entry, dict) else {}), **self._node_entry,
                                "launcher": _this_process("launcher")}
        if self.node is None and not any(p.get("pid") == os.getpid() for p in recorded if isinstance(p, dict)):
            self._record("the launcher's process", session.update,
                         processes=[_this_process("launcher")])  # a detached engine: another process
        location = session.checkpoint_location() or str(self.cfg.checkpoint_dir / session.id)
        Path(location).mkdir(parents=True, exist_ok=True)
        if self.node is not None:
            self.events.message(f"node {self.node_key}: one of {self.node.nnodes} machines meeting at "
                                f"{self.node.endpoint} (rendezvous id {self.node.rdzv_id}, session {session.id})")
        backend = self._backend = get_backend(self.backend_name, **self.backend_options)
        previous = self._install_signals()
        started = time.time()
        try:
            outcome, attempts = self._attempts(session, backend, location)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self._finish(session, outcome, attempts, started, location)

    def _attempt_spec(self, session: Session, location: str, resume: str | None, takes_flag: bool) -> RunSpec:
        spec = self.spec
        args = resume_mod.with_resume_args(spec.args, self.cfg.resume_flag, resume, takes_flag)
        return replace(spec, args=tuple(args), resume=resume, session_id=session.id,
                       session_dir=session.dir, checkpoint_location=location,
                       config_path=session.config_path, cwd=spec.cwd or Path.cwd())

    def _attempts(self, session: Session, backend: Backend, location: str) -> tuple[Outcome, int]:
        spec = self.spec
        policy = self.policy
        takes_flag = self._takes_resume_flag()
        watching = self._watching = ScriptCheckpoints(self, session, location)
        failures: list[tuple[str, int]] = []
        attempt = 0
        resume = spec.resume
        recorder = OutputMetrics(session)
        parser: OutputParser | None = None
        flusher_stop = threading.Event()
        flusher: threading.Thread | None = None
        final_status = State.FAILED

        def flush_loop() -> None:
            while not flusher_stop.wait(1.0):
                try:
                    recorder.flush()
                except Exception as e:  # recording parsed metrics must never stop the run
                    self._warn_once("parsed_metrics", f"cannot record metrics parsed from the output: {e}")

        def metrics_not_recorded(error: OSError) -> None:
            problem = disk_problem(error) or str(error)
            self._warn_once("parsed_metrics", f"cannot record metrics parsed from the output in {session.events_path}: "
                                              f"{problem}; the newest are kept in memory and written once there is room")

        recorder.on_error = metrics_not_recorded

        try:
            while True:
                recorder.attempt = attempt
                recorder.attached = False
                plan = backend.plan(self._attempt_spec(session, location, resume, takes_flag))
                handle = self._handle = backend.launch(plan, attempt)
                self.events.attempt_started(session, attempt)
                if parser is None:
                    # built after the child starts: the parser's imports and regexes overlap the
                    # script's own start-up instead of adding to it
                    parser = self._make_parser(recorder)
                    flusher = threading.Thread(target=flush_loop, daemon=True, name="trainctl-output-metrics")
                    flusher.start()
                    watching.start()
                text = OutputText()
                output_done = threading.Event()
                reader = threading.Thread(target=self._read_output, name="trainctl-output", daemon=True,
                                          args=(backend, handle, text, parser, output_done))
                reader.start()
                self._record_launch(session, backend, handle, attempt, resume)
                if self.stop_signal is not None:  # a signal raced the launch
                    backend.stop(handle, policy.grace_period_s, signal_name=_stop_signal_name(self.stop_signal))
                end = self._wait(backend, handle, output_done)
                # the backend ends its output once the attempt is reaped; the bound is for a
                # backend that never does, not for a slow reader (its last lines must be parsed)
                reader.join(timeout=OUTPUT_DRAIN_S)
                self._handle = None
                backend.release(handle)
                if parser is not None:
                    parser.finish()
                recorder.flush()  # waits for a flush the background thread is in
                watching.settle()  # the script is gone: what it finished writing counts now
                outcome = Outcome(self._classify(session, end, attempt), end.exit_code, end.signal, text.tail)
                final_status = outcome.status
                ended = self._ended_attempts(session, outcome)
                if not self._should_restart(outcome, attempt, failures, session):
                    self._final_attempts = ended  # recorded with the session's end: one write, not two
                    return outcome, attempt + 1
                if self.node is not None:
                    self._save_node(session, attempts=ended, state="restarting")
                    stopped = self._node_restart_delay(session, outcome, attempt)
                    if stopped is not None:
                        outcome.status = final_status = stopped
                        return outcome, attempt + 1
                    resume = self._restart_checkpoint(session, location) or self._still_valid(resume)
                    if resume is None and not self._node_entry.get("head"):
                        self.events.message(
                            f"this node sees no checkpoint in {location}: if the node holding rank 0 wrote one, "
                            "this node cannot read it and the ranks would start from different states; put "
                            "checkpoint_dir on storage every node reads (trainctl.toml), or mirror it with --sync")
                    attempt += 1
                    self.events.message(f"restart {attempt}/{policy.max_restarts} of the whole job"
                                        + (f", resuming from {resume}" if resume else ": no checkpoint, from scratch"))
                    self._record("the restart", session.event, "restart", attempt=attempt, node=self.node_key,
                                 reason=f"{outcome.status}", resume=resume)
                    continue
                self._record(f"how attempt {attempt} ended", session.update, attempts=ended)
                resume = self._restart_checkpoint(session, location) or self._still_valid(resume)
                attempt += 1
                reason = outcome.signal or f"exit code {outcome.exit_code}"
                nothing = ("no verified checkpoint to resume from" if any(session.iter_events(("checkpoint",)))
                           else "no checkpoint written yet")
                self.events.message(
                    f"attempt {attempt - 1} {outcome.status} ({reason}); restart {attempt}/{policy.max_restarts} "
                    f"in {policy.restart_delay_s:g}s" + (f", resuming from {resume}" if resume else
                                                         f"; {nothing}: restarting from scratch"))
                self._record("the restart", session.event, "restart", attempt=attempt,
                             reason=f"{outcome.status}: {reason}", resume=resume)
                stopped = self._wait_restart_delay(session)
                if stopped is not None:
                    outcome.status = final_status = stopped
                    return outcome, attempt
        finally:
            flusher_stop.set()
            watching.stop()
            if flusher is not None:
                flusher.join(timeout=OUTPUT_DRAIN_S)
            self.events.attempts_ended(final_status)
            recorder.close()
            self._unrecorded_metrics = recorder.unrecorded()

    def _make_parser(self, recorder: OutputMetrics) -> OutputParser | None:
        if not self.cfg.get("metrics", "parse_output"):
            return None
        from ..metrics import MetricParser

        def on_parsed(parsed: dict[str, Any]) -> None:
            self.events.parsed(parsed)
            recorder.add(parsed)

        return OutputParser(MetricParser(self.cfg.get("metrics", "patterns")), on_parsed)

    def _read_output(self, backend: Backend, handle: Handle, text: OutputText,
                     parser: OutputParser | None, done: threading.Event) -> None:
        # never stops reading while the attempt runs: a script whose output nobody reads blocks
        try:
            for chunk in backend.log_iter(handle, since=0, follow=True):
                try:
                    self.events.output(chunk)
                    lines = text.feed(chunk.data, chunk.stream)
                    if lines and parser is not None:
                        parser.feed(lines)
                except Exception as e:  # shown or parsed no more, still read
                    self._warn_once("output", f"cannot show or parse the script's output any more: {e}")
            rest = text.finish()
            if rest and parser is not None:
                parser.feed(rest)
        except Exception as e:  # the backend's own stream broke
            self.events.message(f"stopped reading the script's output: {e}")
        finally:
            done.set()

    def _record_launch(self, session: Session, backend: Backend, handle: Handle, attempt: int,
                       resume: str | None) -> None:
        if self.node is not None:
            here = backend.describe(handle).details.get("processes") or []
            attempts = [*self._node_entry.get("attempts", []),
                        {"attempt": attempt, "started_at": time.time(), "resume_from": resume}]
            self._save_node(session, attempts=attempts, attempt=attempt, state=State.RUNNING.value,
                            handle=handle.to_json(), processes=here)
            return
        data = session.read()
        attempts = data.get("attempts") or []
        attempts.append({"attempt": attempt, "started_at": time.time(), "resume_from": resume})
        facts: dict[str, Any] = {}
        if not attempt:
            # git status and nvidia-smi (~10-100 ms) run while the script starts, not before
            facts = {"git": sysinfo.git_info(self.spec.script.resolve().parent), "gpus": sysinfo.gpu_description()}
        here = backend.describe(handle).details.get("processes") or []
        self._record(f"attempt {attempt}'s start", session.update, attempts=attempts, resume_from=resume,
                     handle=handle.to_json(), **facts, processes=[_this_process("launcher"), *here])

    def _wait(self, backend: Backend, handle: Handle, output_done: threading.Event) -> Description:
        """Look at the attempt until it has ended; the end of its output wakes the loop at once."""
        pause = 0.001
        while True:
            end = backend.describe(handle)
            for kind, text in (end.details.get("warnings") or {}).items():
                self._warn_once(kind, text)
            if self.node is not None and self.session is not None:
                self._saw_node(self.session, end)
                if time.time() - self._node_entry.get("heartbeat_at", 0) >= NODE_HEARTBEAT_S:
                    self._save_node(self.session)  # "last heard" in sessions show; monitor warns when it stops
            if not end.running:
                return end
            if output_done.is_set():
                time.sleep(pause)
            else:
                output_done.wait(pause)
            pause = min(pause * 2, POLL_MAX_S)

    def _ended_attempts(self, session: Session, outcome: Outcome) -> list[dict[str, Any]]:
        """session.json's attempts with the latest one's end filled in (this node's, multi-node)."""
        attempts = (session.read().get("attempts") or []) if self.node is None else \
            [dict(a) for a in self._node_entry.get("attempts", [])]
        if attempts and isinstance(attempts[-1], dict):
            attempts[-1].update(ended_at=time.time(), exit_code=outcome.exit_code,
                                signal=outcome.signal, status=outcome.status)
        return attempts

    def _stop_requested(self, session: Session) -> bool:
        """`trainctl sessions stop` recorded a stop request for this session."""
        try:
            return bool(session.read().get("stop_request"))
        except Exception:
            return False

    def _classify(self, session: Session, end: Description, attempt: int) -> State:
        if self._stop_requested(session):
            return State.STOPPED
        if self.stop_signal is not None:
            return State.KILLED
        reported = None
        for event in session.iter_events(("status",)):
            if event.get("source") == "run" and event.get("attempt", 0) == attempt:
                reported = event.get("status")
        if end.exit_code == 0:
            return State.PREEMPTED if reported == State.PREEMPTED else State.COMPLETED
        if end.exit_code == EXIT_PREEMPTED or reported == State.PREEMPTED:
            return State.PREEMPTED
        if end.signal in ("SIGTERM", "SIGUSR1", "SIGINT") and reported != State.FAILED:
            return State.PREEMPTED  # stopped from outside (spot notice, cluster), not by us
        return State.FAILED

    def _should_restart(self, outcome: Outcome, attempt: int, failures: list[tuple[str, int]],
                        session: Session) -> bool:
        policy = self.policy
        if outcome.status not in policy.restart_on:
            return False
        if attempt >= policy.max_restarts:
            if policy.max_restarts:
                self.events.message(f"giving up after {policy.max_restarts} restart(s)")
            return False
        if outcome.status is State.FAILED:
            signature = next((line.strip() for line in reversed(outcome.output_tail) if line.strip()),
                             f"exit code {outcome.exit_code}") if outcome.exit_code != -9 else "SIGKILL"
            n_ckpt = sum(1 for _ in session.iter_events(("checkpoint",)))
            failures.append((signature, n_ckpt))
            recent = failures[-CRASH_LOOP_REPEATS:]
            if len(recent) == CRASH_LOOP_REPEATS and len({s for s, _ in recent}) == 1 \
                    and len({c for _, c in recent}) == 1 and signature != "SIGKILL":
                self.events.message(f"not restarting: the script failed {CRASH_LOOP_REPEATS} times in a row "
                                    f"with the same error and no new checkpoint: {signature}")
                self._record("a warning", session.event, "warning", message=f"crash loop stopped: {signature}")
                return False
        else:
            failures.clear()
        return True

    def _restart_checkpoint(self, session: Session, location: str) -> str | None:
        """The newest verified checkpoint of either kind: trainctl's own at the session's
        checkpoint location, or one the script wrote itself (never a torn one)."""
        if self._watching is not None and self._watching.watcher is not None:
            return self._watching.resume_point()
        from .. import checkpoint

        found, skipped = checkpoint.newest_valid(location)
        for path, why in skipped:
            self.events.message(f"skipping checkpoint {path}: {why}")
            self._record("a warning", session.event, "warning", message=f"skipped checkpoint {path}: {why}")
        return str(found) if found is not None else None

    def _still_valid(self, resume: str | None) -> str | None:
        """The attempt's own resume point again, unless it no longer verifies (a script's file
        torn by the kill during its overwrite)."""
        if resume is None:
            return None
        from .. import checkpoint

        result = checkpoint.verify(resume)
        if result.ok:
            return resume
        self.events.message(f"not resuming from {resume} again: {result.reason}")
        return None

    def _takes_resume_flag(self) -> bool:
        """Whether the script takes the resume flag: it names it, or (a flag like
        `--init_from=resume`) its source shows the convention, as nanoGPT's configurator does."""
        flag = self.cfg.resume_flag
        if resume_mod.script_takes_flag(self.spec.script, flag):
            return True
        if "=" not in flag:
            return False
        from .script_conventions import takes_resume_flag

        try:
            source = self.spec.script.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
        return takes_resume_flag(source, flag)

    def _node_restart_delay(self, session: Session, outcome: Outcome, attempt: int) -> State | None:
        """One node of several: the others end too (their collectives fail) and restart on their
        own; the resume point is chosen after the delay, once the head's last save is in place,
        so that every node resumes from the same checkpoint."""
        reason = outcome.signal or f"exit code {outcome.exit_code}"
        self.events.message(f"attempt {attempt} {outcome.status} ({reason}) on this node ({self.node_key}); the job "
                            f"restarts on every node in {self.policy.restart_delay_s:g}s")
        return self._wait_restart_delay(session)

    def _wait_restart_delay(self, session: Session) -> State | None:
        """Sleep the restart delay; KILLED or STOPPED when a signal or a stop request comes first."""
        deadline = time.monotonic() + self.policy.restart_delay_s
        next_look = 0.0
        while True:
            if self.stop_signal is not None:
                return State.KILLED
            now = time.monotonic()
            if now >= next_look or now >= deadline:  # looked at once more right before a launch
                if self._stop_requested(session):
                    return State.STOPPED
                next_look = now + STOP_POLL_S
            if now >= deadline:
                return None
            time.sleep(min(0.05, max(0.0, deadline - now)))

    # -------------------------------------------------------------- the end
    def _finish(self, session: Session, outcome: Outcome, attempts: int, started: float,
                location: str) -> RunResult:
        ended = time.time()
        summary = summarize_metrics([*session.metrics(), *self._unrecorded_metrics])
        ckpt_events = list(session.iter_events(("checkpoint",)))
        # every checkpoint this session wrote has an event: none, nothing to look for
        newest = None
        watcher = self._watching.watcher if self._watching is not None else None
        if watcher is not None and watcher.entries:
            from .script_checkpoints import summarize

            summary["script_checkpoints"] = summarize(watcher.entries)
            choice = self._watching.choose()
            newest = str(choice.path) if choice.path is not None else None
        elif ckpt_events:
            from .. import checkpoint

            found = checkpoint.newest_valid(location, verify_digest=False)[0]
            newest = str(found) if found else None
        summary.update(checkpoints=len(ckpt_events), last_checkpoint=newest,
                       duration_s=round(ended - started, 3), attempts=attempts)
        diagnosis = None
        if outcome.status is State.FAILED:
            from .diagnose import diagnose

            diag = diagnose("\n".join(outcome.output_tail), exit_code=outcome.exit_code,
                            signal_name=outcome.signal, script=str(self.spec.script),
                            args=list(self.spec.args), checkpoint=newest, resume_flag=self.cfg.resume_flag)
            diagnosis = diag.to_dict() if diag else None
        record = {"status": outcome.status, "ended_at": ended, "exit_code": outcome.exit_code,
                  "signal": outcome.signal, "summary": summary, "diagnosis": diagnosis}
        if self._final_attempts is not None:
            record["attempts"] = self._final_attempts
        if self.node is not None:
            self._save_node(session, state=outcome.status.value, ended_at=ended, exit_code=outcome.exit_code,
                            signal=outcome.signal, attempts=self._final_attempts or self._node_entry.get("attempts"))
            # in a session folder the nodes share, the node that held global rank 0 records the end
            if not self._node_entry.get("head") and self._other_head(session):
                return RunResult(session, outcome, summary, diagnosis, newest, exit_code_for(outcome), record)
        self._record("how the session ended", session.update, **record)
        self._record("how the session ended", session.event, "status", status=outcome.status, source="launcher",
                     exit_code=outcome.exit_code, signal=outcome.signal)
        if self.unrecorded:
            missing = ", ".join(dict.fromkeys(self.unrecorded))
            self.events.message(f"the session store's disk failed: not recorded in {session.dir}: {missing}. "
                                f"Free space there (df -h {session.dir}); the output and checkpoints are kept.")
        return RunResult(session, outcome, summary, diagnosis, newest, exit_code_for(outcome), record)


def _write_derived_json(path: Path, data: Any) -> None:
    """Atomic but not fsynced: config.json is rewritten from trainctl.toml at every launch, so
    a power cut can cost nothing that is not made again, and the fsyncs (here ~5 ms) delayed
    the script's start."""
    import json

    with temp_beside(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)


class ScriptCheckpoints:
    """The checkpoints the script writes itself, for one session (launcher/script_checkpoints.py):
    watched from the first launch on, settled after each attempt, and the newest verified one
    of either kind chosen for a restart. The watcher is built and polls in its own thread, so
    its imports and first scan overlap the script's start-up instead of delaying it."""

    def __init__(self, engine: Supervisor, session: Session, location: str) -> None:
        self.engine = engine
        self.session = session
        self.location = Path(location)
        self.remote = "://" in location  # a storage URI: the files are not on this machine
        self.since = time.time()  # before the first launch: whatever the script writes is newer
        self.watcher: Any = None
        self._starter: threading.Thread | None = None

    def start(self) -> None:
        # only where the script's files are: this machine (the agent runs the engine on a rented one)
        if self.engine.backend_name != "local" or self.remote:
            return
        if self._starter is None:
            self._starter = threading.Thread(target=self._build, daemon=True, name="trainctl-watch-start")
            self._starter.start()

    def _build(self) -> None:
        from . import script_checkpoints as sc

        cfg, spec = self.engine.cfg, self.engine.spec
        try:
            source = spec.script.read_text(encoding="utf-8", errors="replace")
        except OSError:
            source = None
        cwd = Path(spec.cwd or Path.cwd()).resolve()
        roots = sc.watch_roots(list(spec.args), cwd=cwd, checkpoint_dir=self.location,
                               globs=cfg.get("checkpoints", "watch"), glob_base=cfg.root, source=source)
        watcher = sc.Watcher(
            roots, manifest_path=self.session.dir / sc.MANIFEST_NAME, on_event=self._on_event,
            started_at=self.since, cwd=cwd, exclude=[cfg.state_dir, cfg.checkpoint_dir],
            snapshot_dir=self.location / sc.SNAPSHOT_FOLDER if cfg.get("checkpoints", "snapshot") else None,
            retention=cfg, session_id=self.session.id, script=str(spec.script.resolve()), name=spec.name)
        watcher.start()
        self.watcher = watcher

    def _on_event(self, event: dict[str, Any]) -> None:
        self.session.append_events([event])
        if event.get("kind") == "warning":
            self.engine.events.message(event["message"])

    def settle(self) -> None:
        """After an attempt: take everything the script finished writing (and report what it
        left torn) before anything reads the session's checkpoints."""
        if self._starter is not None:
            self._starter.join()
        if self.watcher is not None:
            self.watcher.poll(final=True)

    def choose(self) -> Any:
        return self.watcher.choose_resume(own_dir=self.location, takes_path="=" not in self.engine.cfg.resume_flag)

    def resume_point(self) -> str | None:
        """The path to resume from, said and recorded: what was passed over and why, and a
        snapshot put back where a script that reads its own file (nanoGPT) will find it."""
        from .script_checkpoints import restore_snapshot

        choice = self.choose()
        for path, why in choice.skipped:
            self.engine.events.message(f"not resuming from {path}: {why}")
            self.session.event("warning", message=f"skipped checkpoint {path}: {why}")
        if choice.path is None:
            return None
        target = choice.path
        if choice.restore_to is not None:
            moved = restore_snapshot(choice.path, choice.restore_to)
            kept = f" (the torn file is kept as {self.watcher.display(moved)})" if moved else ""
            self.engine.events.message(f"put back {choice.label} from its snapshot {choice.path}{kept}")
            self.session.event("restore", path=str(choice.restore_to), snapshot=str(choice.path),
                               kept=str(moved) if moved else None)
            target = choice.restore_to
        if choice.source != "trainctl":
            self.engine.events.message(f"resuming from {choice.label}, written by the script")
        return str(target)

    def stop(self) -> None:
        if self._starter is not None:
            self._starter.join()
        if self.watcher is not None:
            self.watcher.stop()


def install_stop_signals(handler: Any) -> dict[int, Any]:
    """`handler` for SIGINT, SIGTERM and SIGHUP (in the main thread only; elsewhere nothing);
    returns the handlers it replaced, to put back."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            previous[signum] = signal.signal(signum, handler)
        except (ValueError, OSError):
            pass
    return previous


def _stop_signal_name(signum: int) -> str:
    """What the script gets when the launcher receives `signum`: the same signal, except that
    a closed terminal (SIGHUP) stops it like SIGTERM, with its emergency checkpoint."""
    return "SIGTERM" if signum == signal.SIGHUP else signal.Signals(signum).name


def _this_process(role: str) -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "start_ticks": sysinfo.process_start_ticks(pid), "role": role}
