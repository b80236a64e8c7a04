"""Run a pipeline: each step's sessions through the same engine as `trainctl local`
(launcher.supervisor), skipped when already done with the same script, arguments and inputs,
resumed from their own newest verified checkpoint when they ended early. The record of every
pipeline is `<state_dir>/pipelines/<id>.json`, rewritten atomically after every change."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EXIT_INTERRUPTED, TrainctlError, UsageError
from ..session import Session, SessionStore, State, effective_status
from .spec import Pipeline, Step, parse_references

RECORD_VERSION = 1


# --- the record ---------------------------------------------------------------------------------

def pipelines_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "pipelines"


def record_path(state_dir: Path, pipeline_id: str) -> Path:
    return pipelines_dir(state_dir) / f"{pipeline_id}.json"


def read_record(state_dir: Path, pipeline_id: str) -> dict[str, Any] | None:
    try:
        data = json.loads(record_path(state_dir, pipeline_id).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TrainctlError(f"pipeline record {record_path(state_dir, pipeline_id)} is unreadable: {e}",
                            "Move it away to start the pipeline's record afresh.") from e
    return data if isinstance(data, dict) else None


def list_records(state_dir: Path) -> list[dict[str, Any]]:
    """Every pipeline record, most recently updated first."""
    out = []
    for path in sorted(pipelines_dir(state_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out.append(data)
    return sorted(out, key=lambda r: r.get("updated_at") or 0, reverse=True)


def effective_pipeline_status(record: dict[str, Any]) -> str:
    """The recorded status, or 'interrupted' for a run whose process is gone without an end."""
    from .. import sysinfo

    status = record.get("status") or "pending"
    if status != "running":
        return status
    runner = record.get("runner") or {}
    if runner.get("host") not in (None, sysinfo.host()):
        return status
    if runner.get("pid") and sysinfo.pid_alive(runner["pid"], runner.get("start_ticks")):
        return status
    return "interrupted"


def _write_record(state_dir: Path, record: dict[str, Any]) -> None:
    from ..fsutil import atomic_write_json

    record["updated_at"] = time.time()
    path = record_path(state_dir, record["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)


# --- what a step produced -------------------------------------------------------------------------

def session_outputs(session: Session, data: dict[str, Any], step: Step) -> dict[str, Any]:
    """What {steps.X.<output>} gives for one finished session: its best checkpoint by the step's
    select metric (the newest where none recorded the metric), last checkpoint, session folder,
    and metrics (best value of each, else its last)."""
    from .. import checkpoint

    summary = data.get("summary") or {}
    metrics = {k: v for k, v in (summary.get("last") or {}).items()}
    metrics.update({k: b.get("value") for k, b in (summary.get("best") or {}).items() if isinstance(b, dict)})
    location = session.checkpoint_location(data)
    infos = [i for i in checkpoint.scan(location) if i.status == "valid"] if location and Path(location).is_dir() else []
    scored = [i for i in infos if isinstance(i.metrics.get(step.select_metric), (int, float))]
    best = None
    if scored:
        pick = min if step.select_mode == "min" else max
        best = pick(scored, key=lambda i: i.metrics[step.select_metric])
    elif infos:
        best = infos[0]  # newest first
    last = summary.get("last_checkpoint") or (str(infos[0].path) if infos else None)
    best_path = str(best.path) if best is not None else None
    value = metrics.get(step.select_metric)
    if value is None and best is not None:
        value = best.metrics.get(step.select_metric)
    return {"session_id": session.id, "session_dir": str(session.dir), "best_checkpoint": best_path,
            "checkpoint": best_path, "last_checkpoint": last, "metrics": metrics,
            "select": {"metric": step.select_metric, "mode": step.select_mode, "value": value}}


def best_instance(step: Step, outputs: dict[str, dict[str, Any]]) -> str | None:
    """The instance (matrix combination) whose select metric is best; the first without any."""
    if not outputs:
        return None
    scored = {k: o["select"]["value"] for k, o in outputs.items() if isinstance(o["select"].get("value"), (int, float))}
    if not scored:
        return next(iter(outputs))
    pick = min if step.select_mode == "min" else max
    return pick(scored, key=lambda k: scored[k])


def resolve_output(outputs: dict[str, Any], name: str) -> Any:
    if name.startswith("metrics."):
        return (outputs.get("metrics") or {}).get(name[len("metrics."):])
    return outputs.get(name)


# --- events -------------------------------------------------------------------------------------

class PipelineEvents:
    """What the pipeline engine tells whoever watches it (the CLI prints it)."""

    def message(self, text: str) -> None:
        """A status line."""

    def session_events(self, step: str, key: str) -> Any:
        """The EngineEvents for one step session (its output, restarts)."""
        from ..launcher.supervisor import EngineEvents

        return EngineEvents()


@dataclass
class Instance:
    """One session-to-be of a step: a matrix combination with its arguments resolved."""

    step: Step
    key: str
    combo: dict[str, Any]
    args: list[str]
    fingerprint: str
    resume: str | None = None
    action: str = "run"  # run | resume | skip


@dataclass
class Result:
    status: str  # completed | failed | interrupted
    exit_code: int
    failed_step: str | None = None
    message: str | None = None
    record: dict[str, Any] = field(default_factory=dict)


def instance_key(combo: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in combo.items())


def session_name(pipeline_id: str, step: str, key: str) -> str:
    return f"{pipeline_id}.{step}" + (f"[{key}]" if key else "")


class PipelineRun:
    """One `trainctl pipeline run`: the steps in order, their sessions, the record."""

    def __init__(self, pipeline: Pipeline, cfg: Any, *, from_step: str | None = None,
                 only: str | None = None, events: PipelineEvents | None = None) -> None:
        for flag, name in (("--from", from_step), ("--only", only)):
            if name is not None and name not in pipeline.steps:
                raise UsageError(f"{flag} {name}: no such step in {pipeline.path}. Steps: {', '.join(pipeline.steps)}.",
                                 f"Example: trainctl pipeline run {pipeline.path} {flag} {next(iter(pipeline.steps))}")
        self.pipeline = pipeline
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.store = SessionStore(self.state_dir)
        self.forced = pipeline.dependents(from_step) if from_step else set()
        self.only = only
        self.events = events or PipelineEvents()
        self.stop_signal: int | None = None
        self._active: list[Any] = []  # supervisors running now
        self._lock = threading.Lock()  # the record and _active, shared with the step threads
        self.record: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------- record
    def _load_record(self) -> dict[str, Any]:
        from .. import sysinfo

        pipeline = self.pipeline
        record = read_record(self.state_dir, pipeline.id)
        file = str(pipeline.path.resolve())
        if record is not None and record.get("file") not in (None, file):
            raise UsageError(f"pipeline id '{pipeline.id}' is already used by {record.get('file')}.",
                             f'Give this one another id: name = "..." at the top of {pipeline.path}')
        now = time.time()
        record = record or {"v": RECORD_VERSION, "id": pipeline.id, "file": file, "created_at": now, "steps": {}}
        record.update(status="running", started_at=now, ended_at=None, steps_order=list(pipeline.steps),
                      runner={"pid": os.getpid(), "start_ticks": sysinfo.process_start_ticks(os.getpid()),
                              "host": sysinfo.host()},
                      command=self._continue_command())
        record.setdefault("runs", 0)
        record["runs"] += 1
        return record

    def _save(self) -> None:
        with self._lock:
            _write_record(self.state_dir, self.record)

    def _continue_command(self) -> str:
        import shlex

        path = self.pipeline.path
        try:
            shown = os.path.relpath(path)
        except ValueError:
            shown = str(path)
        return f"trainctl pipeline run {shlex.quote(shown)}"

    # ---------------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum
        for supervisor in list(self._active):
            # handled as `trainctl local` handles it: forwarded to the script (an emergency
            # checkpoint); a second signal ends it at once
            supervisor.request_stop(signum)

    def _install_signals(self) -> dict[int, Any]:
        from ..launcher.supervisor import install_stop_signals

        return install_stop_signals(self._on_signal)

    # ---------------------------------------------------------------------------------- the run
    def run(self) -> Result:
        from filelock import FileLock, Timeout

        pipelines_dir(self.state_dir).mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(pipelines_dir(self.state_dir) / f"{self.pipeline.id}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UsageError(f"pipeline {self.pipeline.id} is already running in another process.",
                             f"Follow it with: trainctl pipeline status {self.pipeline.id}") from None
        previous = self._install_signals()
        try:
            self.record = self._load_record()
            self._save()
            result = self._steps()
            self.record.update(status=result.status, ended_at=time.time(), failed_step=result.failed_step,
                               message=result.message)
            self._save()
            result.record = self.record
            return result
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            lock.release()

    def _steps(self) -> Result:
        for name, step in self.pipeline.steps.items():
            if self.only is not None and name != self.only:
                continue
            if self.stop_signal is not None:
                return Result("interrupted", EXIT_INTERRUPTED, name, f"stopped before step {name}")
            try:
                instances = self._plan_step(step)
            except TrainctlError as e:
                self._step_record(name).update(state="failed", error=e.message)
                self._save()
                self.events.message(f"step {name}: {e.message}")
                return Result("failed", 1, name, e.message)
            state = self._run_step(step, instances)
            if state != "completed":
                code = EXIT_INTERRUPTED if state == "interrupted" else 1
                return Result(state, code, name, f"step {name} {state}")
        return Result("completed", 0)

    def _step_record(self, name: str) -> dict[str, Any]:
        return self.record["steps"].setdefault(name, {"state": "pending", "instances": {}})

    def _upstream_outputs(self, step: Step) -> dict[str, dict[str, Any]]:
        """The outputs of every step `step` needs or refers to; each must have completed."""
        out = {}
        for name in [*step.needs, *(r.step for r in step.references() if r.step)]:
            if name not in out:
                rec = self.record["steps"].get(name) or {}
                if rec.get("state") != "completed" or "outputs" not in rec:
                    raise UsageError(f"step {step.name} needs the outputs of step {name}, which has not completed.",
                                     f"Run it first: {self._continue_command()}"
                                     + (f" --only {name}" if self.only else ""))
                out[name] = rec["outputs"]
        return out

    def _plan_step(self, step: Step) -> list[Instance]:
        """The step's sessions with arguments resolved, and for each whether it runs, resumes or is done."""
        from ..checkpoint import file_sha256

        upstream = self._upstream_outputs(step)
        digest = file_sha256(step.script)
        rec = self._step_record(step.name)
        instances = []
        for combo in step.combinations():
            args = self._resolve_args(step, combo, upstream)
            key = instance_key(combo)
            fingerprint = hashlib.sha256(json.dumps(
                {"script": digest, "args": args, "backend": step.backend, "resources": step.resources},
                sort_keys=True, default=str).encode()).hexdigest()[:16]
            instance = Instance(step, key, combo, args, fingerprint)
            before = (rec.get("instances") or {}).get(key)
            if step.name not in self.forced and before and before.get("fingerprint") == fingerprint:
                self._decide(instance, before)
            instances.append(instance)
        return instances

    def _resolve_args(self, step: Step, combo: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> list[str]:
        out = []
        used: set[str] = set()
        for arg in step.args:
            for ref in parse_references(arg):
                if ref.step is None:
                    value: Any = combo[ref.output]
                    used.add(ref.output)
                else:
                    value = resolve_output(upstream[ref.step], ref.output)
                    if value is None:
                        what = "checkpoint" if "checkpoint" in ref.output else ref.output
                        raise TrainctlError(f"{ref.text}: step {ref.step} recorded no {what}.",
                                            f"Make {ref.step} write it (run.save_checkpoint / run.log), then: "
                                            f"{self._continue_command()} --from {ref.step}")
                arg = arg.replace(ref.text, str(value))
            out.append(arg)
        for k, v in combo.items():  # a matrix key the args don't name goes in as --KEY VALUE
            if k not in used:
                out += [f"--{k}", str(v)]
        return out

    def _decide(self, instance: Instance, before: dict[str, Any]) -> None:
        """Same script, arguments and inputs as recorded: done already, or resumed from its own
        sessions' newest verified checkpoint."""
        from .. import checkpoint

        sessions = [s for s in before.get("sessions") or [] if (self.store.sessions_dir / s).is_dir()]
        if not sessions:
            return
        latest = Session(self.store.sessions_dir / sessions[-1])
        try:
            data = latest.read()
        except TrainctlError:
            return
        status = effective_status(data)
        if status is State.COMPLETED:
            instance.action = "skip"
            return
        if status in (State.RUNNING, State.PENDING):
            raise UsageError(f"step {instance.step.name}'s session {latest.id} is still running.",
                             f"Wait for it, or stop it: trainctl sessions stop {latest.id}")
        for sid in reversed(sessions):
            s = Session(self.store.sessions_dir / sid)
            try:
                location = s.checkpoint_location()
            except TrainctlError:
                continue
            if not location or not Path(location).is_dir():
                continue
            found, skipped = checkpoint.newest_valid(location, session_id=sid)
            for path, why in skipped:
                self.events.message(f"step {instance.step.name}: skipping checkpoint {path}: {why}")
            if found is not None:
                instance.action, instance.resume = "resume", str(found)
                return

    def _run_step(self, step: Step, instances: list[Instance]) -> str:
        rec = self._step_record(step.name)
        todo = [i for i in instances if i.action != "skip"]
        label = step.name
        if not todo and rec.get("state") == "completed" and rec.get("outputs"):
            self.events.message(f"step {label}: up to date ({len(instances)} session(s) with the same script, "
                                "arguments and inputs); skipped")
            return "completed"
        rec.update(state="running", started_at=time.time(), ended_at=None, error=None)
        known = rec.setdefault("instances", {})
        for i in instances:
            entry = known.setdefault(i.key, {"combo": i.combo, "sessions": []})
            if i.action != "skip":
                entry.update(fingerprint=i.fingerprint, args=i.args, state="pending")
        for stale in set(known) - {i.key for i in instances}:
            del known[stale]  # the matrix changed: combinations no longer in it are not this step's
        self._save()
        skipped = len(instances) - len(todo)
        self.events.message(f"step {label}: {len(todo)} session(s) to run"
                            + (f", {skipped} up to date" if skipped else "")
                            + (f", {step.parallel} at a time" if len(todo) > 1 else ""))
        states: dict[str, str] = {i.key: "completed" for i in instances if i.action == "skip"}
        with ThreadPoolExecutor(max_workers=step.parallel, thread_name_prefix=f"trainctl-step-{step.name}") as pool:
            pending: dict[Future[str], Instance] = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < step.parallel and self.stop_signal is None:
                    i = queue.pop(0)
                    pending[pool.submit(self._run_instance, i)] = i
                if self.stop_signal is not None:
                    for i in queue:
                        states[i.key] = "interrupted"
                    queue = []
                if not pending:
                    break
                done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    try:
                        states[i.key] = future.result()
                    except Exception as e:  # one session that could not start must not end the others
                        states[i.key] = "failed"
                        why = e.message if isinstance(e, TrainctlError) else f"{type(e).__name__}: {e}"
                        self.events.message(f"step {label}{_shown(i.key)}: {why}")
                        with self._lock:
                            known[i.key].update(state="failed", error=why)
        outputs = self._step_outputs(step, instances)
        failed = [k for k, s in states.items() if s != "completed"]
        state = "completed"
        if failed:
            state = "interrupted" if self.stop_signal is not None or all(
                states[k] in ("interrupted", "killed", "stopped") for k in failed) else "failed"
        rec.update(state=state, ended_at=time.time())
        if state == "completed":
            rec.update(outputs=outputs[0], best_instance=outputs[1])
        else:
            rec.pop("outputs", None)
        self._save()
        return state

    def _run_instance(self, i: Instance) -> str:
        from ..backends.base import RunSpec
        from ..launcher.supervisor import Supervisor, restart_policy

        step = i.step
        policy = restart_policy(self.cfg, max_restarts=step.max_restarts, restart_on=None,
                                restart_delay_s=None, grace_period_s=None)
        spec = RunSpec(script=step.script, args=tuple(i.args), resources=dict(step.resources),
                       resume=i.resume, name=session_name(self.pipeline.id, step.name, i.key))
        supervisor = Supervisor(spec, policy, self.cfg, backend=step.backend,
                                events=self.events.session_events(step.name, i.key))
        session = supervisor.prepare(preflight=False)
        session.update(pipeline={"id": self.pipeline.id, "step": step.name, "instance": i.key, "combo": i.combo})
        with self._lock:
            entry = self.record["steps"][step.name]["instances"][i.key]
            entry["sessions"] = [*entry.get("sessions", []), session.id]
            entry.update(state="running", session=session.id, resumed_from=i.resume)
            self._active.append(supervisor)
        self._save()
        verb = f"resuming from {i.resume}" if i.resume else "starting"
        self.events.message(f"step {step.name}{_shown(i.key)}: session {session.id} {verb}")
        if self.stop_signal is not None:  # a signal came while this one was being set up
            supervisor.request_stop(self.stop_signal)
        try:
            result = supervisor.run()
        finally:
            with self._lock:
                self._active.remove(supervisor)
        status = str(result.outcome.status)
        state = "completed" if status == "completed" else (
            "interrupted" if status in ("killed", "stopped") else status)
        with self._lock:
            entry.update(state=state, ended_at=time.time())
        self._save()
        self.events.message(f"step {step.name}{_shown(i.key)}: session {session.id} {status}")
        return state

    def _step_outputs(self, step: Step, instances: list[Instance]) -> tuple[dict[str, Any], str | None]:
        """The step's outputs: those of its best session by the select metric."""
        rec = self._step_record(step.name)
        per: dict[str, dict[str, Any]] = {}
        for i in instances:
            entry = rec["instances"].get(i.key) or {}
            sid = (entry.get("sessions") or [None])[-1]
            if sid is None or not (self.store.sessions_dir / sid).is_dir():
                continue
            session = Session(self.store.sessions_dir / sid)
            try:
                data = session.read()
            except TrainctlError:
                continue
            if effective_status(data) is not State.COMPLETED:
                continue
            entry["outputs"] = per[i.key] = session_outputs(session, data, step)
        best = best_instance(step, per)
        return (per[best] if best is not None else {}), best


def _shown(key: str) -> str:
    return f"[{key}]" if key else ""


# --- status -------------------------------------------------------------------------------------

@dataclass
class StepStatus:
    name: str
    state: str
    sessions: int
    duration_s: float | None
    metric: str | None
    value: Any
    checkpoint: str | None
    best_instance: str | None


def step_statuses(record: dict[str, Any], state_dir: Path) -> list[StepStatus]:
    """Each step of a record: its state (a running one whose runner is gone: interrupted),
    compute time of all its sessions, best metric and checkpoint."""
    store = SessionStore(state_dir)
    gone = effective_pipeline_status(record) != "running"
    out = []
    steps = record.get("steps") or {}
    for name in record.get("steps_order") or list(steps):
        rec = steps.get(name) or {}
        state = rec.get("state") or "pending"
        if state == "running" and gone:
            state = "interrupted"
        total = 0.0
        count = 0
        for entry in (rec.get("instances") or {}).values():
            for sid in entry.get("sessions") or []:
                count += 1
                try:
                    data = Session(store.sessions_dir / sid).read()
                except (TrainctlError, OSError):
                    continue
                start = data.get("started_at") or data.get("created_at")
                end = data.get("ended_at") or (time.time() if effective_status(data) is State.RUNNING else None)
                if start and end:
                    total += end - start
        outputs = rec.get("outputs") or {}
        select = outputs.get("select") or {}
        out.append(StepStatus(name, state, count, total if count else None, select.get("metric"),
                              select.get("value"), outputs.get("best_checkpoint"), rec.get("best_instance")))
    return out
