"""Metrics from text, and the small analyses `monitor` and the progress bar share.

Pure and standard-library only: the launcher feeds every output line of a script through
`MetricParser.feed`, so an ordinary line must cost about a microsecond.
"""

from __future__ import annotations

import math
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

from .backtracking import BACKTRACKING_HINT, backtracking_risk
from .errors import ConfigError, TrainctlWarning
from .formatting import format_duration, format_pace, format_value  # noqa: F401 - callers use metrics.*

# -- parsing ------------------------------------------------------------------------------------

# Metric names that make a line worth reporting; anything else (lr, time, ...) only rides along.
# Long words count anywhere in a name; short ones only as a whole part ("val_f1", not "buffer").
_METRIC_NAME = re.compile(
    r"loss|error|perplex|reward|score|bleu|rouge|precision|recall"
    r"|(?:^|[_/.\-])(?:acc(?:uracy)?\d*|top[15]|f1|auc|mae|r?mse|m?iou|nll|wer|cer|ppl|err|map|dice)"
    r"(?:$|[_/.\-@])")
_STEP_KEYS = frozenset({"step", "global_step", "iter", "iteration", "trainer/global_step"})
_EPOCH_KEYS = frozenset({"epoch", "trainer/epoch"})
_TOTAL_STEP_KEYS = frozenset({"max_steps", "max_iters", "total_steps", "num_steps",
                              "max_iterations", "num_train_steps", "total_iters"})
_TOTAL_EPOCH_KEYS = frozenset({"max_epochs", "num_epochs", "total_epochs", "num_train_epochs",
                               "n_epochs", "epochs"})
# Lightning's logger version in its bar; a phase word alone ("Train: 0 [..]" in timm) is a label
_IGNORED_KEYS = frozenset({"v_num", "train", "training", "val", "valid", "validation", "test",
                           "eval"})
_PREFIXES = ("train", "val", "valid", "validation", "test", "eval")

# Cheap gate: a line needs one of these words before the real parse runs. Lower-cased
# substring tests beat one alternation regex by ~3x on ordinary lines.
_GATE_WORDS = ("loss", "acc", "epoch", "step", "iter", "ppl", "perplex", "f1", "auc", "err",
               "mse", "mae", "bleu", "rouge", "reward", "score", "iou", "dice", "top1",
               "top5", "nll", "wer", "precision", "recall")

_NUM = r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|(?i:nan|inf(?:inity)?))"
_PAIR = re.compile(
    r"(?<![\w.])"
    r"(?:(?P<pre>train|training|val|valid|validation|test|eval)[ _](?=\w))?"  # "train loss 2.3"
    r"['\"]?(?=(?P<key>[A-Za-z_][\w./@-]*))(?P=key)['\"]?"  # atomic: no backtracking into names
    r"(?P<sep>\s*[:=]\s*|\s+)"
    r"[\[(]?(?:tensor\()?"
    r"(?P<q>['\"]?)"  # a number written as a string: {'loss': '4.553'} (transformers 5)
    rf"(?P<num>{_NUM})"
    r"(?:\s*/\s*(?P<total>\d+))?"
    r"(?P=q)"
    r"(?!\.?\d|[A-Za-z_])",  # "2.2.0" and "45ms" are not metric values
    re.IGNORECASE,
)
_CONTEXT = re.compile(r"\s*(test|val|valid|validation|eval)\b", re.IGNORECASE)
_LR_TEXT = re.compile(r"learning.rate|\blr\b", re.IGNORECASE)
_LR_KEYS = frozenset({"lr", "learning_rate", "learning-rate"})

# An exception's last line ("ValueError: boom in step 7", "torch.OutOfMemoryError: ...") and a
# warning as Python prints it ("/x/train.py:12: UserWarning: loss is nan"): words, not metrics
# (a metric named like one, "MeanSquaredError: 0.25", has its number right after the colon).
_NOT_METRICS = re.compile(r"^\s*(?:\S+:\d+: )?[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning|Failure)"
                          r"(?::(?!\s*[-+]?(?:\d|\.\d|nan\b|inf))|$)", re.IGNORECASE)
