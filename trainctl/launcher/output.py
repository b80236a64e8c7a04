"""The script's output as the engine reads it: decoded into lines, parsed for metrics without
slowing the script, the newest lines kept for the diagnosis, parsed metrics recorded."""

from __future__ import annotations

import codecs
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..session import Session

FULL_PARSE_LINES_PER_S = 500.0  # output lines a second parsed one by one
NEWEST_WHEN_FAST = 2  # metric lines parsed per read of output beyond that rate
FAST_TAIL_CHARS = 4096
SAMPLE_INTERVAL_S = 0.05
TAIL_LINES = 200
TAIL_CHARS = 64 * 1024
MAX_PARTIAL_CHARS = 1 << 20
MAX_UNRECORDED_EVENTS = 10_000  # parsed metrics kept while the events log can't be written


class OutputText:
    """Bytes of one or two streams -> complete lines of text, and the newest of them kept.

    Work per chunk, not per line: a script printing thousands of lines a second must not wait
    for its reader (a full pipe blocks the writer).
    """

    def __init__(self) -> None:
        self._recent: collections.deque[str] = collections.deque()  # newest output, ~TAIL_CHARS
        self._recent_chars = 0
        self._partial: dict[str, str] = {}
        self._decoders: dict[str, Any] = {}

    def feed(self, data: bytes, stream: str = "output") -> str:
        """The complete lines `data` finishes (may be ""), remembered for `tail`."""
        decoder = self._decoders.get(stream)
        if decoder is None:
            decoder = self._decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        text = self._partial.get(stream, "") + decoder.decode(data)
        cut = max(text.rfind("\n"), text.rfind("\r"))
        if cut < 0 and len(text) < MAX_PARTIAL_CHARS:
            self._partial[stream] = text
            return ""
        if cut < 0:  # a "line" without end: don't grow forever
            cut = len(text) - 1
        complete, self._partial[stream] = text[:cut + 1], text[cut + 1:]
        self._keep(complete)
        return complete

    def finish(self) -> str:
        """What is left unterminated at the end of the output."""
        rest = "".join(self._partial.get(k, "") + d.decode(b"", final=True) for k, d in self._decoders.items())
        self._partial = {}
        if rest:
            self._keep(rest)
        return rest

    def _keep(self, text: str) -> None:
        # kept as chunks and split into lines only when asked: most runs never need the tail
        self._recent.append(text)
        self._recent_chars += len(text)
        while self._recent_chars > TAIL_CHARS and len(self._recent) > 1:
            self._recent_chars -= len(self._recent.popleft())

    @property
    def tail(self) -> list[str]:
        """The last TAIL_LINES non-empty lines of output (\\r-redrawn lines count as lines)."""
        text = "".join(self._recent).replace("\r\n", "\n").replace("\r", "\n")
        return [line for line in text.split("\n") if line][-TAIL_LINES:]


class OutputParser:
    """Feeds the script's output to the metric parser without slowing the script.

    Up to FULL_PARSE_LINES_PER_S every line is parsed. Past that nobody reads the lines and
    parsing each one would slow the script (a full pipe blocks its writes), so the newest
    metrics are sampled every SAMPLE_INTERVAL_S and the last unparsed output is read at the end.
    """

    def __init__(self, parser: Any, on_parsed: Any) -> None:
        self.parser = parser
        self.on_parsed = on_parsed
        self.budget = LineBudget(FULL_PARSE_LINES_PER_S)
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


class LineBudget:
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


@dataclass
class OutputMetrics:
    """Metrics parsed from the script's output, recorded unless the script logs its own."""

    session: Session
    attempt: int = 0
    buffer: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # one flush at a time: the engine's last flush must not return while the background one
    # still holds events it took from the buffer, or the summary is made without them
    flush_lock: threading.Lock = field(default_factory=threading.Lock)
    attached: bool = False
    tensorboard: Any = None
    on_error: Any = None  # called with the OSError when the events log can't be written

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
        with self.flush_lock:
            self._flush()

    def _flush(self) -> None:
        with self.lock:
            events, self.buffer = self.buffer, []
        if not events:
            return
        if not self.attached:
            runtime = (self.session.read().get("runtime") or {})
            self.attached = runtime.get("attempt") == self.attempt and bool(runtime.get("pid"))
        if self.attached:
            return  # the script reports through trainctl.init(): its numbers are the record
        try:
            self.session.append_events(events)
        except OSError as e:  # a full disk: kept (the newest, bounded) for the next flush
            with self.lock:
                self.buffer[:0] = events
                del self.buffer[:-MAX_UNRECORDED_EVENTS]
            if self.on_error is not None:
                self.on_error(e)
            return
        events = [e for e in events if e["kind"] == "metric"]
        if not events:
            return
        try:
            if self.tensorboard is None:
                from ..tensorboard_sink import TensorBoardSink

                self.tensorboard = TensorBoardSink(self.session.tensorboard_dir / "output")
            self.tensorboard.write(events)
        except Exception:  # TensorBoard is a view of the events log, which has them
            pass

    def unrecorded(self) -> list[dict[str, Any]]:
        """Parsed metrics the events log could not take (a full disk), for the summary."""
        with self.lock:
            return [e for e in self.buffer if e["kind"] == "metric"]

    def close(self) -> None:
        self.flush()
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except Exception:
                pass
