"""Metrics from text, and the small analyses `monitor` and the progress bar share.

Pure and standard-library only: the launcher feeds every output line of a script through
`MetricParser.feed`, so an ordinary line must cost about a microsecond.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import ConfigError
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
_IGNORED_KEYS = frozenset({"v_num"})  # Lightning's logger version in its bar
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
    r"['\"]?(?=(?P<key>[A-Za-z_][\w./-]*))(?P=key)['\"]?"  # atomic: no backtracking into names
    r"(?P<sep>\s*[:=]\s*|\s+)"
    r"[\[(]?(?:tensor\()?"
    rf"(?P<num>{_NUM})"
    r"(?:\s*/\s*(?P<total>\d+))?"
    r"(?!\.?\d|[A-Za-z_])",  # "2.2.0" and "45ms" are not metric values
    re.IGNORECASE,
)
_CONTEXT = re.compile(r"\s*(test|val|valid|validation|eval)\b", re.IGNORECASE)
_LR_TEXT = re.compile(r"learning.rate|\blr\b", re.IGNORECASE)
_LR_KEYS = frozenset({"lr", "learning_rate", "learning-rate"})

MAX_LINE_CHARS = 4096  # metrics sit near the start; a megabyte line must not cost a megabyte


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
                result = _parse_builtin(line)
                break
        for pattern in self.patterns:
            match = pattern.search(line)
            if match:
                result = _merge(result, _from_groups(match.groupdict()))
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


def crashed_warning(status: str | None) -> dict[str, str] | None:
    if status != "crashed":
        return None
    return {"kind": "crashed",
            "message": "the session's processes are gone without recording an end (killed or "
                       "crashed); resume it with: trainctl checkpoint resume"}
