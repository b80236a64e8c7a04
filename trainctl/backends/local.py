"""This machine: the script (or torchrun) as a child process in a session of its own.

In the process that launched it, one pump thread per output stream reads the child's pipes (or
its pseudo-terminal), appends each chunk to the session's output.log and hands it on to whoever
follows the attempt here (`log_iter(follow=True)`), so a slow reader slows the script as a slow
terminal would, and nothing is buffered without bound. Any other process reattaches through the
handle: pid and start ticks name the process, output.log holds what it printed.

On Linux the child gets SIGTERM when the launching thread dies (PR_SET_PDEATHSIG), so a
launcher killed with SIGKILL leaves a script that writes its emergency checkpoint and ends,
never one that trains on unobserved.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import env as env_mod
from .. import sysinfo
from ..children import die_with_parent, reap_group
from ..redact import redact_args
from ..session import STATUSES, Session, State, effective_status
from .base import Backend, Description, Handle, LaunchPlan, LogChunk, RunSpec
from .torchrun import NodeSpec, network_env, node_output_name, torchrun_args, worker_ranks

READ_BYTES = 65536
FOLLOW_LIMIT = 256  # chunks a follower may lag behind before the pump waits for it
JOIN_LIMIT_BYTES = 1 << 20  # queued chunks a follower takes as one
GATHER_BELOW_BYTES = 2048  # after a read smaller than this (a pty gives 4 KB at most), output gathers...
GATHER_S = 0.001  # ...this long before reading again (far below what a person notices)
RECENT_KEEP_BYTES = 1 << 20  # newest chunks kept in memory, stream and all, for a follower that joins late
UNWRITTEN_KEEP_BYTES = 64 * 1024  # newest output kept in memory while output.log can't be written
LOG_RETRY_S = 1.0  # how often a failing output.log is tried again
NODE_LOOK_S = 0.5  # how often a multi-node attempt's workers are looked for until found


def _key(handle: Handle) -> tuple[int, int | None]:
    return int(handle.ids["pid"]), handle.ids.get("start_ticks")


class _Follower:
    """One reader of a live attempt: a bounded queue the pump fills and `log_iter` drains."""

    def __init__(self) -> None:
        self.items: collections.deque[LogChunk] = collections.deque()
        self.cond = threading.Condition()
        self.ended = False
        self.left = False

    def put(self, chunk: LogChunk) -> None:
        with self.cond:
            while len(self.items) >= FOLLOW_LIMIT and not self.left:
                self.cond.wait(0.5)
            if not self.left:
                self.items.append(chunk)
                self.cond.notify_all()

    def end(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def leave(self) -> None:
        with self.cond:
            self.left = True
            self.items.clear()
            self.cond.notify_all()

    def get(self) -> LogChunk | None:
        """The next chunk, joined with the ones queued behind it from the same stream: a reader
        that fell behind a script printing line by line catches up in a few large pieces (each
        piece costs it a write, a decode and a parse, whatever its size)."""
        with self.cond:
            while not self.items and not self.ended:
                self.cond.wait()
            if not self.items:
                return None
            chunk = self.items.popleft()
            if self.items and self.items[0].stream == chunk.stream:
                parts, size = [chunk.data], len(chunk.data)
                while self.items and self.items[0].stream == chunk.stream and size < JOIN_LIMIT_BYTES:
                    data = self.items.popleft().data
                    parts.append(data)
                    size += len(data)
                chunk = LogChunk(chunk.offset, b"".join(parts), chunk.stream)
            self.cond.notify_all()
            return chunk


class _LogFile:
    """output.log as the pumps write it. A write that fails (a full or read-only disk) never
    stops the output: the newest UNWRITTEN_KEEP_BYTES are kept in memory and written, after a
    line marking the gap, once the file takes writes again (tried every LOG_RETRY_S)."""

    def __init__(self, fd: int, path: str, pending: bytes = b"") -> None:
        self.fd = fd
        self.path = path
        self.unwritten = bytearray(pending)
        self.dropped = 0  # bytes that did not fit in memory since the last gap marker
        self.gap = bool(pending)
        self.retry_at = 0.0
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        if self.unwritten:
            self._keep(data)
            if time.monotonic() >= self.retry_at:
                self._flush_unwritten()
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]  # O_APPEND: never interleaved mid-chunk
        except OSError as e:
            self._failed(e)
            self._keep(bytes(view))

    def _flush_unwritten(self) -> None:
        head = b""
        if self.gap:
            head = (b"\n[trainctl] the disk was full: " + (
                f"{self.dropped} bytes of output are missing here; the newest output, kept in memory, follows\n"
                if self.dropped else "the output below was kept in memory and written once there was room\n").encode())
        blob = memoryview(head + bytes(self.unwritten))
        try:
            while blob:
                blob = blob[os.write(self.fd, blob):]
        except OSError as e:
            self._failed(e)
            if len(blob) < len(head) + len(self.unwritten):  # the marker is (partly) out: no new one
                self.gap, self.dropped = False, 0
            self.unwritten = bytearray(blob)
            return
        self.unwritten.clear()
        self.gap, self.dropped = False, 0

    def _failed(self, error: OSError) -> None:
        self.error = self.error or error
        self.retry_at = time.monotonic() + LOG_RETRY_S
        self.gap = True

    def _keep(self, data: bytes) -> None:
        self.unwritten += data
        extra = len(self.unwritten) - UNWRITTEN_KEEP_BYTES
        if extra > 0:
            del self.unwritten[:extra]
            self.dropped += extra

    def close(self) -> None:
        if self.unwritten:
            self._flush_unwritten()  # a last try, for a disk that has room again
        try:
            os.close(self.fd)
        except OSError:
            pass

    def warning(self) -> str | None:
        """The one line to show about a log that could not be written, if it could not."""
        if self.error is None:
            return None
        return (f"cannot write {self.path} ({self.error.strerror or self.error}): the script's output "
                f"still shows here, the newest {UNWRITTEN_KEEP_BYTES // 1024} KB are kept in memory, "
                "and writing resumes once the disk has room")


class _Attempt:
    """A child this process started: the pumps that read it and the thread that reaps it."""

    def __init__(self, proc: subprocess.Popen[bytes], fds: list[tuple[int, str]], log: _LogFile,
                 output: str, start: int) -> None:
        self.proc = proc
        self.log = log
        self.output = output
        self.end = start  # offset in output.log after the last chunk written
        self.lock = threading.Lock()
        self.followers: list[_Follower] = []
        # what a follower that joins late reads before its first live chunk: from memory while
        # it is kept (output.log has the bytes but not which stream each came from)
        self.recent: collections.deque[LogChunk] = collections.deque()
        self.recent_bytes = 0
        self.done = threading.Event()
        self.returncode: int | None = None
        self.pumps = [threading.Thread(target=self._pump, args=(fd, stream), daemon=True,
                                       name=f"trainctl-pump-{stream}") for fd, stream in fds]
        for t in self.pumps:
            t.start()
        threading.Thread(target=self._reap, daemon=True, name="trainctl-reap").start()

    def _pump(self, fd: int, stream: str) -> None:
        while True:
            try:
                data = os.read(fd, READ_BYTES)
            except OSError:  # EIO: the pty's other side closed
                break
            if not data:
                break
            with self.lock:
                self.log.write(data)
                chunk = LogChunk(self.end, data, stream)
                self.end += len(data)
                for follower in self.followers:
                    follower.put(chunk)
                self.recent.append(chunk)
                self.recent_bytes += len(data)
                while self.recent_bytes > RECENT_KEEP_BYTES and len(self.recent) > 1:
                    self.recent_bytes -= len(self.recent.popleft().data)
            if len(data) < GATHER_BELOW_BYTES:
                # a script printing line by line (PYTHONUNBUFFERED) makes one write per line:
                # letting a millisecond's worth gather costs each piece nothing visible and
                # spares the launcher a read, a log write and two thread wake-ups per line
                time.sleep(GATHER_S)
        try:
            os.close(fd)
        except OSError:
            pass

    def _reap(self) -> None:
        self.returncode = self.proc.wait()
        # whatever the script left running in its group goes now, so the pumps see end of file
        reap_group(self.proc.pid)
        for t in self.pumps:
            t.join(timeout=5)
        with self.lock:
            for follower in self.followers:
                follower.end()
            self.followers.clear()
            self.log.close()
        self.done.set()


class LocalBackend(Backend):
    """Runs attempts as child processes of this process; reattaches to them from any other."""

    name = "local"

    def __init__(self, *, use_pty: bool | None = None, python: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.use_pty = sys.stdout.isatty() if use_pty is None else use_pty
        # the interpreter the script runs on (a cloud machine's image torch), and variables for
        # the script alone (forwarded secrets): added at launch, never part of a plan or a record
        self.python = python or sys.executable
        self.env = dict(env or {})
        self._owned: dict[tuple[int, int | None], _Attempt] = {}
        self._kill_at: dict[tuple[int, int | None], float] = {}
        # multi-node attempts: [where this node's workers stand once seen, when to look next]
        self._nodes: dict[tuple[int, int | None], list[Any]] = {}

    # ------------------------------------------------------------------ plan and launch
    def plan(self, spec: RunSpec) -> LaunchPlan:
        node = NodeSpec.from_resources(spec.resources)
        if node is not None:
            # several machines: torchrun's c10d rendezvous, one node of the job here
            command = [self.python, "-m", "torch.distributed.run", *torchrun_args(node, spec.nproc_per_node),
                       str(spec.script), *spec.args]
        elif spec.nproc_per_node > 1:
            # torch's own launcher, never a home-made one
            command = [self.python, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={spec.nproc_per_node}", str(spec.script), *spec.args]
        else:
            command = [self.python, str(spec.script), *spec.args]
        session_dir = Path(spec.session_dir) if spec.session_dir else None
        env = env_mod.LaunchEnv(
            session_id=spec.session_id or None, session_dir=str(session_dir) if session_dir else None,
            checkpoint_dir=spec.checkpoint_location, resume=spec.resume,
            tensorboard_dir=str(session_dir / "tensorboard") if session_dir else None,
            backend=self.name, config=str(spec.config_path) if spec.config_path else None,
        ).to_environ()
        env["PYTHONUNBUFFERED"] = "1"
        output = os.devnull
        if session_dir and node is not None:
            # every node keeps its own output, also in a session folder the nodes share
            output = str(session_dir / node_output_name(spec.resources.get("node_key") or "node"))
            env.update(network_env(node, {**os.environ, **self.env}))
        elif session_dir:
            output = str(session_dir / "output.log")
        return LaunchPlan(
            backend=self.name, command=tuple(command), env=env,
            cwd=str(spec.cwd or Path.cwd()), resources=dict(spec.resources),
            output=output,
            checkpoint_location=spec.checkpoint_location, cost_per_hour=None,
            details={"terminal": self.use_pty, "session_dir": str(session_dir) if session_dir else None})

    def launch(self, plan: LaunchPlan, attempt: int) -> Handle:
        child_env = {**os.environ, **plan.env, **self.env, "TRAIN_OPS_ATTEMPT": str(attempt)}
        log = _LogFile(os.open(plan.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), plan.output)
        if attempt:
            log.write(f"\n[trainctl] attempt {attempt}: {' '.join(redact_args(list(plan.command)))}\n".encode())
        start = os.fstat(log.fd).st_size
        preexec = die_with_parent()
        if self.use_pty:
            import pty

            master_fd, slave_fd = pty.openpty()
            _copy_terminal_size(slave_fd, child_env)
            try:
                proc = subprocess.Popen(list(plan.command), stdin=subprocess.DEVNULL, stdout=slave_fd,
                                        stderr=slave_fd, env=child_env, cwd=plan.cwd,
                                        start_new_session=True, preexec_fn=preexec)
            finally:
                os.close(slave_fd)
            fds = [(master_fd, "stdout")]
        else:
            proc = subprocess.Popen(list(plan.command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=child_env, cwd=plan.cwd,
                                    start_new_session=True, preexec_fn=preexec)
            assert proc.stdout is not None and proc.stderr is not None
            fds = [(os.dup(proc.stdout.fileno()), "stdout"), (os.dup(proc.stderr.fileno()), "stderr")]
            proc.stdout.close()
            proc.stderr.close()
        ticks = sysinfo.process_start_ticks(proc.pid)
        handle = Handle(self.name, {"pid": proc.pid, "start_ticks": ticks, "output": plan.output,
                                    "output_start": start,
                                    "session_dir": plan.details.get("session_dir")}, attempt)
        self._owned[_key(handle)] = _Attempt(proc, fds, log, plan.output, start)
        if NodeSpec.from_resources(plan.resources) is not None:
            self._nodes[_key(handle)] = [None, 0.0]
        return handle

    # ------------------------------------------------------------------ observe
    def describe(self, handle: Handle) -> Description:
        key = _key(handle)
        processes = [{"pid": key[0], "start_ticks": key[1], "role": "script"}]
        att = self._owned.get(key)
        if att is not None:
            warning = att.log.warning()
            if not att.done.is_set():
                self._enforce_deadline(key)
                node = self._node_ranks(key)
                return Description(State.RUNNING, details={"processes": processes,
                                                           **({"node": node} if node else {}),
                                                           **({"warnings": {"output_log": warning}} if warning else {})})
            end = _ended(att.returncode, processes)
            if warning:
                end.details["warnings"] = {"output_log": warning}
            return end
        if sysinfo.pid_alive(*key):
            self._enforce_deadline(key)
            return Description(State.RUNNING, details={"processes": processes})
        return self._recorded_end(handle, processes)

    def _recorded_end(self, handle: Handle, processes: list[dict[str, Any]]) -> Description:
        """How an attempt this process did not start ended, as the session store recorded it."""
        session_dir = handle.ids.get("session_dir")
        data: dict[str, Any] = {}
        if session_dir:
            try:
                data = Session(Path(session_dir)).read()
            except Exception:  # a missing or torn session.json: nothing recorded
                data = {}
        for record in data.get("attempts") or []:
            if isinstance(record, dict) and record.get("attempt") == handle.attempt \
                    and record.get("ended_at") and record.get("status") in STATUSES:
                return Description(State(record["status"]), record.get("exit_code"), record.get("signal"),
                                   {"processes": processes})
        status = effective_status(data) if data else State.CRASHED
        state = State(status) if status not in (State.PENDING, State.RUNNING) else State.CRASHED
        return Description(state, data.get("exit_code"), data.get("signal"), {"processes": processes})

    def log_iter(self, handle: Handle, since: int = 0, follow: bool = False) -> Iterator[LogChunk]:
        start = max(int(since), int(handle.ids.get("output_start") or 0))
        att = self._owned.get(_key(handle))
        if att is None:
            yield from self._tail(handle, start, follow)
            return
        follower = None
        with att.lock:
            end = att.end
            kept = list(att.recent) if att.recent and att.recent[0].offset <= start else None
            if follow and not att.done.is_set():
                follower = _Follower()
                att.followers.append(follower)
        try:
            if start < end and kept is not None:  # each chunk with its stream
                for chunk in kept:
                    if chunk.offset + len(chunk.data) > start:
                        cut = max(0, start - chunk.offset)
                        yield LogChunk(chunk.offset + cut, chunk.data[cut:], chunk.stream)
            elif start < end:
                yield from _read_file(att.output, start, end)
            while follower is not None:
                chunk = follower.get()
                if chunk is None:
                    break
                if chunk.offset >= start:
                    yield chunk
                elif chunk.offset + len(chunk.data) > start:  # begins before `since`: its rest
                    yield LogChunk(start, chunk.data[start - chunk.offset:], chunk.stream)
        finally:
            if follower is not None:
                follower.leave()
                with att.lock:
                    if follower in att.followers:
                        att.followers.remove(follower)

    def _tail(self, handle: Handle, start: int, follow: bool) -> Iterator[LogChunk]:
        """Output of an attempt another process runs, read back from output.log."""
        path = handle.ids.get("output")
        if not path:
            return
        offset = start
        pause = 0.01
        ended_reads = 0
        while True:
            got = False
            for chunk in _read_file(path, offset, None):
                got = True
                offset = chunk.offset + len(chunk.data)
                yield chunk
            if not follow:
                return
            if got:
                pause = 0.01
                continue
            if not sysinfo.pid_alive(*_key(handle)):
                ended_reads += 1  # its launcher may still be writing what the pipes held
                if ended_reads > 3:
                    return
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    # ------------------------------------------------------------------ stop and release
    def stop(self, handle: Handle, grace_period_s: float, *, signal_name: str = "SIGTERM") -> None:
        # no locks and no threads here: the engine calls this from its signal handler
        key = _key(handle)
        if not self._alive(key):
            return
        if grace_period_s <= 0:
            _signal_group(key[0], signal.SIGKILL)
            return
        _signal_group(key[0], getattr(signal, signal_name, signal.SIGTERM))
        self._kill_at.setdefault(key, time.monotonic() + grace_period_s)

    def release(self, handle: Handle) -> None:
        key = _key(handle)
        if self._alive(key):
            _signal_group(key[0], signal.SIGKILL)
        att = self._owned.pop(key, None)
        if att is not None:
            att.done.wait(timeout=10)
        self._kill_at.pop(key, None)
        self._nodes.pop(key, None)

    def list(self) -> list[Handle]:
        """Processes on this machine started for a trainctl session (TRAIN_OPS_SESSION_ID in
        their environment) that lead their own process group and whose parent is not one."""
        found: dict[int, dict[str, str]] = {}
        for entry in _proc_entries():
            env = _environ(entry)
            if env.get("TRAIN_OPS_SESSION_ID") and env.get("TRAIN_OPS_BACKEND") == self.name:
                found[entry] = env
        handles = []
        for pid, env in found.items():
            try:
                if os.getpgid(pid) != pid or _parent(pid) in found:
                    continue
            except OSError:
                continue
            session_dir = env.get("TRAIN_OPS_SESSION_DIR")
            attempt = int(env.get("TRAIN_OPS_ATTEMPT") or 0)
            handles.append(Handle(self.name, {
                "pid": pid, "start_ticks": sysinfo.process_start_ticks(pid),
                "output": str(Path(session_dir) / "output.log") if session_dir else None,
                "output_start": 0, "session_dir": session_dir,
                "session_id": env["TRAIN_OPS_SESSION_ID"]}, attempt))
        return handles

    # ------------------------------------------------------------------ helpers
    def _node_ranks(self, key: tuple[int, int | None]) -> dict[str, Any] | None:
        """A multi-node attempt's place in the job, looked up at most every NODE_LOOK_S."""
        seen = self._nodes.get(key)
        if seen is None or seen[0] is not None:
            return seen[0] if seen else None
        now = time.monotonic()
        if now >= seen[1]:
            seen[1] = now + NODE_LOOK_S
            seen[0] = worker_ranks(key[0])
        return seen[0]

    def _alive(self, key: tuple[int, int | None]) -> bool:
        att = self._owned.get(key)
        if att is not None:
            return not att.done.is_set() and att.proc.poll() is None
        return sysinfo.pid_alive(*key)

    def _enforce_deadline(self, key: tuple[int, int | None]) -> None:
        kill_at = self._kill_at.get(key)
        if kill_at is not None and time.monotonic() >= kill_at:
            _signal_group(key[0], signal.SIGKILL)
            self._kill_at.pop(key, None)


def _ended(returncode: int | None, processes: list[dict[str, Any]]) -> Description:
    if returncode is not None and returncode < 0:
        return Description(State.KILLED, returncode, signal.Signals(-returncode).name, {"processes": processes})
    state = State.COMPLETED if returncode == 0 else State.FAILED
    return Description(state, returncode, None, {"processes": processes})


def _read_file(path: str, start: int, end: int | None) -> Iterator[LogChunk]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; a generator may stop mid-way
    except OSError:
        return
    with f:
        f.seek(start)
        offset = start
        while end is None or offset < end:
            data = f.read(READ_BYTES if end is None else min(READ_BYTES, end - offset))
            if not data:
                return
            yield LogChunk(offset, data, "output")
            offset += len(data)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _copy_terminal_size(slave_fd: int, env: dict[str, str]) -> None:
    try:
        import fcntl
        import struct
        import termios

        size = fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, size)
        _rows, cols = struct.unpack("HHHH", size)[:2]
        env.setdefault("COLUMNS", str(cols))
    except (OSError, ImportError, ValueError):
        pass


def _proc_entries() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        name, eq, value = item.partition(b"=")
        if eq and name.startswith(b"TRAIN_OPS_"):
            out[name.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None

