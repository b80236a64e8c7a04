"""pipeline.toml: read, expanded (matrix) and checked before anything runs; every problem one
error with the file and line it is on."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PIPELINE_KEYS = {"name": "the pipeline's id (default: the file name without .toml)",
                 "steps": "one table per step: [steps.NAME]"}
STEP_KEYS = {
    "script": "the script to run, relative to the pipeline file",
    "args": "its arguments; may use {steps.X.<output>} and {matrix.KEY}",
    "needs": "steps that must complete first",
    "backend": "local (default), aws or runpod",
    "resources": "e.g. {nproc_per_node = 2, gpus = 1}",
    "matrix": "{KEY = [values...]}: one session per combination",
    "parallel": "how many of a matrix's sessions run at once on this machine (default 1)",
    "select": '{metric = "val_loss", mode = "min"}: how best_checkpoint and best are chosen',
    "max_restarts": "restarts of a session after a crash or preemption (default: trainctl.toml's)",
}
# what {steps.X.<output>} may name; `best.` + any of them picks the matrix's best session first
OUTPUTS = ("best_checkpoint", "last_checkpoint", "session_dir", "session_id", "checkpoint")
REFERENCE = re.compile(r"\{([^{}]*)\}")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
BACKENDS = ("local", "aws", "runpod")
LOCAL_RESOURCES = {"nproc_per_node": 1, "gpus": 0}  # key -> smallest value


class PipelineError(ConfigError):
    """A pipeline file that can't run as written (file:line in the message)."""


@dataclass(frozen=True)
class Reference:
    text: str  # as written, with braces
    step: str | None  # None for {matrix.KEY}
    output: str  # best_checkpoint, metrics.val_loss, ... (for matrix: the key)
    best: bool = False


@dataclass
class Step:
    name: str
    script: Path
    args: list[str]
    needs: list[str] = field(default_factory=list)
    backend: str = "local"
    resources: dict[str, Any] = field(default_factory=dict)
    matrix: dict[str, list[Any]] = field(default_factory=dict)
    parallel: int = 1
    select_metric: str = "val_loss"
    select_mode: str = "min"
    max_restarts: int | None = None

    def combinations(self) -> list[dict[str, Any]]:
        """One dict per session: the matrix's cartesian product ({} without a matrix)."""
        if not self.matrix:
            return [{}]
        keys = list(self.matrix)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.matrix.values())]

    def references(self) -> list[Reference]:
        return [r for arg in self.args for r in parse_references(arg)]


@dataclass
class Pipeline:
    id: str
    path: Path
    steps: dict[str, Step]  # in the order they run
    text: str = ""

    def dependents(self, name: str) -> set[str]:
        """`name` and every step that needs it, directly or not."""
        out = {name}
        changed = True
        while changed:
            changed = False
            for step in self.steps.values():
                if step.name not in out and out.intersection(step.needs):
                    out.add(step.name)
                    changed = True
        return out


def parse_references(arg: str) -> list[Reference]:
    out = []
    for m in REFERENCE.finditer(arg):
        parts = m.group(1).strip().split(".")
        if parts[0] == "matrix" and len(parts) == 2:
            out.append(Reference(m.group(0), None, parts[1]))
        elif parts[0] == "steps" and len(parts) >= 3:
            best = parts[2] == "best" and len(parts) >= 4
            rest = parts[3:] if best else parts[2:]
            out.append(Reference(m.group(0), parts[1], ".".join(rest), best))
        else:
            out.append(Reference(m.group(0), "", m.group(1)))  # malformed: said by check_reference
    return out


# --- where in the file ------------------------------------------------------------------------

