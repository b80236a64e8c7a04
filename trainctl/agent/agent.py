"""The agent: what runs on a rented machine from boot to the machine's end.

    boot     ended.json? -> end. deadline passed? -> end. count the boot; past K failed boots -> end.
             take the session's lease (one writer), start syncing
    set up   fetch + verify + extract the bundle; the environment on the image's torch;
             download + verify the newest checkpoint when resuming; secrets for the script only
    run      the training through the engine (`trainctl local`), synced to storage, watched:
             interruption notice -> emergency checkpoint, upload it if it fits, record preempted,
                                    exit 75 and leave the machine to the platform
             rebalance           -> a checkpoint now, training goes on
             the deadline        -> stop with a checkpoint, end
             another writer      -> stop, end this machine
    end      final sync, the end reason in ended.json, then the machine ends itself (the hook)

Every way out but a platform interruption ends the machine through the `MachineEnd` hook, so
nothing bills after the session: a setup failure, a failed run, an agent crash, the deadline.
`--keep-on-failure` keeps a failed machine for debugging, until the deadline only. Each phase
of the start is recorded as a `startup` event (time to first step, with its causes).
"""

from __future__ import annotations

import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import sysinfo
from ..errors import EXIT_PREEMPTED, TrainctlError, UsageError
from ..fsutil import atomic_write_json
from ..redact import redact_args
from ..storage import StorageError, open_store
from ..storage.remote import RemoteSession
from ..storage.uri import parse_uri
from .ending import EndFailedError, MachineEnd, open_end_hook
from .environment import Prepared, SetupError, find_interpreter, setup_environment
from .lease import Lease, LeaseLostError
from .nodes import NODE_LOST, NodesWatch
from .preemption import INTERRUPTION, STOP, Notice, PreemptionWatch, open_watches
from .runner import AgentEvents, EngineRun
from .secrets import open_secret_store, resolve_secrets
from .sync import SyncLoop

EXIT_DONE = 0  # the session ended here (completed, or ended for good): power off
EXIT_FAILED = 1  # the session failed, or this machine may not write it: power off
CHECKPOINT_SIGNAL = "SIGUSR2"  # the runtime writes a checkpoint and keeps training
DEADLINE_VARIABLES = ("TRAINCTL_DEADLINE", "TRAINCTL_DEADLINE_UTC")
POLL_S = 0.2


def parse_deadline(text: str | None) -> float | None:
    """An absolute UTC time ("2026-05-01T12:00:00Z", any ISO 8601 with a zone) or unix seconds."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise UsageError(f"Deadline {text!r} is not an absolute UTC time.",
                         "Write it like 2026-05-01T12:00:00Z (a zone is required), or as unix seconds.")
    return when.timestamp()


def machine_started_t() -> float | None:
    """When this machine (or container) started: PID 1's start time (Linux)."""
    try:
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        ticks = sysinfo.process_start_ticks(1)
        return None if ticks is None else btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError):
        return None


@dataclass
class AgentSettings:
    """What the agent is told (command line, else the boot script's TRAINCTL_* variables)."""

    storage: str
    project: str
    session_id: str
    machine_dir: Path
    script: str | None = None
    args: list[str] = field(default_factory=list)
    endpoint_url: str | None = None
    region: str | None = None
    checksums: str = "when_supported"
    deadline_t: float | None = None
    deadline_margin_s: float = 120.0
    attempt: int = 0
    backend: str = "local"
    machine_id: str | None = None
    watch: str = "signal"
    watch_interval_s: float = 5.0
    signal_grace_s: float = 5.0
    end: str = "none"
    end_command: str | None = None
    keep_on_failure: bool = False
    max_failed_boots: int = 3
    setup: str = "auto"
    python: str | None = None
    pip_args: list[str] = field(default_factory=list)
    allow_torch_replace: bool = False
    sync_interval_s: float = 10.0
    heartbeat_s: float = 30.0
    lease_ttl_s: float = 120.0
    lease_wait_s: float = 150.0
    secrets: list[str] = field(default_factory=list)
    secret_store: str | None = None
    grace_period_s: float = 30.0
    engine: dict[str, Any] = field(default_factory=dict)  # name, nproc_per_node, max_restarts, restart_on, preflight
    nnodes: int = 1  # a multi-node job: how many machines, and which one this is (0: the head)
    node_rank: int = 0
    rdzv_port: int = 29400
    head_wait_s: float = 900.0  # how long a node waits for the head to publish its address

    @property
    def worker_node(self) -> bool:
        """A node of a multi-node job other than the head: it neither holds the lease nor syncs."""
        return self.nnodes > 1 and self.node_rank != 0

    def session_uri(self) -> str:
        return str(parse_uri(self.storage).join(self.project, self.session_id))


