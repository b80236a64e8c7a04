"""Run a script on this machine: a child process (or torchrun) in its own process group.

The launcher is the only reader of the child's output: it passes it through (keeping a
progress bar at the bottom on a terminal), tees it to output.log and feeds the metric parser.
"""

from __future__ import annotations

import codecs
import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from ..session import Session
from .base import Backend, Handle, Outcome, RunSpec

TAIL_LINES = 200
TAIL_CHARS = 64 * 1024
MAX_PARTIAL_CHARS = 1 << 20


class _Attempt:
    """One running child and the threads that read its output."""

    def __init__(self, proc: subprocess.Popen[bytes], fds: list[tuple[int, bool]],
                 log: BinaryIO, sink: OutputSink, master_fd: int | None) -> None:
        self.proc = proc
        self.log = log
        self.sink = sink
        self.master_fd = master_fd
        self.stop_requested = False
        self.kill_at: float | None = None
        self.readers = [threading.Thread(target=self._read, args=(fd, is_err), daemon=True,
                                         name=f"trainctl-read-{fd}") for fd, is_err in fds]
        for t in self.readers:
            t.start()

    def _read(self, fd: int, is_err: bool) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side closed
                break
            if not data:
                break
            self.sink.write(data, is_err)
        try:
            os.close(fd)
        except OSError:
            pass


class OutputSink:
    """Where the child's output goes: the terminal (or a progress display), output.log, the parser.

    Work per chunk, not per line: a script printing thousands of lines a second must not wait
    for its reader (a full pipe blocks the writer).
    """

    def __init__(self, log: BinaryIO, display: Any | None, on_text: Any | None) -> None:
        self.log = log
        self.display = display
        self.on_text = on_text
        self._recent: collections.deque[str] = collections.deque()  # newest output, ~TAIL_CHARS
        self._recent_chars = 0
        self._partial = {False: "", True: ""}
        self._decoders = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in (False, True)}
        self._lock = threading.Lock()
        self._out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
        self._err = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None

    def write(self, data: bytes, is_err: bool) -> None:
        if self.display is not None:
            self.display.write_output(data, stderr=is_err)
        else:
            stream = self._err if is_err else self._out
            if stream is not None:
                try:
                    stream.write(data)
                    stream.flush()
                except (OSError, ValueError):
                    pass
        with self._lock:
            self.log.write(data)
            text = self._partial[is_err] + self._decoders[is_err].decode(data)
            cut = max(text.rfind("\n"), text.rfind("\r"))
            if cut < 0 and len(text) < MAX_PARTIAL_CHARS:
                self._partial[is_err] = text
                return
            if cut < 0:  # a "line" without end: don't grow forever
                cut = len(text) - 1
            complete, self._partial[is_err] = text[:cut + 1], text[cut + 1:]
            self._keep_tail(complete)
        if self.on_text is not None:
            self.on_text(complete)

    def _keep_tail(self, text: str) -> None:
        # kept as chunks and split into lines only when asked: most runs never need the tail
        self._recent.append(text)
        self._recent_chars += len(text)
        while self._recent_chars > TAIL_CHARS and len(self._recent) > 1:
            self._recent_chars -= len(self._recent.popleft())

    @property
    def tail(self) -> list[str]:
        """The last TAIL_LINES non-empty lines of output (\r-redrawn lines count as lines)."""
        text = "".join(self._recent).replace("\r\n", "\n").replace("\r", "\n")
        return [line for line in text.split("\n") if line][-TAIL_LINES:]

    def close(self) -> None:
        with self._lock:
            rest = "".join(self._partial[k] + self._decoders[k].decode(b"", final=True) for k in (False, True))
            self._partial = {False: "", True: ""}
            if rest:
                self._keep_tail(rest)
        if rest and self.on_text is not None:
            self.on_text(rest)
        self.log.flush()