class Locator:
    """Line numbers for tomllib's data (it gives none): found by searching the text for the
    step's table header and the key inside it."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def _header(self, step: str) -> int | None:
        pattern = re.compile(rf"^\s*\[\s*steps\s*\.\s*(\"{re.escape(step)}\"|'{re.escape(step)}'|{re.escape(step)})\s*\]")
        return next((i for i, line in enumerate(self.lines) if pattern.match(line)), None)

    def line(self, step: str | None = None, key: str | None = None, needle: str | None = None) -> int | None:
        """1-based line of `key` (or of the text `needle`) in step's table, else of the table; of a
        top-level key without a step."""
        if step is None:
            if key is None:
                return None
            pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
            return next((i + 1 for i, line in enumerate(self.lines) if pattern.match(line)), None)
        start = self._header(step)
        if start is None:  # written another way ([steps] with inline tables): the first mention
            return next((i + 1 for i, line in enumerate(self.lines) if step in line), None)
        end = next((i for i in range(start + 1, len(self.lines)) if re.match(r"^\s*\[", self.lines[i])),
                   len(self.lines))
        for i in range(start + 1, end):
            line = self.lines[i]
            if needle is not None and needle in line:
                return i + 1
            if needle is None and key is not None and re.match(rf"^\s*{re.escape(key)}\s*=", line):
                return i + 1
        return start + 1

    def error(self, message: str, hint: str, *, step: str | None = None, key: str | None = None,
              needle: str | None = None) -> PipelineError:
        return PipelineError(message, hint, path=str(self.path), line=self.line(step, key, needle) or 1)


# --- reading and checking -----------------------------------------------------------------------

def load(path: str | Path) -> Pipeline:
    """The pipeline in `path`, checked: unknown keys and steps, cycles, references to outputs a
    step can't give, missing scripts. Raises PipelineError (file:line) on the first problem."""
    from ..config import tomllib

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"pipeline file {path} does not exist.",
                            "Name the pipeline's TOML file, e.g. trainctl pipeline run pipeline.toml") from None
    except OSError as e:
        raise PipelineError(f"cannot read pipeline file {path}: {e.strerror}.", "Check the path and its permissions.") from e
    where = Locator(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        line = int(m.group(1)) if m else (len(where.lines) if "end of document" in str(e) else 1)
        raise PipelineError(f"not valid TOML: {e}", "Fix the syntax (https://toml.io).", path=str(path),
                            line=max(line, 1)) from e
    for key in data:
        if key not in PIPELINE_KEYS:
            raise where.error(f"unknown key '{key}'. Valid at the top: {', '.join(PIPELINE_KEYS)}.",
                              "Steps go in tables: [steps.NAME] with script = ..., args = [...]", key=key)
    pid = data.get("name", path.stem)
    if not isinstance(pid, str) or not NAME.match(pid):
        raise where.error(f"name {pid!r} is not a usable pipeline id.",
                          "Use letters, digits, '-' and '_', starting with a letter.", key="name")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, dict) or not raw_steps:
        raise PipelineError("the pipeline has no steps.", 'Add one: [steps.train] script = "train.py"',
                            path=str(path), line=1)
    steps = {name: _step(name, raw, path, where) for name, raw in raw_steps.items()}
    order = _order(steps, where)
    for step in steps.values():
        _check_references(step, steps, where)
    return Pipeline(pid, path, {name: steps[name] for name in order}, text)


def _step(name: str, raw: Any, path: Path, where: Locator) -> Step:
    if not NAME.match(name):
        raise where.error(f"step name '{name}' can't be used in references.",
                          "Use letters, digits, '-' and '_', starting with a letter.", step=name)
    if not isinstance(raw, dict):
        raise where.error(f"steps.{name} must be a table.", f'Write it as [steps.{name}] with script = "..."', step=name)
    for key in raw:
        if key not in STEP_KEYS:
            raise where.error(f"step {name}: unknown key '{key}'. Valid: {', '.join(STEP_KEYS)}.",
                              "Check the spelling; see trainctl pipeline run --help", step=name, key=key)

    def bad(key: str, what: str, hint: str) -> PipelineError:
        return where.error(f"step {name}: {key} {what}", hint, step=name, key=key)

    script = raw.get("script")
    if not isinstance(script, str) or not script:
        raise bad("script", "is missing or not a string.", f'Add script = "train.py" to [steps.{name}]')
    script_path = (path.parent / script).absolute()
    if not script_path.is_file():
        raise bad("script", f"{script} does not exist (looked for {script_path}).",
                  "Scripts are found relative to the pipeline file's folder.")
    args = raw.get("args", [])
    if not isinstance(args, list):
        raise bad("args", "must be a list.", 'Example: args = ["--lr", "{matrix.lr}"]')
    needs = raw.get("needs", [])
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        raise bad("needs", "must be a list of step names.", 'Example: needs = ["pretrain"]')
    backend = raw.get("backend", "local")
    if backend not in BACKENDS:
        raise bad("backend", f"'{backend}' is unknown. Valid: {', '.join(BACKENDS)}.", 'Example: backend = "local"')
    resources = raw.get("resources", {})
    if not isinstance(resources, dict):
        raise bad("resources", "must be a table.", "Example: resources = {nproc_per_node = 2}")
    if backend == "local":  # what `trainctl local` takes; the cloud backends read more from trainctl.toml
        for key, value in resources.items():
            if key not in LOCAL_RESOURCES:
                raise bad("resources", f"has unknown key '{key}'. Valid here: {', '.join(LOCAL_RESOURCES)}.",
                          "Example: resources = {nproc_per_node = 2, gpus = 1}")
            if not isinstance(value, int) or isinstance(value, bool) or value < LOCAL_RESOURCES[key]:
                raise bad("resources", f"{key} must be a whole number of {LOCAL_RESOURCES[key]} or more, not {value!r}.",
                          "Example: resources = {nproc_per_node = 2, gpus = 1}")
    matrix = raw.get("matrix", {})
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        raise bad("matrix", "must map each key to a non-empty list.", "Example: matrix = {lr = [1e-3, 3e-4]}")
    parallel = raw.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise bad("parallel", f"must be a whole number of 1 or more, not {parallel!r}.", "Example: parallel = 2")
    select = raw.get("select", {})
    if not isinstance(select, dict) or set(select) - {"metric", "mode"}:
        raise bad("select", "takes metric and mode only.", 'Example: select = {metric = "val_loss", mode = "min"}')
    metric = select.get("metric", "val_loss")
    from ..session import metric_mode

    mode = select.get("mode", metric_mode(metric))
    if not isinstance(metric, str) or mode not in ("min", "max"):
        raise bad("select", f"mode must be min or max, not {mode!r}.", 'Example: select = {metric = "accuracy", mode = "max"}')
    max_restarts = raw.get("max_restarts")
    if max_restarts is not None and (not isinstance(max_restarts, int) or isinstance(max_restarts, bool)
                                     or max_restarts < 0):
        raise bad("max_restarts", "must be 0 or more.", "Example: max_restarts = 2")
    return Step(name, script_path, [str(a) for a in args], list(needs), backend, dict(resources),
                {str(k): list(v) for k, v in matrix.items()}, parallel, metric, mode, max_restarts)