class _SessionEnded(Exception):
    """The session ended (its tombstone is in storage) before this node's part started."""


def private_address() -> str:
    """This machine's private IPv4 address from IMDS (local-ipv4): the address the placement
    group's members reach each other on (AWS_EC2_METADATA_SERVICE_ENDPOINT honoured)."""
    from ..backends.aws import _imds

    return _imds("/latest/meta-data/local-ipv4")


class _Interrupted(Exception):
    """An interruption notice (or a lost lease) arrived before the training started."""

    def __init__(self, notice: Notice) -> None:
        super().__init__(notice.action)
        self.notice = notice


class Agent:
    """One boot of one machine for one session; `run()` returns the exit code for the boot script."""

    def __init__(self, settings: AgentSettings, *, end_hook: MachineEnd | None = None,
                 watches: list[PreemptionWatch] | None = None) -> None:
        self.s = settings
        self.started_t = time.time()
        self.machine_t = machine_started_t()
        self.end_hook = end_hook or open_end_hook(settings.end, command=settings.end_command)
        self.watches = watches if watches is not None else open_watches(
            settings.watch, interval_s=settings.watch_interval_s, signal_grace_s=settings.signal_grace_s,
            stop_grace_s=settings.grace_period_s)
        self.machine_dir = Path(settings.machine_dir).absolute()
        self.remote: RemoteSession | None = None
        self.lease: Lease | None = None
        self.sync: SyncLoop | None = None
        self.runner: EngineRun | None = None
        self.boot = 0
        self.notices: queue.SimpleQueue[Notice] = queue.SimpleQueue()
        self.timings: dict[str, float] = {}
        self.machine: dict[str, Any] = {}

    # --- the story ----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            return self._run()
        except Exception as e:  # the agent itself failed: end the machine anyway
            return self._crashed(e)
        finally:
            for watch in self.watches:
                watch.stop()

    def _run(self) -> int:
        s = self.s
        for watch in self.watches:  # first: a SIGTERM must never kill the agent outright
            watch.start(self.notices)
        self.machine_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(s.session_uri(), endpoint_url=s.endpoint_url, region=s.region, checksums=s.checksums,
                           upload_state_dir=self.machine_dir / "uploads")
        remote = self.remote = RemoteSession(store)
        ended = remote.ended()
        if ended is not None:
            return self._end_now(f"the session already ended ({ended.get('reason')})", tombstone=False)
        if s.deadline_t is not None and time.time() >= s.deadline_t:
            return self._end_now("the deadline passed before this machine booted", tombstone=True)
        if s.worker_node:
            return self._run_node()
        self.boot = remote.count_boot(machine=s.machine_id, attempt=s.attempt, pid=os.getpid())
        self.machine = {"id": s.machine_id or f"{sysinfo.host()}-boot{self.boot}", "host": sysinfo.host(),
                        "boot": self.boot, "backend": s.backend, "agent_pid": os.getpid()}
        self._write_boot_record()
        self.lease = Lease(remote, ttl_s=s.lease_ttl_s, machine=self.machine["id"], boot=self.boot)
        failed = remote.failed_boots(self.boot)
        holder = self.lease.holder()
        if failed >= s.max_failed_boots and not (holder and self.lease.holder_alive(*holder)):
            # (with a live writer the session is not stuck: these boots were extra machines)
            return self._end_now(f"{failed} boots in a row failed before training started (limit {s.max_failed_boots})",
                                 tombstone=True)
        try:
            self.lease.acquire(wait_s=s.lease_wait_s)
        except LeaseLostError as e:
            return self._end_now(f"another machine writes this session ({e})", tombstone=False, code=EXIT_FAILED)
        if remote.ended() is not None:  # ended while this machine waited for the lease
            return self._end_now("the session ended while this machine waited", tombstone=False)
        self.sync = SyncLoop(remote, lease=self.lease, interval_s=s.sync_interval_s, heartbeat_s=s.heartbeat_s,
                             on_lost=lambda why: self.notices.put(Notice("lost", why, None, "lease", time.time())),
                             on_first_step=self._on_first_step, machine=self.machine, session_id=s.session_id)
        self.sync.start()
        self._timing("boot", self.started_t - self.machine_t if self.machine_t else None)
        try:
            project, prepared, resume, secrets = self._set_up()
        except _Interrupted as interrupted:
            if interrupted.notice.kind == "lost":
                return self._lost(interrupted.notice.action)
            if interrupted.notice.kind == STOP:
                return self._stopped(interrupted.notice)
            return self._preempted(interrupted.notice)
        except (SetupError, UsageError, StorageError, OSError) as e:
            return self._fail_setup(e)
        return self._train(project, prepared, resume, secrets)

    def _raise_if_interrupted(self) -> None:
        """Between set-up steps: act on an interruption or a lost lease now, not after the rest."""
        held = []
        try:
            while True:
                notice = self.notices.get_nowait()
                if notice.kind in (INTERRUPTION, STOP, "lost"):
                    for other in held:
                        self.notices.put(other)
                    raise _Interrupted(notice)
                held.append(notice)
        except queue.Empty:
            for other in held:
                self.notices.put(other)

    # --- setting up ---------------------------------------------------------------------------
    def _set_up(self) -> tuple[Path, Prepared, str | None, dict[str, str]]:
        assert self.remote is not None
        s = self.s
        from ..storage.bundle import extract_bundle

        t = time.monotonic()
        self._say(f"fetching the code bundle of {self.remote.uri}")
        record, archive, wheel = self.remote.fetch_code(self.machine_dir / "code")
        project = self.machine_dir / "project"
        files = extract_bundle(archive, project, sha256=record["bundle"]["sha256"])
        self._timing("bundle", time.monotonic() - t, files=len(files), bytes=record["bundle"].get("bytes"))
        self._raise_if_interrupted()

        t = time.monotonic()
        interpreter = find_interpreter(s.python)
        self._say(f"python {interpreter.path}: torch {interpreter.torch}, CUDA {interpreter.cuda_version or 'none'}"
                  f"{'' if interpreter.cuda else ' (no GPU visible)'}")
        prepared = setup_environment(project, interpreter, mode=s.setup, venv_dir=self.machine_dir / "env" / "venv",
                                     wheel=wheel, pip_args=s.pip_args, allow_torch_replace=s.allow_torch_replace,
                                     log=self._log_line)
        self._timing("environment", time.monotonic() - t, mode=prepared.mode, python=prepared.python,
                     torch=interpreter.torch, cuda=interpreter.cuda)
        self._raise_if_interrupted()

        resume = None
        latest = self.remote.latest_checkpoint()
        if latest is not None:
            t = time.monotonic()
            self._say(f"resuming from {latest['file']} (step {latest.get('step')})")
            resume = str(self.remote.fetch_checkpoint(self.machine_dir / "resume", latest))
            self._timing("checkpoint", time.monotonic() - t, file=latest["file"], bytes=latest.get("bytes"))
            self._raise_if_interrupted()

        secrets: dict[str, str] = {}
        if s.secrets:
            if not s.secret_store:
                raise UsageError(f"--secret {s.secrets[0]} needs a secret store.",
                                 "Pass --secret-store (the launcher sets it).")
            secrets = resolve_secrets(open_secret_store(s.secret_store), s.secrets)
            self._say(f"{len(secrets)} secret(s) for the script: {', '.join(sorted(secrets))}")
        if s.script is None:
            run = record.get("run") if isinstance(record.get("run"), dict) else {}
            if not run.get("script"):
                raise UsageError("No script to run: none was given and the bundle names none.",
                                 "Pass SCRIPT [ARGS]... to trainctl agent.")
            s.script, s.args = str(run["script"]), [str(a) for a in run.get("args") or []]
        return project, prepared, resume, secrets

    def _fail_setup(self, e: BaseException) -> int:
        message = str(e) + (f" ({e.hint})" if isinstance(e, TrainctlError) and e.hint else "")
        self._say(f"setup failed: {message}")
        assert self.sync is not None
        self.sync.add_events([{"kind": "status", "status": "failed", "error": f"setup failed: {e}"}])
        self.sync.close(status="failed")
        return self._finish(f"setup failed: {e}", status="failed", code=EXIT_FAILED)

    # --- training -------------------------------------------------------------------------------
    def _train(self, project: Path, prepared: Prepared, resume: str | None, secrets: dict[str, str]) -> int:
        from ..checkpoint import retention_settings

        assert self.sync is not None and self.remote is not None
        s = self.s
        options = dict(s.engine)
        events = AgentEvents(self._say, on_attempt=lambda session, attempt: self._attach(session),
                             on_end=self.sync.request)
        env = {**secrets, "TRAIN_OPS_BACKEND": s.backend}  # the script's environment only, never recorded
        try:
            node = self._publish_head() if s.nnodes > 1 else None
            runner = self.runner = EngineRun(prepared.python, project, s.script or "", s.args, events=events,
                                             resume=resume, env=env, grace_period_s=s.grace_period_s, node=node,
                                             **options)
            self.sync.retention = retention_settings(runner.cfg)
            self._say("starting: " + " ".join(redact_args(runner.command)))
            self._attach(runner.prepare())
        except (TrainctlError, OSError) as e:  # pre-flight, a resume checkpoint that does not verify
            return self._fail_setup(e)
        runner.start()
        self._watch_nodes()
        stop_at = None if s.deadline_t is None else s.deadline_t - s.deadline_margin_s
        while True:
            if runner.done():
                return self._after_run()
            if stop_at is not None and time.time() >= stop_at:
                return self._deadline()
            try:
                notice = self.notices.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if notice.kind == "lost":
                return self._lost(notice.action)
            if notice.kind == INTERRUPTION:
                return self._preempted(notice)
            if notice.kind == STOP:
                return self._stopped(notice)
            if notice.kind == NODE_LOST:
                return self._node_lost(notice)
            self._rebalance(notice)

    # --- one node of several ------------------------------------------------------------------
    def _node_resources(self, head: str) -> dict[str, Any]:
        """This node's part for the engine: torchrun's static rendezvous at the head, so the
        node rank is the group rank and global rank 0 (checkpoints, metrics) runs on the head,
        whose agent syncs them; the rendezvous id is the session id."""
        from ..backends.torchrun import NodeSpec
        from ..launcher.multinode import with_network

        node = NodeSpec(nnodes=self.s.nnodes, host=head, port=self.s.rdzv_port, rdzv_id=self.s.session_id,
                        node_rank=self.s.node_rank, source="aws", rdzv_backend="static")
        return {**with_network(node).to_resources(), "node_key": f"node{self.s.node_rank}"}

    def _publish_head(self) -> dict[str, Any]:
        """The head: its private address (IMDS local-ipv4) in the session's storage, for the others."""
        assert self.remote is not None
        address = private_address()
        self.remote.publish_head(attempt=self.s.attempt, address=address, port=self.s.rdzv_port, boot=self.boot,
                                 machine=self.machine.get("id"))
        self._say(f"node 0 of {self.s.nnodes} (the head): the rendezvous is at {address}:{self.s.rdzv_port}")
        return self._node_resources(address)

    def _watch_nodes(self) -> None:
        """On AWS: the head watches the job's other machines in EC2 (a lost one stops the job),
        the others watch the head's."""
        s = self.s
        if s.nnodes < 2 or s.backend != "aws":
            return
        from functools import partial

        from ..backends.aws import node_machines

        look = partial(node_machines, s.session_id, s.attempt, region=s.region, endpoint_url=s.endpoint_url)
        watch = NodesWatch(look, s.nnodes, ranks=(0,) if s.worker_node else None,
                           interval_s=max(1.0, 3 * s.watch_interval_s))
        watch.start(self.notices)
        self.watches.append(watch)

    def _node_lost(self, notice: Notice) -> int:
        """Another machine of the job is gone: stop everywhere now, with the emergency checkpoint
        where the ranks can still agree on it; the session ends failed (the other nodes stop on
        its end) and resumes with the same number of machines through `trainctl aws resume`."""
        assert self.sync is not None
        self._say(f"{notice.action}: stopping the job on every node (emergency checkpoint where possible); "
                  f"continue it on {self.s.nnodes} new machines with: trainctl aws resume {self.s.session_id}")
        self.sync.add_events([{**notice.to_dict(), "kind": "notice", "notice": notice.kind}])
        if self.runner is not None:
            self._stop_runner(time.time() + self.s.grace_period_s + 5.0)
        self.sync.add_events([{"kind": "status", "status": "failed", "error": notice.action}])
        self.sync.close(status="failed")
        return self._finish(notice.action, status="failed", code=EXIT_FAILED)

    def _wait_for_head(self) -> str:
        """The head's address for this attempt, from storage: never guessed. Interruptions and
        the session's end are acted on while waiting."""
        assert self.remote is not None
        until = time.time() + self.s.head_wait_s
        while True:
            head = self.remote.read_head()
            if isinstance(head, dict) and head.get("attempt") == self.s.attempt and head.get("address"):
                return str(head["address"])
            if self.remote.ended() is not None:
                raise _SessionEnded("the session ended while this node waited for the head")
            if time.time() >= until:
                raise SetupError(f"node 0 (the head) did not publish its address in {self.s.head_wait_s:g} s.",
                                 "Look at the head's boot log (trainctl aws status SESSION names the machines).")
            self._raise_if_interrupted()
            time.sleep(min(2.0, max(0.05, self.s.head_wait_s / 100)))

    def _run_node(self) -> int:
        """A node other than the head: the same set-up, then its part of the job once the head's
        address is in storage. The head's agent holds the lease and writes the session; this one
        records nothing there and ends its own machine when its part ends (or the session does)."""
        s = self.s
        self.machine = {"id": s.machine_id or f"{sysinfo.host()}-node{s.node_rank}", "host": sysinfo.host(),
                        "node_rank": s.node_rank, "backend": s.backend, "agent_pid": os.getpid()}
        self._write_boot_record()
        self._say(f"node {s.node_rank} of {s.nnodes}: waiting for the head's address in {s.session_uri()}")
        try:
            project, prepared, resume, secrets = self._set_up()
            head = self._wait_for_head()
        except _SessionEnded as e:
            return self._end_now(str(e), tombstone=False)
        except _Interrupted as interrupted:
            code = EXIT_PREEMPTED if interrupted.notice.kind == INTERRUPTION else EXIT_DONE
            return self._finish(f"{interrupted.notice.kind} before training", status=None, code=code, tombstone=False)
        except (SetupError, UsageError, StorageError, OSError) as e:
            return self._finish(f"setup failed: {e}", status="failed", code=EXIT_FAILED, tombstone=False)
        events = AgentEvents(self._say, on_attempt=lambda session, attempt: None, on_end=lambda: None)
        env = {**secrets, "TRAIN_OPS_BACKEND": s.backend}
        try:
            runner = self.runner = EngineRun(prepared.python, project, s.script or "", s.args, events=events,
                                             resume=resume, env=env, grace_period_s=s.grace_period_s,
                                             node=self._node_resources(head), **dict(s.engine))
            self._say(f"node {s.node_rank} of {s.nnodes}: joining the head at {head}:{s.rdzv_port}")
            runner.prepare()
        except (TrainctlError, OSError) as e:
            return self._finish(f"setup failed: {e}", status="failed", code=EXIT_FAILED, tombstone=False)
        runner.start()
        self._watch_nodes()
        stop_at = None if s.deadline_t is None else s.deadline_t - s.deadline_margin_s
        look_at = time.monotonic()
        while True:
            if runner.done():
                outcome = runner.outcome()
                ended = self._session_end()
                if ended is not None and outcome["status"] != "completed":  # the job stopped everywhere
                    return self._finish(f"the session ended ({ended.get('reason')})", status=None, code=EXIT_DONE,
                                        tombstone=False)
                self._say(f"node {s.node_rank}: its part ended: {outcome['status']} (exit code {outcome['exit_code']})")
                return self._finish(f"node {s.node_rank}: {outcome['status']}", status=None, tombstone=False,
                                    code=EXIT_DONE if outcome["status"] == "completed" else EXIT_FAILED)
            if stop_at is not None and time.time() >= stop_at:
                self._stop_runner(min(s.deadline_t or time.time(), time.time() + s.grace_period_s + 5.0))
                return self._finish("the max-hours deadline was reached", status=None, code=EXIT_DONE, tombstone=False)
            if time.monotonic() >= look_at:  # the whole job stops everywhere once the session ended
                look_at = time.monotonic() + max(1.0, s.sync_interval_s)
                ended = self._session_end()
                if ended is not None:
                    self._stop_runner(time.time() + s.grace_period_s + 5.0)
                    return self._finish(f"the session ended ({ended.get('reason')})", status=None, code=EXIT_DONE,
                                        tombstone=False)
            try:
                notice = self.notices.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if notice.kind in (INTERRUPTION, STOP, NODE_LOST):
                self._say(f"node {s.node_rank}: {notice.kind} ({notice.action}): stopping its part")
                self._stop_runner(time.time() + s.grace_period_s + 5.0)
                # a lost head ends the job; an interruption or a stop leaves the machine as the head's would
                return self._finish(f"node {s.node_rank}: {notice.action}", status=None, tombstone=False,
                                    code=EXIT_FAILED if notice.kind == NODE_LOST else EXIT_PREEMPTED)

    def _session_end(self) -> dict[str, Any] | None:
        """The session's tombstone, when storage can be read and it is there."""
        try:
            return self.remote.ended() if self.remote is not None else None
        except StorageError:
            return None

    def _attach(self, session: Any) -> None:
        if self.sync is not None and self.sync.session is None:
            self.sync.attach(session.dir)

    def _after_run(self) -> int:
        assert self.runner is not None and self.sync is not None and self.remote is not None
        outcome = self.runner.outcome()
        status = outcome["status"]
        self._say(f"training ended: {status} (exit code {outcome['exit_code']})")
        self.sync.close(status=status)
        if self.sync.lost:
            return self._lost(self.sync.lost)
        if status == "completed":
            self.remote.mark_boot_healthy(self.boot)
            return self._finish("training completed", status=status, code=EXIT_DONE)
        if status == "preempted":
            # stopped by a signal no watch saw as the platform's: resumable, but nothing will
            # reclaim this machine, so it ends itself (no tombstone)
            return self._finish("the script stopped on a preemption signal", status=status, code=EXIT_DONE,
                                tombstone=False)
        diagnosis = (outcome.get("diagnosis") or {}).get("summary") if isinstance(outcome.get("diagnosis"), dict) else None
        return self._finish(f"training {status} (exit code {outcome['exit_code']})" + (f": {diagnosis}" if diagnosis else ""),
                            status=status, code=EXIT_FAILED)

    def _stop_runner(self, until_t: float) -> None:
        """Stop the engine (the script writes its emergency checkpoint), with the grace period
        cut to end by `until_t`; then whatever is left is killed."""
        assert self.runner is not None
        while not self.runner.done() and time.time() < until_t:
            self.runner.stop(grace_period_s=max(0.0, min(self.s.grace_period_s, until_t - time.time())))
            self.runner.wait(POLL_S)
        if not self.runner.done():
            self.runner.stop(now=True)
            self.runner.wait(10)

    def _preempted(self, notice: Notice) -> int:
        assert self.sync is not None and self.remote is not None
        left = notice.seconds_left()
        self._say(f"interruption notice ({notice.source}: {notice.action}); the machine goes in "
                  f"{left:.0f}s: emergency checkpoint, then the upload if it fits" if left is not None
                  else f"interruption notice ({notice.source}: {notice.action})")
        self.sync.add_events([{**notice.to_dict(), "kind": "notice", "notice": notice.kind}])
        self.sync.set_deadline(notice.deadline_t)
        deadline = notice.deadline_t or time.time() + self.s.grace_period_s
        if self.runner is not None:
            self._stop_runner(deadline - 1.0)
        self.sync.close(status="preempted", timeout_s=max(1.0, deadline - time.time() - 1.0))
        if self.sync.lost is None:
            try:
                self.remote.mark_boot_healthy(self.boot)
            except StorageError:
                pass
        # the platform reclaims the machine (AWS does not bill a spot machine it interrupts in its
        # first hour); a replacement resumes from latest.json
        return EXIT_PREEMPTED

    def _stopped(self, notice: Notice) -> int:
        """A stop request (`trainctl aws stop`: the launcher deleted the fleet, then sent SIGTERM):
        emergency checkpoint, last sync, the machine ends; no tombstone, the session can resume."""
        assert self.sync is not None
        self._say(f"stop requested ({notice.action}): emergency checkpoint, last sync, then this machine ends")
        self.sync.add_events([{**notice.to_dict(), "kind": "notice", "notice": notice.kind}])
        if self.runner is not None:
            self._stop_runner(time.time() + self.s.grace_period_s + 5.0)
        self.sync.close(status="stopped")
        # 75, like a preemption (the launcher resumes or ends the session; the boot script leaves
        # the machine alone): this machine ends itself here all the same, laptop or not
        return self._finish("stopped on request", status="stopped", code=EXIT_PREEMPTED, tombstone=False)

    def _rebalance(self, notice: Notice) -> None:
        assert self.sync is not None and self.runner is not None
        sent = self._request_checkpoint()
        self._say("rebalance recommendation: " + ("checkpoint requested, training goes on" if sent else
                                                  "the script takes no checkpoint signal; the newest checkpoint is synced"))
        self.sync.add_events([{**notice.to_dict(), "kind": "notice", "notice": notice.kind, "checkpoint_requested": sent}])
        self.sync.request()

    def _request_checkpoint(self) -> bool:
        """A checkpoint now, without stopping (where the script's runtime takes the signal)."""
        assert self.runner is not None
        return self.runner.request_checkpoint(CHECKPOINT_SIGNAL)

    def _deadline(self) -> int:
        assert self.sync is not None and self.s.deadline_t is not None
        self._say("the max-hours deadline is near: stopping with a checkpoint")
        self.sync.set_deadline(self.s.deadline_t)
        self._stop_runner(min(self.s.deadline_t, time.time() + self.s.grace_period_s + 5.0))
        self.sync.add_events([{"kind": "status", "status": "killed", "error": "max-hours deadline"}])
        self.sync.close(status="killed", timeout_s=max(1.0, self.s.deadline_t - time.time() - 5.0))
        return self._finish("the max-hours deadline was reached", status="killed", code=EXIT_DONE)

    def _lost(self, why: str) -> int:
        self._say(f"this machine no longer owns the session: {why}")
        if self.runner is not None and not self.runner.done():
            self._stop_runner(time.time() + self.s.grace_period_s + 5.0)
        if self.sync is not None:
            self.sync.close()
        return self._end_now(f"another machine writes this session ({why})", tombstone=False, code=EXIT_FAILED)

    def _crashed(self, e: BaseException) -> int:
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        print(text, file=sys.stderr, flush=True)
        try:
            if self.runner is not None and not self.runner.done():
                self._stop_runner(time.time() + self.s.grace_period_s + 5.0)
            if self.sync is not None:
                self.sync.note("the agent failed:\n" + text)
                self.sync.add_events([{"kind": "status", "status": "failed",
                                       "error": f"agent failed: {type(e).__name__}: {e}"}])
                self.sync.close(status="failed")
        except Exception as inner:  # the end must still happen
            print(f"[trainctl agent] final sync failed: {inner}", file=sys.stderr, flush=True)
        return self._finish(f"the agent failed: {type(e).__name__}: {e}", status="failed", code=EXIT_FAILED,
                            tombstone=self.remote is not None and self.lease is not None and self.lease.term is not None)

    # --- the end ---------------------------------------------------------------------------------
    def _end_now(self, reason: str, *, tombstone: bool, code: int = EXIT_DONE) -> int:
        """The end before any training: nothing to sync."""
        self._say(f"ending: {reason}")
        return self._finish(reason, status=None, code=code, tombstone=tombstone)

    def _finish(self, reason: str, *, status: str | None, code: int, tombstone: bool = True) -> int:
        if tombstone and self.remote is not None:
            try:
                self.remote.mark_ended(reason, status=status, boot=self.boot, machine=self.machine.get("id"))
            except StorageError as e:
                self._say(f"could not record the end in storage: {e}")
        if code == EXIT_FAILED and status is not None and self.s.keep_on_failure:
            self._keep_until_deadline()
        try:
            self._say(f"ending this machine ({self.end_hook.describe()}): {reason}")
            self.end_hook.end_machine(reason)
        except EndFailedError as e:
            self._say(f"{e} {e.hint}")
        return code

    def _keep_until_deadline(self) -> None:
        if self.s.deadline_t is None:
            self._say("--keep-on-failure: no deadline was given, so the machine is not kept")
            return
        self._say(f"--keep-on-failure: keeping the machine for debugging until the deadline "
                  f"({datetime.fromtimestamp(self.s.deadline_t, timezone.utc):%Y-%m-%dT%H:%M:%SZ})")
        while time.time() < self.s.deadline_t:
            time.sleep(min(30.0, max(0.05, self.s.deadline_t - time.time())))

    # --- records --------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        print(f"[trainctl agent] {text}", file=sys.stderr, flush=True)
        if self.sync is not None:
            self.sync.note(text)

    def _log_line(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        if self.sync is not None:
            self.sync.note(line)

    def _timing(self, phase: str, seconds: float | None, **details: Any) -> None:
        """A `startup` event: how long `phase` took and how far from the machine's start it ended."""
        now = time.time()
        event = {"kind": "startup", "phase": phase, "seconds": None if seconds is None else round(seconds, 3),
                 "since_start_s": round(now - (self.machine_t or self.started_t), 3), **details}
        self.timings[phase] = event["seconds"] if seconds is not None else 0.0
        if self.sync is not None:
            self.sync.add_events([event])

    def _on_first_step(self, event: dict[str, Any]) -> None:
        t = float(event.get("t") or time.time())
        assert self.sync is not None and self.remote is not None
        self.sync.add_events([{"kind": "startup", "phase": "first_step", "step": event.get("step"),
                               "seconds": round(t - self.started_t, 3),
                               "since_start_s": round(t - (self.machine_t or self.started_t), 3)}])
        try:
            self.remote.mark_boot_healthy(self.boot)
        except StorageError:
            pass  # counted as healthy at the end instead

    def _write_boot_record(self) -> None:
        record = {"session": self.s.session_uri(), "boot": self.boot, "machine": self.machine,
                  "agent_started_t": self.started_t, "machine_started_t": self.machine_t,
                  "deadline_t": self.s.deadline_t, "python": sys.executable, "pid": os.getpid(),
                  "argv": redact_args(sys.argv[1:])}
        atomic_write_json(self.machine_dir / "boot.json", record)
