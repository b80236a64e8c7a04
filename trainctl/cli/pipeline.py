"""`trainctl pipeline`: run, follow and list multi-step pipelines (pipelines/engine.py does the work)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import click

from .groups import SuggestingGroup

PIPELINE_EPILOG = """\b
pipeline.toml:
  name = "demo"                          # the pipeline's id (default: the file name)
  [steps.pretrain]
  script = "pretrain.py"                 # relative to the pipeline file
  args = ["--steps", "60"]
  [steps.finetune]
  script = "finetune.py"
  needs = ["pretrain"]
  args = ["--init-from", "{steps.pretrain.best_checkpoint}", "--lr", "{matrix.lr}"]
  matrix = {lr = [1e-3, 3e-4]}           # one session per value (combination)
  parallel = 2                           # how many run at once
  select = {metric = "val_loss", mode = "min"}   # what "best" means (default val_loss, min)
  [steps.evaluate]
  script = "evaluate.py"
  needs = ["finetune"]
  args = ["--checkpoint", "{steps.finetune.best.checkpoint}"]

\b
Step keys: script, args, needs, backend, resources, matrix, parallel, select, max_restarts.
References: {steps.X.best_checkpoint}, {steps.X.last_checkpoint}, {steps.X.session_dir},
{steps.X.session_id}, {steps.X.metrics.NAME}, {steps.X.best.checkpoint} (the best session of
a matrix step by its select metric), {matrix.KEY}."""


@click.group("pipeline", cls=SuggestingGroup)
def pipeline() -> None:
    """Multi-step pipelines: each step a session, starting from earlier steps' checkpoints."""