class LocalBackend(Backend):
    """This machine. `display` and `on_text` come from the supervisor (progress, parser)."""

    name = "local"

    def __init__(self, session: Session, *, display: Any | None = None,
                 on_text: Any | None = None, use_pty: bool | None = None) -> None:
        self.session = session
        self.display = display
        self.on_text = on_text
        self.use_pty = sys.stdout.isatty() if use_pty is None else use_pty
        self._sinks: list[OutputSink] = []

    def attach(self, display: Any | None, on_text: Any | None) -> None:
        """Route output to a display and a parser from now on (the running attempt included)."""
        self.display, self.on_text = display, on_text
        for sink in self._sinks:
            sink.display, sink.on_text = display, on_text

    def command(self, spec: RunSpec, args: list[str]) -> list[str]:
        if spec.nproc_per_node > 1:
            # torch's own launcher, never a home-made one
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={spec.nproc_per_node}", str(spec.script), *args]
        return [sys.executable, str(spec.script), *args]

    def launch(self, spec: RunSpec, env: dict[str, str], attempt: int, *,
               args: list[str] | None = None) -> Handle:
        cmd = self.command(spec, spec.args if args is None else args)
        child_env = {**os.environ, **spec.env, **env, "PYTHONUNBUFFERED": "1"}
        log = open(self.session.output_log, "ab")  # noqa: SIM115 - closed when the attempt ends
        if attempt:
            log.write(f"\n[trainctl] attempt {attempt}: {' '.join(cmd)}\n".encode())
        master_fd = None
        if self.use_pty:
            import pty

            master_fd, slave_fd = pty.openpty()
            try:
                import fcntl
                import struct
                import termios

                size = fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
                fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, size)
                _rows, cols = struct.unpack("HHHH", size)[:2]
                child_env.setdefault("COLUMNS", str(cols))
            except (OSError, ImportError):
                pass
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave_fd, stderr=slave_fd,
                                    env=child_env, cwd=os.getcwd(), start_new_session=True)
            os.close(slave_fd)
            fds = [(master_fd, False)]
        else:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=child_env, cwd=os.getcwd(),
                                    start_new_session=True)
            assert proc.stdout is not None and proc.stderr is not None
            fds = [(os.dup(proc.stdout.fileno()), False), (os.dup(proc.stderr.fileno()), True)]
            proc.stdout.close()
            proc.stderr.close()
        sink = OutputSink(log, self.display, self.on_text)
        self._sinks = [sink]
        return Handle(self, _Attempt(proc, fds, log, sink, master_fd))

    def pid(self, handle: Handle) -> int:
        return handle.ref.proc.pid

    def wait(self, handle: Handle) -> Outcome:
        att: _Attempt = handle.ref
        while True:
            try:
                returncode = att.proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                # the grace period is enforced here, not from a signal handler or a timer thread
                if att.kill_at is not None and time.monotonic() >= att.kill_at:
                    self.terminate(handle)
                    att.kill_at = None
            except KeyboardInterrupt:  # the supervisor's handler forwards; keep waiting
                continue
        # whatever the script left running in its group goes now, so the readers see EOF
        self._reap_group(att.proc.pid)
        for t in att.readers:
            t.join(timeout=5)
        att.sink.close()
        att.log.close()
        sig = signal.Signals(-returncode).name if returncode < 0 else None
        return Outcome(status="", exit_code=returncode, signal=sig, output_tail=att.sink.tail,
                       stopped_by_user=att.stop_requested)

    def status(self, handle: Handle) -> str:
        rc = handle.ref.proc.poll()
        return "running" if rc is None else ("completed" if rc == 0 else "failed")

    def send_signal(self, handle: Handle, signum: int) -> None:
        try:
            os.killpg(handle.ref.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, handle: Handle, grace_period_s: float, signum: int = signal.SIGTERM) -> None:
        """Forward `signum` to the script's group; SIGKILL after the grace period (or at once,
        when asked twice). Safe to call from a signal handler: no locks, no threads."""
        att: _Attempt = handle.ref
        first = not att.stop_requested
        att.stop_requested = True
        self.send_signal(handle, signum)
        if first:
            att.kill_at = time.monotonic() + grace_period_s
        else:
            self.terminate(handle)

    def terminate(self, handle: Handle) -> None:
        self.send_signal(handle, signal.SIGKILL)

    def _reap_group(self, pgid: int) -> None:
        """Leave no orphan: anything still in the child's process group is killed."""
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def script_takes_flag(script: Path, flag: str) -> bool:
    """Whether the script's source names `flag` (argparse/click definition) or uses trainctl.init."""
    try:
        text = script.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    name = flag.split("=", 1)[0]
    return f"'{name}'" in text or f'"{name}"' in text