MAX_LINE_CHARS = 4096  # metrics sit near the start; a megabyte line must not cost a megabyte
# User patterns are matched against the first USER_PATTERN_LINE_CHARS of a line; one that takes
# longer than USER_PATTERN_BUDGET_S on a line is turned off (with a warning) for the rest of the run.
USER_PATTERN_LINE_CHARS = 1024
USER_PATTERN_BUDGET_S = 0.1


_KIND_CACHE: dict[str, str] = {}


def _key_kind(key: str) -> str:
    """'step', 'epoch', 'total_steps', 'total_epochs', 'ignore', 'metric' or 'other' (cached)."""
    kind = _KIND_CACHE.get(key)
    if kind is None:
        if key in _STEP_KEYS:
            kind = "step"
        elif key in _EPOCH_KEYS:
            kind = "epoch"
        elif key in _TOTAL_STEP_KEYS:
            kind = "total_steps"
        elif key in _TOTAL_EPOCH_KEYS:
            kind = "total_epochs"
        elif key in _IGNORED_KEYS:
            kind = "ignore"
        else:
            kind = "metric" if _METRIC_NAME.search(key) else "other"
        if len(_KIND_CACHE) < 10000:
            _KIND_CACHE[key] = kind
    return kind


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError, OverflowError):
        return None


def _as_int_or_float(value: float) -> int | float:
    return int(value) if math.isfinite(value) and value == int(value) and abs(value) < 2**53 else value


