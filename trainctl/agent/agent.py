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

A multi-node job runs in rounds: the head (node 0) publishes each round in storage, the other
nodes check in for it, and it starts once all did. When the platform replaces lost nodes (spot
nodes, a fleet each), a lost node ends the round, not the session: the next round starts with
its replacement, from the newest checkpoint in storage.

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
from .nodes import GONE_STATES, NODE_LOST, NodesWatch
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
    node_replacement: str = "none"  # fleet: the platform replaces a lost node (the job waits, then resumes)
    replace_wait_s: float = 1800.0  # how long the job waits for a lost node's replacement

    @property
    def replaced_nodes(self) -> bool:
        """A multi-node job whose lost nodes the platform replaces: it waits for them and resumes."""
        return self.nnodes > 1 and self.node_replacement == "fleet"

    @property
    def worker_node(self) -> bool:
        """A node of a multi-node job other than the head: it neither holds the lease nor syncs."""
        return self.nnodes > 1 and self.node_rank != 0

    def session_uri(self) -> str:
        return str(parse_uri(self.storage).join(self.project, self.session_id))


class _SessionEnded(Exception):
    """The session ended (its tombstone is in storage) before this node's part started."""


class _RoundTimeout(SetupError):
    """A round of a multi-node job did not get all its nodes in time."""


def private_address() -> str:
    """This machine's private IPv4 address from IMDS (local-ipv4): the address the placement
    group's members reach each other on (AWS_EC2_METADATA_SERVICE_ENDPOINT honoured)."""
    from ..backends.aws import _imds

    return _imds("/latest/meta-data/local-ipv4")