class _Printer:
    """Status lines, and each session's output with its step in front of every line."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.lock = threading.Lock()

    def line(self, text: str, *, err: bool = True) -> None:
        with self.lock:
            try:
                click.echo(text, err=err)
            except (OSError, ValueError):
                pass


def _events(printer: _Printer) -> Any:
    from ..launcher.supervisor import EngineEvents
    from ..pipelines.engine import PipelineEvents

    class SessionOutput(EngineEvents):
        def __init__(self, label: str) -> None:
            self.label = label
            self.partial = {"stdout": b"", "stderr": b""}

        def message(self, text: str) -> None:
            printer.line(f"[{self.label}] [trainctl] {text}")

        def output(self, chunk: Any) -> None:
            if printer.quiet:
                return
            data = self.partial[chunk.stream] + chunk.data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            *lines, self.partial[chunk.stream] = data.split(b"\n")
            for line in lines:
                printer.line(f"[{self.label}] {line.decode('utf-8', 'replace')}", err=chunk.stream == "stderr")

        def attempts_ended(self, status: Any) -> None:
            for stream, rest in self.partial.items():
                if rest and not printer.quiet:
                    printer.line(f"[{self.label}] {rest.decode('utf-8', 'replace')}", err=stream == "stderr")
                self.partial[stream] = b""

    class Events(PipelineEvents):
        def message(self, text: str) -> None:
            printer.line(f"[pipeline] {text}")

        def session_events(self, step: str, key: str) -> EngineEvents:
            return SessionOutput(step + (f"[{key}]" if key else ""))

    return Events()


@pipeline.command("run", epilog=PIPELINE_EPILOG)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--from", "from_step", metavar="STEP", default=None,
              help="Run STEP and every step after it (that needs it) again, even if up to date.")
@click.option("--only", metavar="STEP", default=None,
              help="Run only STEP (skipped when up to date; add --from STEP to force it). "
                   "The steps it needs must have completed.")
@click.option("--quiet", "-q", is_flag=True, help="No script output; status lines only.")
def pipeline_run(file: Path, from_step: str | None, only: str | None, quiet: bool) -> None:
    """Run the pipeline in FILE: each step as a recorded session, in the order `needs` gives.

    Re-running skips steps that completed with the same script, arguments and inputs, and
    continues a step that failed or was stopped from its own newest verified checkpoint.
    """
    from ..config import load as load_config
    from ..pipelines import spec
    from ..pipelines.engine import PipelineRun

    pipeline_def = spec.load(file)
    cfg = load_config()
    printer = _Printer(quiet)
    engine = PipelineRun(pipeline_def, cfg, from_step=from_step, only=only, events=_events(printer))
    printer.line(f"[pipeline] {pipeline_def.id}: {len(pipeline_def.steps)} step(s): "
                 + " -> ".join(pipeline_def.steps))
    result = engine.run()
    click.echo("")
    _show_status(result.record, cfg.state_dir)
    sys.exit(result.exit_code)


def _show_status(record: dict[str, Any], state_dir: Path) -> None:
    from ..formatting import format_duration, format_value
    from ..pipelines.engine import effective_pipeline_status, step_statuses
    from .render import table

    status = effective_pipeline_status(record)
    click.echo(f"pipeline {record['id']}  {status}  ({record.get('file')})")
    rows = []
    for s in step_statuses(record, state_dir):
        best = f"{s.metric} {format_value(s.value)}" if s.metric and s.value is not None else "-"
        if s.best_instance:
            best += f" [{s.best_instance}]"
        rows.append([s.name, s.state, str(s.sessions), format_duration(s.duration_s) if s.duration_s is not None
                     else "-", best, _short_path(s.checkpoint)])
    click.echo(table(["STEP", "STATE", "SESSIONS", "DURATION", "BEST", "CHECKPOINT"], rows))
    for name, step in (record.get("steps") or {}).items():
        if step.get("state") != "failed":
            continue
        if step.get("error"):
            click.echo(f"step {name}: {step['error']}")
        for key, entry in (step.get("instances") or {}).items():
            if entry.get("state") == "failed":
                why = entry.get("error") or (f"session {entry['session']} failed: trainctl sessions show {entry['session']}"
                                             if entry.get("session") else "failed")
                click.echo(f"step {name}{f'[{key}]' if key else ''}: {why}")
    if status in ("failed", "interrupted"):
        where = f" at step {record['failed_step']}" if record.get("failed_step") else ""
        click.echo(f"\n{status}{where}; continue (done steps are skipped, the stopped one resumes from its "
                   f"checkpoint):\n  {record.get('command') or 'trainctl pipeline run FILE'}")


def _short_path(path: str | None) -> str:
    if not path:
        return "-"
    try:
        rel = Path(path).resolve().relative_to(Path.cwd().resolve())
        return str(rel)
    except ValueError:
        return path


@pipeline.command("status")
@click.argument("pipeline_id", metavar="[ID]", required=False)
@click.option("--json", "as_json", is_flag=True, help="The pipeline record as JSON.")
def pipeline_status(pipeline_id: str | None, as_json: bool) -> None:
    """Each step's state, duration, best metric and checkpoint (default: the latest pipeline)."""
    import json

    from ..config import load as load_config
    from ..errors import UsageError
    from ..pipelines.engine import effective_pipeline_status, list_records, read_record

    cfg = load_config()
    if pipeline_id is None:
        records = list_records(cfg.state_dir)
        if not records:
            raise UsageError("no pipelines have run in this project.", "Start one with: trainctl pipeline run pipeline.toml")
        record = records[0]
    else:
        record = read_record(cfg.state_dir, pipeline_id)
        if record is None:
            known = [r["id"] for r in list_records(cfg.state_dir)]
            raise UsageError(f"no pipeline '{pipeline_id}' in this project."
                             + (f" Known: {', '.join(known)}." if known else ""),
                             "See them with: trainctl pipeline list")
    if as_json:
        click.echo(json.dumps({**record, "status": effective_pipeline_status(record)}, indent=2, default=str))
        return
    _show_status(record, cfg.state_dir)


@pipeline.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
def pipeline_list(as_json: bool) -> None:
    """Every pipeline of this project, most recently run first."""
    import json
    import time

    from ..config import load as load_config
    from ..pipelines.engine import effective_pipeline_status, list_records
    from .render import age, table

    cfg = load_config()
    records = list_records(cfg.state_dir)
    if as_json:
        click.echo(json.dumps([{**r, "status": effective_pipeline_status(r)} for r in records], indent=2, default=str))
        return
    if not records:
        click.echo("No pipelines yet. Start one with: trainctl pipeline run pipeline.toml")
        return
    now = time.time()
    rows = []
    for r in records:
        steps = r.get("steps") or {}
        order = r.get("steps_order") or list(steps)
        done = sum(1 for n in order if (steps.get(n) or {}).get("state") == "completed")
        rows.append([r["id"], effective_pipeline_status(r), f"{done}/{len(order)}", age(r.get("updated_at"), now),
                     _short_path(r.get("file"))])
    click.echo(table(["ID", "STATUS", "STEPS DONE", "UPDATED", "FILE"], rows))
