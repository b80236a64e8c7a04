"""The launcher's progress display: the bar never garbles the script's output (checked through a
real pty and a small terminal emulator), plain status lines off a terminal, session events."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from trainctl.cli.progress import ProgressDisplay
from trainctl.session import SessionStore

HEIGHT = 8  # rows: small, so the output scrolls and the bar has to follow the bottom


class Screen:
    """Just enough of a VT100 for what the display and tqdm write."""

    def __init__(self, width: int = 80, height: int = 24) -> None:
        self.width, self.height = width, height
        self.rows = [[" "] * width for _ in range(height)]
        self.history: list[str] = []
        self.row = self.col = 0
        self.saved = (0, 0)

    def _linefeed(self) -> None:
        if self.row == self.height - 1:
            self.history.append("".join(self.rows.pop(0)))
            self.rows.append([" "] * self.width)
        else:
            self.row += 1

    def feed(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                m = re.match(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b([78])", text[i:])
                assert m, repr(text[i:i + 10])
                i += m.end()
                if m.group(3) == "7":
                    self.saved = (self.row, self.col)
                elif m.group(3) == "8":
                    self.row, self.col = self.saved
                else:
                    n = int(m.group(1) or 1) if m.group(1).isdigit() else 1
                    cmd = m.group(2)
                    if cmd == "A":
                        self.row = max(0, self.row - n)
                    elif cmd == "B":
                        self.row = min(self.height - 1, self.row + n)
                    elif cmd == "C":
                        self.col = min(self.width - 1, self.col + n)
                    elif cmd == "K":
                        self.rows[self.row][self.col:] = [" "] * (self.width - self.col)
                    elif cmd == "J":
                        self.rows[self.row][self.col:] = [" "] * (self.width - self.col)
                        for r in range(self.row + 1, self.height):
                            self.rows[r] = [" "] * self.width
                continue
            i += 1
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self._linefeed()
            elif ch >= " ":
                if self.col >= self.width:
                    self.col = 0
                    self._linefeed()
                self.rows[self.row][self.col] = ch
                self.col += 1

    def lines(self) -> list[str]:
        out = [line.rstrip() for line in self.history + ["".join(r) for r in self.rows]]
        while out and not out[-1]:
            out.pop()
        return out


CHILD = textwrap.dedent("""
    import sys, time
    from tqdm import tqdm
    for epoch in range(2):
        print(f"Epoch {epoch + 1}/2 starts: " + "x" * 40, flush=True)
        for i in tqdm(range(20), file=sys.stdout, ncols=60, mininterval=0, desc="batches"):
            time.sleep(0.003)
            if i % 5 == 0:
                tqdm.write(f"step {epoch * 20 + i}/40 loss {1.0 / (1 + epoch * 20 + i):.4f} "
                           f"line-{epoch}-{i}", file=sys.stdout)
        print(f"end of epoch {epoch + 1}", flush=True)
    sys.stdout.write("a last line without newline")
    sys.stdout.flush()