def _order(steps: dict[str, Step], where: Locator) -> list[str]:
    """Steps in an order their needs allow (file order where free); unknown needs and cycles are errors."""
    for step in steps.values():
        for need in step.needs:
            if need not in steps:
                raise where.error(f"step {step.name} needs '{need}', which is not a step. Steps: {', '.join(steps)}.",
                                  "Fix the name in needs, or add [steps." + need + "]",
                                  step=step.name, key="needs")
            if need == step.name:
                raise where.error(f"step {step.name} needs itself.", "Remove it from its own needs.",
                                  step=step.name, key="needs")
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = [*path[path.index(name):], name]
            raise where.error(f"steps form a cycle through needs: {' -> '.join(cycle)}.",
                              "A step can only need steps that do not need it back; remove one of these needs.",
                              step=cycle[-2], key="needs")
        state[name] = "visiting"
        for need in steps[name].needs:
            visit(need, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in steps:
        visit(name, [])
    return order


def upstream(steps: dict[str, Step], name: str) -> set[str]:
    """Every step `name` needs, directly or not."""
    out: set[str] = set()
    todo = list(steps[name].needs)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += steps[n].needs
    return out


def _check_references(step: Step, steps: dict[str, Step], where: Locator) -> None:
    before = upstream(steps, step.name)
    valid = ", ".join([*OUTPUTS, "metrics.NAME"])
    for ref in step.references():
        def bad(message: str, hint: str, ref: Reference = ref) -> PipelineError:
            return where.error(f"step {step.name}: {ref.text} {message}", hint, step=step.name, needle=ref.text)

        if ref.step is None:
            if ref.output not in step.matrix:
                raise bad(f"names matrix key '{ref.output}', which this step's matrix does not have.",
                          f"Add it: matrix = {{{ref.output} = [...]}}, or fix the name"
                          + (f" (matrix keys: {', '.join(step.matrix)})" if step.matrix else ""))
            continue
        if ref.step == "":
            raise bad("is not a reference trainctl knows.",
                      "Write {steps.STEP.best_checkpoint}, {steps.STEP.metrics.val_loss}, {matrix.KEY}, ...")
        if ref.step not in steps:
            raise bad(f"names step '{ref.step}', which does not exist. Steps: {', '.join(steps)}.",
                      "Fix the step name.")
        if ref.step == step.name:
            raise bad("refers to the step's own outputs, which do not exist before it runs.",
                      "Refer to a step it needs.")
        if ref.step not in before:
            raise bad(f"uses step {ref.step}'s outputs, but {step.name} does not need {ref.step}, "
                      "so it may run first.", f'Add it: needs = [{", ".join(repr(n) for n in [*step.needs, ref.step])}]'
                      .replace("'", '"'))
        output = ref.output
        if output.startswith("metrics."):
            if not output[len("metrics."):] or "." in output[len("metrics."):]:
                raise bad("names no metric.", "Example: {steps.pretrain.metrics.val_loss}")
            continue
        if output not in OUTPUTS:
            raise bad(f"asks for '{output}', which a step does not produce. Valid: {valid}.",
                      "Example: {steps.pretrain.best_checkpoint}")