def _instance_id() -> str | None:
    """This machine's EC2 instance id (IMDS), or None where there is none."""
    from ..backends.aws import _machine_id

    try:
        return _machine_id()
    except OSError:
        return None


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
        self.round = 0  # a multi-node job's round: the next starts after a lost node was replaced
        self.round_machines: dict[int, str] = {}  # node rank -> machine id, of the round running

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
        if s.nnodes > 1 and s.backend == "aws" and not s.machine_id:
            s.machine_id = _instance_id()  # the id the others know this node by (EC2's view of the job)
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
            return self._interrupted(interrupted.notice)
        except (SetupError, UsageError, StorageError, OSError) as e:
            return self._fail_setup(e)
        return self._train(project, prepared, resume, secrets)

    def _interrupted(self, notice: Notice) -> int:
        """The end for an interruption seen while setting up or between rounds."""
        if notice.kind == "lost":
            return self._lost(notice.action)
        if notice.kind == STOP:
            return self._stopped(notice)
        return self._preempted(notice)

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
    def _set_up(self, *, resume_now: bool = True) -> tuple[Path, Prepared, str | None, dict[str, str]]:
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
        latest = self.remote.latest_checkpoint() if resume_now else None
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
        """The training, watched; a multi-node job whose lost nodes the platform replaces runs
        in rounds: a lost node stops the round everywhere, the next starts once every node
        (the replacement too) checked in, from the newest checkpoint in storage."""
        from ..checkpoint import retention_settings

        assert self.sync is not None and self.remote is not None
        s = self.s
        options = dict(s.engine)
        events = AgentEvents(self._say, on_attempt=lambda session, attempt: self._attach(session),
                             on_end=self.sync.request)
        env = {**secrets, "TRAIN_OPS_BACKEND": s.backend}  # the script's environment only, never recorded
        while True:
            try:
                node = self._start_round() if s.nnodes > 1 else None
                if self.round > 0:
                    resume = self._fetch_resume()
                runner = self.runner = EngineRun(prepared.python, project, s.script or "", s.args, events=events,
                                                 resume=resume, env=env, grace_period_s=s.grace_period_s, node=node,
                                                 **options)
                self.sync.retention = retention_settings(runner.cfg)
                self._say("starting: " + " ".join(redact_args(runner.command)))
                self._attach(runner.prepare())
            except _Interrupted as interrupted:
                return self._interrupted(interrupted.notice)
            except _SessionEnded as e:
                self.sync.close()
                return self._end_now(str(e), tombstone=False)
            except _RoundTimeout as e:
                return self._round_failed(e)
            except (TrainctlError, OSError) as e:  # pre-flight, a resume checkpoint that does not verify
                return self._fail_setup(e)
            runner.start()
            watch = self._watch_nodes()
            ended = self._watch_training(runner, watch)
            if isinstance(ended, int):
                return ended
            self._next_round(ended, watch)

    def _watch_training(self, runner: EngineRun, watch: NodesWatch | None) -> int | Notice:
        """Until the training ends: the exit code, or the lost node's notice when the job's
        nodes are replaced (the caller starts the next round)."""
        s = self.s
        stop_at = None if s.deadline_t is None else s.deadline_t - s.deadline_margin_s
        while True:
            if runner.done():
                if s.replaced_nodes and runner.outcome()["status"] != "completed":
                    lost = self._lost_node_after_run(watch)
                    if lost is not None:  # the collectives failed before the watch saw the node go
                        return lost
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
            if notice.kind == NODE_LOST and s.replaced_nodes and self._round_finishing():
                self._say(f"{notice.action}: its part of the job had completed; the head finishes its own")
                continue
            if notice.kind == NODE_LOST:
                return notice if s.replaced_nodes else self._node_lost(notice)
            self._rebalance(notice)

    def _lost_node_after_run(self, watch: NodesWatch | None) -> Notice | None:
        """Whether a node of this round is gone, now that the training failed: a notice already
        queued, else a few looks at the platform (EC2 may show the machine gone a moment late)."""
        held: list[Notice] = []
        found: Notice | None = None
        while True:
            try:
                notice = self.notices.get_nowait()
            except queue.Empty:
                break
            if notice.kind == NODE_LOST and found is None:
                found = notice
            else:
                held.append(notice)
        for other in held:
            self.notices.put(other)
        if self._round_finishing():  # a node that completed its part and left is not a lost one
            return None
        if found is not None or watch is None:
            return found
        for look in range(3):
            try:
                found = watch.poll()
            except Exception:  # the platform's API unreachable: the run's failure stands
                found = None
            if found is not None:
                return found
            if look < 2:
                time.sleep(watch.interval_s)
        return None

    def _round_finishing(self) -> bool:
        """Whether a node of this round said its part completed (the job is at its end)."""
        assert self.remote is not None
        try:
            records = [self.remote.read_check_in(rank) for rank in range(1, self.s.nnodes)]
        except StorageError:
            return False
        return any(r and r.get("attempt") == self.s.attempt and r.get("round") == self.round
                   and r.get("state") == "completed" for r in records)

    def _next_round(self, notice: Notice, watch: NodesWatch | None) -> None:
        """A node of the job is gone and its fleet replaces it: the job stops everywhere (the
        emergency checkpoint where the ranks can still agree on it), its checkpoint goes to
        storage, and the session stays running while the head waits for the replacement."""
        assert self.sync is not None
        self._say(f"{notice.action}: stopping the job on every node (emergency checkpoint where possible); "
                  f"waiting for its replacement (up to {self.s.replace_wait_s:g} s), then the job resumes "
                  f"on {self.s.nnodes} nodes")
        self.sync.add_events([{**notice.to_dict(), "kind": "notice", "notice": notice.kind,
                               "round": self.round, "waiting_for": "replacement"}])
        if watch is not None:
            watch.stop()
            self.watches.remove(watch)
        if self.runner is not None and not self.runner.done():
            self._stop_runner(time.time() + self.s.grace_period_s + 5.0)
        self.sync.status_override = "running"  # not over: the next round continues it
        if not self.sync.flush(timeout_s=max(30.0, self.s.grace_period_s)):
            self._say("the last checkpoint is not in storage yet; the next round starts from the newest that is")

    def _round_failed(self, e: _RoundTimeout) -> int:
        assert self.sync is not None
        self._say(f"{e} {e.hint}")
        self.sync.status_override = None
        self.sync.add_events([{"kind": "status", "status": "failed", "error": str(e)}])
        self.sync.close(status="failed")
        return self._finish(str(e), status="failed", code=EXIT_FAILED)

    # --- one node of several ------------------------------------------------------------------
    def _node_resources(self, head: str) -> dict[str, Any]:
        """This node's part for the engine: torchrun's static rendezvous at the head, so the
        node rank is the group rank and global rank 0 (checkpoints, metrics) runs on the head,
        whose agent syncs them; the rendezvous id is the session id (and the round after the
        first: each round's engine records a local session of its own)."""
        from ..backends.torchrun import NodeSpec
        from ..launcher.multinode import with_network

        rdzv_id = self.s.session_id if self.round == 0 else f"{self.s.session_id}-r{self.round}"
        node = NodeSpec(nnodes=self.s.nnodes, host=head, port=self.s.rdzv_port, rdzv_id=rdzv_id,
                        node_rank=self.s.node_rank, source="aws", rdzv_backend="static")
        return {**with_network(node).to_resources(), "node_key": f"node{self.s.node_rank}"}

    def _start_round(self) -> dict[str, Any]:
        """The head: a round of the job. Its private address (IMDS local-ipv4) in the session's
        storage with state "waiting"; every other node checks in for the round (and, on AWS, is
        the live machine of its rank in EC2); then state "ready" with the round's machines. A
        head that replaced a lost head goes on from the round it found."""
        assert self.remote is not None
        s = self.s
        found = self.remote.read_head()
        self.round = (int(found.get("round") or 0) + 1 if isinstance(found, dict) and found.get("attempt") == s.attempt
                      else 0)
        address = private_address()
        fields = {"attempt": s.attempt, "address": address, "port": s.rdzv_port, "boot": self.boot,
                  "machine": self.machine.get("id"), "round": self.round}
        self.remote.publish_head(**fields, state="waiting")
        wait_s = s.head_wait_s if self.round == 0 else s.replace_wait_s
        self._say(f"node 0 of {s.nnodes} (the head): the rendezvous is at {address}:{s.rdzv_port}; round "
                  f"{self.round}: waiting for nodes 1 to {s.nnodes - 1} to check in (up to {wait_s:g} s)")
        self.round_machines = self._wait_for_nodes(wait_s)
        self.remote.publish_head(**fields, state="ready",
                                 machines={str(rank): mid for rank, mid in self.round_machines.items()})
        ready = ", ".join(f"node {rank} {mid}" for rank, mid in sorted(self.round_machines.items()))
        self._say(f"round {self.round}: every node checked in ({ready}); starting")
        if self.sync is not None:
            self.sync.add_events([{"kind": "nodes", "round": self.round, "state": "ready",
                                   "machines": {str(k): v for k, v in self.round_machines.items()}}])
            self.sync.status_override = None
        return self._node_resources(address)

    def _wait_for_nodes(self, wait_s: float) -> dict[int, str]:
        """Node rank -> machine id of every other node checked in for this round."""
        assert self.remote is not None
        s = self.s
        until = time.time() + wait_s
        while True:
            checked: dict[int, str] = {}
            for rank in range(1, s.nnodes):
                record = self.remote.read_check_in(rank)
                if record and record.get("attempt") == s.attempt and record.get("round") == self.round:
                    checked[rank] = str(record.get("machine") or "")
            if len(checked) == s.nnodes - 1 and self._live_machines(checked):
                return checked
            if self.remote.ended() is not None:
                raise _SessionEnded("the session ended while the head waited for its nodes")
            if time.time() >= until:
                missing = [str(r) for r in range(1, s.nnodes) if r not in checked] or sorted(map(str, checked))
                what = "the replacement of node" if self.round > 0 else "node"
                raise _RoundTimeout(f"round {self.round}: {what} {', '.join(missing)} did not check in within "
                                    f"{wait_s:g} s.",
                                    f"Continue the job on {s.nnodes} new machines with: trainctl aws resume "
                                    f"{s.session_id}")
            self._raise_if_interrupted()
            time.sleep(min(2.0, max(0.05, wait_s / 100)))

    def _live_machines(self, checked: dict[int, str]) -> bool:
        """On AWS: each checked-in machine is its rank's live machine in EC2 (not one that
        checked in and was reclaimed since)."""
        s = self.s
        if s.backend != "aws" or not any(mid.startswith("i-") for mid in checked.values()):
            return True
        from ..backends.aws import node_machines

        try:
            machines = node_machines(s.session_id, s.attempt, region=s.region, endpoint_url=s.endpoint_url)
        except OSError:
            return False
        return all(not mid.startswith("i-") or (machines.get(rank, ("", ""))[0] == mid
                                                 and machines[rank][1] not in GONE_STATES)
                   for rank, mid in checked.items())

    def _fetch_resume(self) -> str | None:
        """The newest checkpoint in storage, downloaded and verified: what every node of a round
        resumes from."""
        assert self.remote is not None
        latest = self.remote.latest_checkpoint()
        if latest is None:
            return None
        self._say(f"round {self.round}: resuming from {latest['file']} (step {latest.get('step')})")
        return str(self.remote.fetch_checkpoint(self.machine_dir / "resume", latest))

    def _watch_nodes(self) -> NodesWatch | None:
        """On AWS: the head watches the job's other machines in EC2 (a lost one stops the job),
        the others watch the head's; each the machines of the round it runs."""
        s = self.s
        if s.nnodes < 2 or s.backend != "aws":
            return None
        from functools import partial

        from ..backends.aws import node_machines

        look = partial(node_machines, s.session_id, s.attempt, region=s.region, endpoint_url=s.endpoint_url)
        expected = {rank: mid for rank, mid in self.round_machines.items() if mid.startswith("i-")}
        watch = NodesWatch(look, s.nnodes, ranks=(0,) if s.worker_node else None,
                           interval_s=max(1.0, 3 * s.watch_interval_s), expected=expected)
        watch.start(self.notices)
        self.watches.append(watch)
        return watch

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

    def _wait_for_round(self, after: int, wait_s: float) -> dict[str, Any]:
        """The head's next round (after round `after`) for this attempt, from storage, the
        head's address never guessed: this node checks in while the head waits for its nodes,
        and joins once the head says the round is ready with this machine in it (a ready round
        without it is one this node came too late for: it waits for the next). Interruptions
        and the session's end are acted on while waiting."""
        assert self.remote is not None
        s = self.s
        me = str(self.machine.get("id"))
        until = time.time() + wait_s
        checked_in: int | None = None
        while True:
            head = self.remote.read_head()
            if isinstance(head, dict) and head.get("attempt") == s.attempt and head.get("address"):
                job_round = int(head.get("round") or 0)
                if job_round > after and head.get("state") == "waiting" and checked_in != job_round:
                    self.remote.check_in(s.node_rank, attempt=s.attempt, job_round=job_round, machine=me)
                    checked_in = job_round
                    self._say(f"node {s.node_rank}: checked in for round {job_round}; waiting for the head to start it")
                elif job_round > after and head.get("state") == "ready" and \
                        (head.get("machines") or {}).get(str(s.node_rank)) == me:
                    self.round = job_round
                    self.round_machines = {0: str(head.get("machine") or "")}
                    return head
            if self.remote.ended() is not None:
                raise _SessionEnded("the session ended while this node waited for the head")
            if time.time() >= until:
                if after < 0:
                    raise SetupError(f"node 0 (the head) did not publish its address in {wait_s:g} s.",
                                     "Look at the head's boot log (trainctl aws status SESSION names the machines).")
                raise SetupError(f"the head started no new round in {wait_s:g} s after round {after} stopped.",
                                 f"Continue the job on new machines with: trainctl aws resume {s.session_id}")
            self._raise_if_interrupted()
            time.sleep(min(2.0, max(0.05, wait_s / 100)))

    def _run_node(self) -> int:
        """A node other than the head: the same set-up, then its part of each round of the job
        the head starts (its address in storage). The head's agent holds the lease and writes
        the session; this one records nothing there and ends its own machine when its part
        ends (or the session does). When the job's nodes are replaced, a round that stopped
        (a lost node, the head included) is not the end: this node waits for the next."""
        s = self.s
        self.machine = {"id": s.machine_id or f"{sysinfo.host()}-node{s.node_rank}", "host": sysinfo.host(),
                        "node_rank": s.node_rank, "backend": s.backend, "agent_pid": os.getpid()}
        self._write_boot_record()
        self._say(f"node {s.node_rank} of {s.nnodes}: waiting for the head's address in {s.session_uri()}")
        try:
            project, prepared, _, secrets = self._set_up(resume_now=False)
        except _Interrupted as interrupted:
            code = EXIT_PREEMPTED if interrupted.notice.kind == INTERRUPTION else EXIT_DONE
            return self._finish(f"{interrupted.notice.kind} before training", status=None, code=code, tombstone=False)
        except (SetupError, UsageError, StorageError, OSError) as e:
            return self._finish(f"setup failed: {e}", status="failed", code=EXIT_FAILED, tombstone=False)
        after = -1
        while True:
            try:
                head = self._wait_for_round(after, s.head_wait_s if after < 0 else s.replace_wait_s)
                after = self.round
                resume = self._fetch_resume()  # what the head's round starts from, once it is ready
            except _SessionEnded as e:
                return self._end_now(str(e), tombstone=False)
            except _Interrupted as interrupted:
                code = EXIT_PREEMPTED if interrupted.notice.kind == INTERRUPTION else EXIT_DONE
                return self._finish(f"{interrupted.notice.kind} before training", status=None, code=code,
                                    tombstone=False)
            except (SetupError, UsageError, StorageError, OSError) as e:
                return self._finish(f"setup failed: {e}", status="failed", code=EXIT_FAILED, tombstone=False)
            code = self._run_node_round(project, prepared, resume, secrets, str(head["address"]))
            if code is not None:
                return code
            self._say(f"node {s.node_rank}: round {self.round} stopped; waiting for the head's next round "
                      f"(up to {s.replace_wait_s:g} s)")

    def _run_node_round(self, project: Path, prepared: Prepared, resume: str | None, secrets: dict[str, str],
                        head: str) -> int | None:
        """This node's part of one round: the exit code, or None when the round stopped and the
        job's nodes are replaced (the next round follows)."""
        s = self.s
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
        watch = self._watch_nodes()
        try:
            return self._watch_node_part(runner)
        finally:
            if watch is not None:
                watch.stop()
                self.watches.remove(watch)

    def _watch_node_part(self, runner: EngineRun) -> int | None:
        s = self.s
        stop_at = None if s.deadline_t is None else s.deadline_t - s.deadline_margin_s
        look_at = time.monotonic()
        while True:
            if runner.done():
                outcome = runner.outcome()
                ended = self._session_end()
                if ended is not None and outcome["status"] != "completed":  # the job stopped everywhere
                    return self._finish(f"the session ended ({ended.get('reason')})", status=None, code=EXIT_DONE,
                                        tombstone=False)
                if s.replaced_nodes and outcome["status"] != "completed":
                    return None  # stopped with the round: the head starts the next
                self._say(f"node {s.node_rank}: its part ended: {outcome['status']} (exit code {outcome['exit_code']})")
                if outcome["status"] == "completed" and s.replaced_nodes:
                    self._say_completed()
                    self._wait_for_session_end()
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
            if notice.kind == NODE_LOST and s.replaced_nodes:
                # the head is gone and its fleet replaces it: the new head starts the next round
                self._say(f"node {s.node_rank}: {notice.action}: stopping its part; waiting for the new head")
                self._stop_runner(time.time() + s.grace_period_s + 5.0)
                return None
            if notice.kind in (INTERRUPTION, STOP, NODE_LOST):
                self._say(f"node {s.node_rank}: {notice.kind} ({notice.action}): stopping its part")
                self._stop_runner(time.time() + s.grace_period_s + 5.0)
                # a lost head ends the job; an interruption or a stop leaves the machine as the head's would
                return self._finish(f"node {s.node_rank}: {notice.action}", status=None, tombstone=False,
                                    code=EXIT_FAILED if notice.kind == NODE_LOST else EXIT_PREEMPTED)

    def _say_completed(self) -> None:
        """Tell the head this node's part of the round completed: its machine ending is the
        job's end, not a lost node."""
        assert self.remote is not None
        try:
            self.remote.check_in(self.s.node_rank, attempt=self.s.attempt, job_round=self.round,
                                 machine=str(self.machine.get("id")), state="completed")
        except StorageError as e:
            self._say(f"could not record in storage that this part completed: {e}")

    def _wait_for_session_end(self, wait_s: float = 120.0) -> None:
        """A node whose part completed waits a little for the head to record the session's end:
        a machine that ends while the session is not over is one its fleet replaces."""
        until = time.time() + wait_s
        while time.time() < until and self._session_end() is None:
            time.sleep(min(1.0, max(0.05, self.s.sync_interval_s)))

    def _session_end(self) -> dict[str, Any] | None:
        """The session's tombstone, when storage can be read and it is there."""
        try:
            return self.remote.ended() if self.remote is not None else None
        except StorageError:
            return None

    def _attach(self, session: Any) -> None:
        if self.sync is not None and (self.sync.session is None or self.sync.session.dir != session.dir):
            self.sync.attach(session.dir)  # (a multi-node job's next round records a local session of its own)

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