class MetricParser:
    """Turn output lines into metrics: built-in formats plus user regexes with named groups.

    Stateful only in one way: the last epoch and step seen are carried into later lines that
    hold values but no position (Keras prints "Epoch 2/5" on a line of its own).
    """

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        self.patterns = [compile_pattern(p) for p in patterns]
        self.dropped: list[str] = []  # patterns turned off for being too slow
        self.step: int | None = None
        self.epoch: int | float | None = None

    def feed(self, line: str) -> dict[str, Any] | None:
        """Parse one line; None when it holds no metric, step, epoch or total."""
        if "\r" in line:  # a progress bar redrawn in place: the last state is the one that counts
            parts = [p for p in line.split("\r") if p.strip()]
            line = parts[-1] if parts else ""
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS]
        result = None
        lowered = line.lower()
        for word in _GATE_WORDS:
            if word in lowered:
                if not _NOT_METRICS.match(line):
                    result = _parse_builtin(line)
                break
        if self.patterns:
            result = self._user_patterns(line, result)
        if result is None:
            return None
        if result.get("step") is not None:
            self.step = result["step"]
        if result.get("epoch") is not None:
            self.epoch = result["epoch"]
        if result["values"]:
            if result.get("step") is None:
                result["step"] = self.step
            if result.get("epoch") is None:
                result["epoch"] = self.epoch
        return result

    def _user_patterns(self, line: str, result: dict[str, Any] | None) -> dict[str, Any] | None:
        for pattern in list(self.patterns):
            started = time.perf_counter()
            match = pattern.search(line[:USER_PATTERN_LINE_CHARS])
            spent_s = time.perf_counter() - started
            if spent_s > USER_PATTERN_BUDGET_S:
                # a pattern this slow on one line would stall the launcher's output reader
                self.patterns.remove(pattern)
                self.dropped.append(pattern.pattern)
                warnings.warn(f"[metrics] pattern {pattern.pattern!r} took {spent_s:.2f} s on one "
                              "line and is no longer used for this run. " + BACKTRACKING_HINT,
                              TrainctlWarning, stacklevel=3)
            if match:
                result = _merge(result, _from_groups(match.groupdict()))
        return result

    def feed_text(self, text: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Parse a chunk of output (newline or carriage return end a line); results in order.

        Lines without a gate word are skipped with a few substring scans of the whole chunk,
        not one call per line. With `limit`, only the newest `limit` metric lines are parsed:
        a script printing thousands of lines a second needs its latest state, not every line.
        """
        lowered = text.lower()
        if self.patterns or len(lowered) != len(text):  # some characters change length in lower()
            lines = text.replace("\r", "\n").split("\n")
            if limit is not None:
                found = []
                for line in reversed(lines):
                    parsed = self.feed(line)
                    if parsed is not None:
                        found.append(parsed)
                        if len(found) >= limit:
                            break
                return found[::-1]
            return [p for p in map(self.feed, lines) if p is not None]
        if limit is not None:
            return self._feed_newest(text, lowered, limit)
        starts: set[int] = set()
        for word in _GATE_WORDS:
            i = lowered.find(word)
            while i >= 0:
                start = _line_start(lowered, i)
                starts.add(start)
                end = _line_end(lowered, i)
                i = lowered.find(word, end) if end < len(lowered) else -1
        out = []
        for start in sorted(starts):
            parsed = self.feed(text[start:_line_end(text, start)])
            if parsed is not None:
                out.append(parsed)
        return out

    def _feed_newest(self, text: str, lowered: str, limit: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        end = len(text)
        tries = 0
        while end > 0 and len(found) < limit and tries < limit + 32:  # bounded on "error" floods
            tries += 1
            last = max(lowered.rfind(word, 0, end) for word in _GATE_WORDS)
            if last < 0:
                break
            start = _line_start(lowered, last)
            parsed = self.feed(text[start:_line_end(text, start)])
            if parsed is not None:
                found.append(parsed)
            end = start
        return found[::-1]


def _line_end(text: str, i: int) -> int:
    n = text.find("\n", i)
    if n < 0:
        n = len(text)
    r = text.find("\r", i, n)  # bounded: an unbounded search would make a chunk quadratic
    return n if r < 0 else r


def _line_start(text: str, i: int) -> int:
    n = text.rfind("\n", 0, i) + 1
    r = text.rfind("\r", n, i)
    return n if r < 0 else r + 1


def compile_pattern(pattern: Any) -> re.Pattern[str]:
    """Compile a user metric pattern; ConfigError saying which pattern and why when it is unusable."""
    where = "[metrics] patterns"
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{where}: {pattern!r} is not a regular expression string.",
                          "Each pattern is a string like 'lr=(?P<lr>[0-9.e-]+)'.")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{where}: pattern {pattern!r} is not a valid regex: {e}.",
                          "Fix the pattern (test it with: trainctl monitor --log FILE --parsed "
                          "--pattern 'REGEX').") from e
    if not compiled.groupindex:
        raise ConfigError(f"{where}: pattern {pattern!r} has no named group, so it names no metric.",
                          "Name what it captures: (?P<loss>[0-9.]+) becomes the metric 'loss'.")
    risk = backtracking_risk(pattern)
    if risk:
        raise ConfigError(f"{where}: pattern {pattern!r} {risk}.", BACKTRACKING_HINT)
    return compiled


def _parse_builtin(line: str) -> dict[str, Any] | None:
    step = epoch = total_steps = total_epochs = None
    values: dict[str, float] = {}
    anchored = False
    context = None
    for m in _PAIR.finditer(line):
        key, pre, sep, num, total = m.group("key", "pre", "sep", "num", "total")
        key = key.lower()
        kind = _key_kind(key)
        if kind == "step" or kind == "epoch":
            value = _number(num)
            if value is None or not math.isfinite(value) or value < 0:
                continue
            if kind == "epoch":
                epoch = _as_int_or_float(value)
                if total:
                    total_epochs = int(total)
                    if "\u2022" in line:  # Lightning's rich bar: "Epoch 1/1" is the last of 0..1
                        total_epochs += 1
            elif value == int(value):
                step = int(value)
                if total:
                    total_steps = int(total)
            continue
        whitespace_sep = not sep.strip()
        if kind == "total_steps" or kind == "total_epochs":
            value = _number(num)
            if value is not None and math.isfinite(value) and value > 0 and not whitespace_sep:
                if kind == "total_steps":
                    total_steps = int(value)
                else:
                    total_epochs = math.ceil(value)
            continue
        if kind == "ignore" or (whitespace_sep and kind == "other"):
            continue  # "group 0", "time 45": plain prose, not key/value
        value = _number(num)
        if value is None:
            continue
        if total:
            if int(total) == 0:
                continue
            value = value / int(total)  # "Accuracy: 9849/10000"
        if pre:
            key = f"{pre.lower()}_{key}"
        elif context is None:
            c = _CONTEXT.match(line)
            context = c.group(1).lower() if c else ""
        if context and not pre and not key.startswith(_PREFIXES):
            key = f"{context}_{key}"
        values[key] = value
        anchored = anchored or kind == "metric"
    if not anchored:
        values = {}  # "epoch 3 lr=0.01" is a schedule printout, not a metric line
    if not values and step is None and epoch is None and total_steps is None and total_epochs is None:
        return None
    if not values and (step is not None or epoch is not None) and _LR_TEXT.search(line):
        return None  # "Epoch 00005: reducing learning rate of group 0 to 1.0000e-04."
    result: dict[str, Any] = {"step": step, "epoch": epoch, "values": values}
    if total_steps is not None:
        result["total_steps"] = total_steps
    if total_epochs is not None:
        result["total_epochs"] = total_epochs
    return result


def _from_groups(groups: dict[str, str | None]) -> dict[str, Any] | None:
    step = epoch = None
    values: dict[str, float] = {}
    result: dict[str, Any] = {}
    for name, text in groups.items():
        if text is None:
            continue
        value = _number(text.strip())
        if value is None:
            continue  # a string where a number was expected: not a metric
        if name in ("step", "epoch", "total_steps", "total_epochs"):
            if not math.isfinite(value) or value < 0:
                continue
            if name == "step":
                step = int(value)
            elif name == "epoch":
                epoch = _as_int_or_float(value)
            else:
                result[name] = math.ceil(value)
        else:
            values[name] = value
    if not values and step is None and epoch is None and not result:
        return None
    return {"step": step, "epoch": epoch, "values": values, **result}


def _merge(base: dict[str, Any] | None, extra: dict[str, Any] | None) -> dict[str, Any] | None:
    if extra is None:
        return base
    if base is None:
        return extra
    merged = dict(base)
    for key in ("step", "epoch", "total_steps", "total_epochs"):
        if extra.get(key) is not None:
            merged[key] = extra[key]
    merged["values"] = {**base["values"], **extra["values"]}
    return merged


# -- totals from arguments ----------------------------------------------------------------------

_ARG_STEPS = ("max_iters", "max_steps", "max-iters", "max-steps", "total_steps", "total-steps",
              "num_train_steps", "max_iterations")
_ARG_EPOCHS = ("epochs", "max_epochs", "max-epochs", "num_train_epochs", "num-train-epochs",
               "num_epochs", "num-epochs", "n_epochs")


def infer_totals(args: Sequence[str]) -> dict[str, int | None]:
    """{'steps', 'epochs'} from the script's arguments: '--epochs 5', '--max_iters=5', 'max_iters=5'.

    A dotted prefix counts too ('--trainer.max_epochs=5', LightningCLI). Non-positive values
    (Hugging Face's max_steps=-1 means "unset") give None.
    """
    found: dict[str, int | None] = {"steps": None, "epochs": None}
    args = list(args)
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            continue
        bare = arg.lstrip("-")
        if "=" in bare:
            name, _, text = bare.partition("=")
        elif arg.startswith("-") and i + 1 < len(args):
            name, text = bare, str(args[i + 1])
        else:
            continue
        if not arg.startswith("-") and "=" not in arg:
            continue
        name = name.rsplit(".", 1)[-1]
        kind = "steps" if name in _ARG_STEPS else "epochs" if name in _ARG_EPOCHS else None
        if kind is None:
            continue
        value = _number(text)
        if value is None or not math.isfinite(value) or value <= 0:
            found[kind] = None
            continue
        found[kind] = math.ceil(value)
    return found


# -- analysis -----------------------------------------------------------------------------------

SPARK_CHARS = "▁▂▃▄▅▆▇█"


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def slope(ys: Sequence[float], xs: Sequence[float] | None = None) -> float | None:
    """Least-squares slope of ys over xs (default: 0, 1, 2, ...); None with < 2 usable points."""
    pts = [(float(x), float(y)) for x, y in zip(xs if xs is not None else range(len(ys)), ys, strict=False)
           if is_finite(y) and is_finite(x)]
    n = len(pts)
    if n < 2:
        return None
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def sparkline(values: Sequence[float], width: int = 30) -> str:
    """Unicode sparkline of `values`, averaged down to `width` cells; '!' marks a NaN/Inf cell."""
    values = list(values)
    if not values or width <= 0:
        return ""
    if len(values) > width:
        buckets = []
        for i in range(width):
            chunk = values[i * len(values) // width:(i + 1) * len(values) // width]
            finite = [v for v in chunk if is_finite(v)]
            buckets.append(sum(finite) / len(finite) if len(finite) == len(chunk) else math.nan)
        values = buckets
    finite = [v for v in values if is_finite(v)]
    if not finite:
        return "!" * len(values)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in values:
        if not is_finite(v):
            out.append("!")
        elif span == 0:
            out.append(SPARK_CHARS[3])
        else:
            out.append(SPARK_CHARS[min(7, int((v - lo) / span * 7 + 0.5))])
    return "".join(out)


def rate(points: Sequence[tuple[float, float]]) -> float | None:
    """Units per second from (time, position) points: first to last of those given."""
    pts = [(t, p) for t, p in points if is_finite(t) and is_finite(p)]
    if len(pts) < 2:
        return None
    (t0, p0), (t1, p1) = pts[0], pts[-1]
    if t1 <= t0 or p1 <= p0:
        return None
    return (p1 - p0) / (t1 - t0)


def eta_seconds(current: float | None, total: float | None, per_second: float | None) -> float | None:
    """Seconds left at `per_second` from `current` to `total`; None when any is unknown."""
    if current is None or not total or not per_second or per_second <= 0:
        return None
    return max(0.0, (total - current) / per_second)


class EpochModel:
    """How a run's steps map to its epochs, learned from the (step, epoch) pairs it reports.

    Epochs are counted from 0 (Lightning, `range(n)`) or from 1 (most printed loops): the first
    epoch seen tells which. Once an epoch is over (a later one was seen), its last step gives
    the steps per epoch, so the fraction within the current epoch counts. Steps either run on
    across epochs (a global step) or restart each epoch ("Step [100/600]"); both are handled.
    Epochs reported as fractions (Hugging Face's 0.7031) are their own measure of progress.
    """

    def __init__(self) -> None:
        self._steps: dict[int, list[int]] = {}  # epoch -> [first step, last step] seen in it
        self._epochs: set[int] = set()
        self.fractional = False

    def observe(self, step: Any, epoch: Any) -> None:
        if not is_finite(epoch) or epoch < 0:
            return
        if epoch != int(epoch):
            self.fractional = True
            return
        e = int(epoch)
        self._epochs.add(e)
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            seen = self._steps.get(e)
            if seen is None:
                self._steps[e] = [step, step]
            else:
                seen[0] = min(seen[0], step)
                seen[1] = max(seen[1], step)

    def rewind(self, step: int) -> None:
        """A resume went back to `step`: forget what was seen after it."""
        for e, seen in list(self._steps.items()):
            if seen[0] > step:
                del self._steps[e]
                self._epochs.discard(e)
            else:
                seen[1] = min(seen[1], step)

    @property
    def base(self) -> int:
        return 0 if 0 in self._epochs else 1

    @property
    def restarting_steps(self) -> bool:
        """Steps count within each epoch (they go back when a new epoch starts)."""
        epochs = sorted(self._steps)
        return any(self._steps[b][0] < self._steps[a][1] for a, b in pairwise(epochs))

    def steps_per_epoch(self) -> float | None:
        """Learned once an epoch is over (a later epoch was seen); None before that."""
        if not self._epochs:
            return None
        latest = max(self._epochs)
        over = [e for e in self._steps if e < latest]
        if not over:
            return None
        if self.restarting_steps:
            first = min(self._steps[e][0] for e in self._steps)
            return float(max(self._steps[e][1] for e in over) + (1 if first == 0 else 0))
        e = max(over)
        per = self._steps[e][1] / (e - self.base + 1)
        return per if per > 0 else None

    def position(self, step: Any, epoch: Any) -> float | None:
        """Epochs done, with the fraction of the current one: 2.73 = two over, 73% of the third."""
        if not is_finite(epoch):
            per = self.steps_per_epoch()
            if per and isinstance(step, int) and not self.restarting_steps and not self.fractional:
                return step / per
            return None
        if self.fractional or epoch != int(epoch):
            return float(epoch)
        done = int(epoch) - self.base
        per = self.steps_per_epoch()
        if not per or not isinstance(step, int) or isinstance(step, bool):
            return float(max(0, done))
        into = step if self.restarting_steps else step - done * per
        return max(0, done) + min(max(into / per, 0.0), 0.999)

    def current_epoch(self, step: Any, epoch: Any) -> int | None:
        """The epoch the run is in, counted from 1 (what a person calls the first epoch)."""
        position = self.position(step, epoch)
        if position is None:
            return None
        return int(position) + 1

    def total_steps(self, total_epochs: int | None) -> int | None:
        """Steps of the whole run, when steps run on across epochs and their count is learned."""
        per = self.steps_per_epoch()
        if not per or not total_epochs or self.restarting_steps or self.fractional:
            return None
        return round(per * total_epochs)


def run_progress(points: Sequence[tuple[float | None, Any, Any]], *, total_steps: int | None,
                 total_epochs: int | None, model: EpochModel | None = None,
                 finished: bool = False, window: int | None = None) -> dict[str, Any]:
    """Where a run stands, from its (time, step, epoch) points, oldest first (the latest attempt's
    stretch for the rate): fraction done, the current epoch (from 1), ETA at the pace of the last
    `window` points.

    A total number of steps is used when known; else the epochs, with the fraction within the
    current one once steps per epoch are known. A finished run is at 100% of its last epoch.
    """
    if model is None:
        model = EpochModel()
        for _, step, epoch in points:
            model.observe(step, epoch)
    step = next((p[1] for p in reversed(points) if isinstance(p[1], int)), None)
    newest = points[-1] if points else (None, None, None)
    # the newest point's own epoch; when it has none, what its step says (not an older epoch)
    epoch = newest[2] if is_finite(newest[2]) else None
    if epoch is None and not (isinstance(newest[1], int) and model.steps_per_epoch()):
        epoch = next((p[2] for p in reversed(points) if is_finite(p[2])), None)
    steps_known = bool(total_steps) and not model.restarting_steps

    def fraction_at(step: Any, epoch: Any) -> float | None:
        if steps_known and isinstance(step, int):
            return step / total_steps
        if total_epochs:
            position = model.position(step, epoch)
            if position is not None:
                return position / total_epochs
        return None

    fraction = fraction_at(step, epoch)
    current = model.current_epoch(step, epoch)
    if current is None and is_finite(epoch):
        current = int(epoch) - model.base + 1
    eta = None
    timed = [(t, fraction_at(s, e)) for t, s, e in (points[-window:] if window else points)
             if is_finite(t)]
    timed = [(t, f) for t, f in timed if f is not None]
    per_second = rate(timed)
    if fraction is not None and per_second:
        eta = max(0.0, (1.0 - min(fraction, 1.0)) / per_second)
    if finished:
        if fraction is not None or total_epochs or total_steps:
            fraction = 1.0
        if total_epochs:
            current = total_epochs
        eta = None
    if total_epochs and current is not None:
        current = min(current, total_epochs)
    return {"fraction": min(1.0, max(0.0, fraction)) if fraction is not None else None,
            "epoch": current, "epoch_logged": epoch, "step": step, "eta_s": eta,
            "steps_per_epoch": model.steps_per_epoch(),
            "total_steps_estimated": None if total_steps else model.total_steps(total_epochs)}


def primary_metric(names: Iterable[str]) -> str | None:
    """The metric a reader looks at first: 'loss', then a train loss, then any loss."""
    names = list(names)
    for preferred in ("loss", "train_loss", "train/loss", "training_loss", "train_loss_step",
                      "train_loss_epoch"):
        if preferred in names:
            return preferred
    losses = [n for n in names if "loss" in n.lower()]
    if losses:
        return sorted(losses, key=lambda n: (any(p in n.lower() for p in ("val", "test", "eval")), n))[0]
    return names[0] if names else None


def trend(values: Sequence[float], *, mode: str = "min", window: int = 50,
          xs: Sequence[float] | None = None) -> dict[str, Any]:
    """last, best (and its index), slope over the last `window` points, and its direction."""
    values = list(values)
    if not values:
        return {"last": None, "best": None, "best_index": None, "slope": None, "direction": None,
                "points": 0}
    finite = [(i, v) for i, v in enumerate(values) if is_finite(v)]
    best_index = None
    if finite:
        pick = min if mode == "min" else max
        best_index = pick(finite, key=lambda p: p[1])[0]
    tail = values[-window:]
    tail_xs = list(xs)[-window:] if xs is not None else None
    s = slope(tail, tail_xs)
    direction = None
    if s is not None:
        finite_tail = [v for v in tail if is_finite(v)]
        scale = max(abs(sum(finite_tail) / len(finite_tail)), 1e-12) if finite_tail else 1.0
        span = (tail_xs[-1] - tail_xs[0]) if tail_xs and len(tail_xs) > 1 else len(tail)
        change = s * (span or 1) / scale
        if abs(change) < 0.01:
            direction = "flat"
        elif (change < 0) == (mode == "min"):
            direction = "improving"
        else:
            direction = "worsening"
    return {"last": values[-1], "best": values[best_index] if best_index is not None else None,
            "best_index": best_index, "slope": s, "direction": direction, "points": len(values)}


# -- warnings -----------------------------------------------------------------------------------


def nonfinite_warning(series: dict[str, Sequence[float]]) -> dict[str, str] | None:
    """NaN/Inf as the latest value of any metric."""
    bad = [name for name, values in series.items() if values and not is_finite(values[-1])]
    if not bad:
        return None
    shown = ", ".join(f"{n}={format_value(series[n][-1])}" for n in bad[:4])
    return {"kind": "nan", "message": f"NaN/Inf metric: {shown}. Training has likely diverged; "
                                      "lower the learning rate or resume from an earlier checkpoint."}


def divergence_warning(name: str, values: Sequence[float], *, mode: str = "min",
                       window: int = 50) -> dict[str, str] | None:
    """`name` moving the wrong way over the last `window` points (first third vs last third)."""
    tail = [v for v in list(values)[-window:] if is_finite(v)]
    if len(tail) < 6:
        return None
    third = len(tail) // 3
    first = sum(tail[:third]) / third
    last = sum(tail[-third:]) / third
    s = slope(tail)
    worse = last - first if mode == "min" else first - last
    if s is None or worse <= 0.1 * max(abs(first), 1e-12) or (s <= 0 if mode == "min" else s >= 0):
        return None
    return {"kind": "divergence",
            "message": f"{name} is {'rising' if mode == 'min' else 'falling'} over the last "
                       f"{len(tail)} points ({format_value(first)} -> {format_value(last)})."}


def plateau_warning(name: str, values: Sequence[float], *, mode: str = "min",
                    window: int = 50) -> dict[str, str] | None:
    """No new best of `name` within the last `window` points (after at least half a window)."""
    finite = [v for v in values if is_finite(v)]
    earlier, recent = finite[:-window], finite[-window:]
    if len(recent) < window or len(earlier) < max(3, window // 2):
        return None
    best_before = min(earlier) if mode == "min" else max(earlier)
    best_recent = min(recent) if mode == "min" else max(recent)
    tolerance = 1e-3 * max(abs(best_before), 1e-12)
    improved = best_recent < best_before - tolerance if mode == "min" else best_recent > best_before + tolerance
    if improved:
        return None
    return {"kind": "plateau",
            "message": f"{name} has not improved over the last {window} points "
                       f"(best {format_value(best_before)}); consider stopping early or "
                       "changing the learning rate schedule."}


def stall_warning(*, now: float, last_output_t: float | None, last_metric_t: float | None,
                  stall_s: float) -> dict[str, str] | None:
    """A live run with no output (or no new metric) for `stall_s` seconds."""
    if stall_s <= 0:
        return None
    if last_output_t is not None and now - last_output_t > stall_s:
        return {"kind": "stall", "message": f"no output for {format_duration(now - last_output_t)}; "
                                            "the run may be hung (deadlock, dataloader, network)."}
    if last_metric_t is not None and now - last_metric_t > stall_s:
        return {"kind": "stall", "message": f"no new metric for {format_duration(now - last_metric_t)} "
                                            "although the run is still writing output."}
    return None


def checkpoint_overdue_warning(*, now: float, newest_t: float | None, started_t: float | None,
                               overdue_s: float) -> dict[str, str] | None:
    """A live run whose newest checkpoint (or, without one, its start) is older than `overdue_s`."""
    if overdue_s <= 0:
        return None
    if newest_t is not None:
        if now - newest_t > overdue_s:
            return {"kind": "checkpoint_overdue",
                    "message": f"newest checkpoint is {format_duration(now - newest_t)} old; "
                               "a crash now would lose that much work."}
        return None
    if started_t is not None and now - started_t > overdue_s:
        return {"kind": "checkpoint_overdue",
                "message": f"no checkpoint after {format_duration(now - started_t)} of running; "
                           "a crash now would lose all of it."}
    return None


def disk_usage(path: str) -> dict[str, Any] | None:
    """{'path', 'free_bytes', 'total_bytes'} of the filesystem holding `path` (or its nearest parent)."""
    import os

    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return None
    return {"path": probe, "free_bytes": usage.free, "total_bytes": usage.total}


def disk_warning(usage: dict[str, Any] | None, *, min_free_bytes: float,
                 min_free_fraction: float = 0.05) -> dict[str, str] | None:
    """The checkpoint filesystem has less than `min_free_bytes` or `min_free_fraction` free."""
    if not usage or not usage.get("total_bytes"):
        return None
    free, total = usage["free_bytes"], usage["total_bytes"]
    if free >= min_free_bytes and free / total >= min_free_fraction:
        return None
    from .config import format_size

    return {"kind": "disk_full",
            "message": f"disk nearly full at {usage['path']}: {format_size(free)} free of "
                       f"{format_size(total)}; the next checkpoint may fail. Free space with: "
                       "trainctl checkpoint cleanup --dry-run"}


def save_failed_warning(failed: int, last_error: str | None) -> dict[str, str] | None:
    """Checkpoint saves that failed (a full or read-only checkpoint disk, most often)."""
    if not failed:
        return None
    return {"kind": "checkpoint_failed",
            "message": f"{failed} checkpoint save(s) failed; last: {last_error}. Progress since "
                       "the newest good checkpoint is not saved: free space (trainctl checkpoint "
                       "cleanup --dry-run) or fix the checkpoint folder."}


def crashed_warning(status: str | None, resume_command: str | None = None) -> dict[str, str] | None:
    if status != "crashed":
        return None
    how = f"resume it with: {resume_command}" if resume_command else "its script is unknown"
    warning = {"kind": "crashed",
               "message": "the session's processes are gone without recording an end (killed "
                          f"or crashed); {how}"}
    if resume_command:
        warning["command"] = resume_command
    return warning