""")

DRIVER = textwrap.dedent("""
    import os, subprocess, sys, threading
    from trainctl.cli.progress import ProgressDisplay
    from trainctl.launcher.output import OutputText
    from trainctl.metrics import MetricParser
    from trainctl.session import SessionStore

    session = SessionStore(sys.argv[1]).create()
    display = ProgressDisplay(session, totals={"epochs": 2}, poll_interval_s=0.02)
    display.start()
    proc = subprocess.Popen([sys.executable, "-c", sys.argv[2]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    parser = MetricParser()
    text = OutputText()  # whole lines for the parser, as the launcher gives it
    raw = open(sys.argv[3], "wb")
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 97)  # small reads: chunk ends fall in the middle of lines
        if not chunk:
            break
        raw.write(chunk)
        display.write_output(chunk)
        for parsed in parser.feed_text(text.feed(chunk)):
            display.on_parsed(parsed)
    proc.wait()
    display.close()
""")


def _run_in_pty(tmp_path: Path, width: int) -> tuple[bytes, bytes]:
    (tmp_path / "driver.py").write_text(DRIVER)
    raw_path = tmp_path / "raw.bin"
    pid, master = pty.fork()
    if pid == 0:  # child: the pty is its terminal
        try:
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", HEIGHT, width, 0, 0))
            os.execv(sys.executable, [sys.executable, str(tmp_path / "driver.py"),
                                      str(tmp_path / "state"), CHILD, str(raw_path)])
        finally:
            os._exit(127)
    out = bytearray()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child side closed
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-2000:]
    return bytes(out), raw_path.read_bytes()


def _screen(data: bytes, width: int) -> list[str]:
    screen = Screen(width, HEIGHT)
    screen.feed(data)
    return screen.lines()


def test_bar_keeps_the_scripts_lines_intact_in_a_pty(tmp_path):
    seen, raw = _run_in_pty(tmp_path, width=80)
    # the script's output alone, as a terminal would show it (the pty turned \n into \r\n)
    expected = _screen(raw.replace(b"\n", b"\r\n"), 80)
    got = _screen(seen, 80)
    assert b"step/s" in seen or b"it/s" in seen or b"epoch" in seen  # the bar was drawn
    assert any("line-1-15" in line for line in expected)
    # every line the script left on screen is there, whole and in order; ours is the last one
    assert got[:len(expected)] == expected, "\n".join(got)
    assert len(got) == len(expected) + 1
    assert "epoch 2/2" in got[-1] and "35/40" in got[-1] and "loss=0.0278" in got[-1]


def test_narrow_terminal_gets_no_bar_and_intact_output(tmp_path):
    seen, raw = _run_in_pty(tmp_path, width=15)
    assert _screen(seen, 15) == _screen(raw.replace(b"\n", b"\r\n"), 15)


class _Sink(io.BytesIO):
    def isatty(self) -> bool:
        return False


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def test_plain_mode_passes_output_through_and_prints_status_lines(tmp_path):
    session = SessionStore(tmp_path).create()
    status, out, err = io.StringIO(), _Sink(), _Sink()
    display = ProgressDisplay(session, totals={"steps": 40, "epochs": None}, stream=status,
                              is_tty=False, status_interval_s=0.05, poll_interval_s=0.02,
                              stdout=out, stderr=err)
    display.start()
    chunks = [b"step 1 loss 0.9\npartial", b" line\r50%|###  |\r", b"\x00\xff binary\n"]
    for chunk in chunks:
        display.write_output(chunk)
    display.write_output(b"warning on stderr\n", stderr=True)
    display.on_parsed({"step": 10, "epoch": 1, "values": {"loss": 0.412}})
    _wait_for(lambda: "step 10/40" in status.getvalue())
    display.close()
    assert out.getvalue() == b"".join(chunks)
    assert err.getvalue() == b"warning on stderr\n"
    line = status.getvalue().splitlines()[0]
    assert line.startswith("[trainctl] epoch 1 step 10/40 (25%) loss 0.412")
    assert status.getvalue().splitlines()[-1].endswith("(done)")


def test_quiet_prints_nothing_of_its_own(tmp_path):
    session = SessionStore(tmp_path).create()
    status, out = io.StringIO(), _Sink()
    display = ProgressDisplay(session, totals={}, quiet=True, stream=status, is_tty=True,
                              status_interval_s=0.01, poll_interval_s=0.01, stdout=out, stderr=out)
    display.start()
    display.write_output(b"hello\n")
    display.on_parsed({"step": 3, "epoch": None, "values": {"loss": 1.0}})
    time.sleep(0.1)
    display.close()
    assert status.getvalue() == ""
    assert out.getvalue() == b"hello\n"


def test_events_drive_progress_totals_from_init_win(tmp_path):
    session = SessionStore(tmp_path).create()
    display = ProgressDisplay(session, totals={"steps": 999}, stream=io.StringIO(), is_tty=False,
                              poll_interval_s=0.02, stdout=_Sink(), stderr=_Sink())
    display.start()
    now = time.time()
    session.append_events([
        {"kind": "totals", "steps": 100, "epochs": None},
        {"kind": "metric", "step": 10, "epoch": 0, "values": {"loss": 2.0}, "source": "run", "t": now - 9},
        {"kind": "metric", "step": 55, "epoch": 0, "values": {"loss": 1.0}, "source": "run", "t": now},
        {"kind": "metric", "step": 99999, "values": {"loss": 5.0}, "source": "output", "t": now},
        {"kind": "checkpoint", "path": "/x.pt", "step": 50},
    ])
    _wait_for(lambda: display.summary()["checkpoints"] == 1)
    display.close()
    s = display.summary()
    assert (s["step"], s["total_steps"], s["loss"]) == (55, 100, 1.0)
    assert s["step_rate"] == pytest.approx(5.0)
    assert s["eta_s"] == pytest.approx(9.0)
    assert "ETA 9s" in display.status_line()


def _steady(steps_per_epoch: int, upto: int, *, first_epoch: int = 1, per_epoch_steps: bool = False,
            every: int = 1, steps_per_s: float = 10.0, t0: float = 1_000_000.0) -> list[dict]:
    """Metric events of a steady run: `steps_per_s`, epochs counted from `first_epoch`."""
    events = []
    for step in range(every, upto + 1, every):
        epoch = (step - 1) // steps_per_epoch + first_epoch
        logged = (step - 1) % steps_per_epoch + 1 if per_epoch_steps else step
        events.append({"kind": "metric", "step": logged, "epoch": epoch, "values": {"loss": 1 / step},
                       "source": "run", "t": t0 + step / steps_per_s})
    return events


def _fractional(upto: float, total_epochs: int) -> list[dict]:
    """Hugging Face Trainer style: epoch as a fraction, one log every 0.05 epoch, 1 s apart."""
    return [{"kind": "metric", "epoch": round(i * 0.05, 4), "values": {"loss": 1 / i}, "source": "run",
             "t": 1_000_000.0 + i} for i in range(1, round(upto / 0.05) + 1)]


# (case, events, totals event, final status, shown epoch, fraction, ETA s (None: none), line parts)
PROGRESS_CASES = [
    ("1-based, late in the last epoch", _steady(50, 137), {"epochs": 3}, "running", 3, 137 / 150, 1.3,
     ["epoch 3/3", "step 137/150 (91%)"]),
    ("1-based, middle epoch", _steady(50, 75), {"epochs": 3}, "running", 2, 0.5, 7.5,
     ["epoch 2/3", "step 75/150 (50%)"]),
    ("logged every 5 steps", _steady(50, 135, every=5), {"epochs": 3}, "running", 3, 0.9, 1.5,
     ["epoch 3/3"]),
    ("0-based (Lightning), finished", _steady(16, 80, first_epoch=0), {"steps": 80, "epochs": 5},
     "completed", 5, 1.0, None, ["epoch 5/5", "step 80/80 (100%)"]),
    ("1-based, finished", _steady(50, 250), {"epochs": 5}, "completed", 5, 1.0, None,
     ["epoch 5/5", "(100%)"]),
    ("steps restart each epoch", _steady(600, 1500, per_epoch_steps=True, every=100), {"epochs": 10},
     "running", 3, 0.25, 450.0, ["epoch 3/10", "(25%)"]),
    ("fractional epochs (Hugging Face)", _fractional(0.7, 3), {"epochs": 3}, "running", 1, 0.7 / 3, 46.0,
     ["epoch 1/3", "(23%)"]),
    ("first epoch not over yet", _steady(50, 30), {"epochs": 3}, "running", 1, 0.0, None,
     ["epoch 1/3", "step 30 (0%)"]),
]


@pytest.mark.parametrize(("case", "events", "totals", "status", "epoch", "fraction", "eta", "parts"),
                         PROGRESS_CASES, ids=[c[0] for c in PROGRESS_CASES])
def test_progress_and_eta_from_timestamps(tmp_path, case, events, totals, status, epoch, fraction,
                                          eta, parts):
    session = SessionStore(tmp_path).create()
    session.append_events([{"kind": "totals", **totals}, *events])
    stream = io.StringIO()
    display = ProgressDisplay(session, totals={}, stream=stream, is_tty=False, stdout=_Sink(),
                              stderr=_Sink())
    display.close(status)  # reads the whole log once, then prints the final status line
    s = display.summary()
    assert s["epoch"] == epoch
    assert s["fraction"] == pytest.approx(fraction, abs=0.01)
    if eta is None:
        assert s["eta_s"] is None
    else:  # within 20% of the true time left
        assert s["eta_s"] == pytest.approx(eta, rel=0.2)
    line = stream.getvalue()
    for part in parts:
        assert part in line, line
