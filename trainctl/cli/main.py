"""The `trainctl` command line: click commands only (parse, call, print).

Subcommands live in their own modules and are imported on first use, so `trainctl --help`
stays at the cost of importing click.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from .. import __version__
from .groups import SuggestingGroup

# command name -> "module:attribute"; each module imports its heavy parts inside functions.
COMMANDS: dict[str, str] = {
    "init": "trainctl.cli.init:init_cmd",
    "local": "trainctl.cli.local:local_cmd",
    "sessions": "trainctl.cli.sessions:sessions",
    "checkpoint": "trainctl.cli.checkpoint:checkpoint",
    "pipeline": "trainctl.cli.pipeline:pipeline",
    "check": "trainctl.cli.check:check",
    "monitor": "trainctl.cli.monitor:monitor",
    "tensorboard": "trainctl.cli.tensorboard:tensorboard",
    "agent": "trainctl.cli.agent:agent_cmd",  # internal: a machine's boot script starts it
    "aws": "trainctl.cli.aws:aws",
    "runpod": "trainctl.cli.runpod:runpod",
}

SHORT_HELP: dict[str, str] = {
    "init": "Write a commented trainctl.toml for this project (--template: a train.py too).",
    "local": "Run a training script here, as a recorded session.",
    "sessions": "List, show, follow, stop, delete, compare and plot recorded sessions.",
    "checkpoint": "List, inspect, verify, clean up and resume checkpoints.",
    "pipeline": "Run multi-step pipelines (pretrain -> finetune sweep -> evaluate), resumable.",
    "check": "Run the pre-flight checks on a script without starting it.",
    "monitor": "Show where a run stands: progress, ETA, trends, warnings.",
    "tensorboard": "Start TensorBoard over recorded sessions.",
    "aws": "Run on EC2: set up once, launch, follow, resume, stop, costs, leaks.",
    "runpod": "Train on RunPod pods: plan, launch, follow, recover, stop, pay.",
}


class LazyGroup(SuggestingGroup):
    """A group whose subcommands are imported only when invoked (or their help is asked)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("trainctl"):
                return None  # a command not built in this version
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # short help from a table, so `trainctl --help` imports no subcommand module
        rows = [(name, SHORT_HELP[name]) for name in COMMANDS if name in SHORT_HELP]  # the rest are internal
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="trainctl")
def cli() -> None:
    """trainctl: run PyTorch training scripts safely anywhere.

    Every run is a session: its output, metrics and checkpoints are recorded, a crashed or
    preempted run resumes from its last verified checkpoint, and checkpoints can be listed,
    verified and cleaned up without loading them.
    """


def main(argv: list[str] | None = None) -> None:
    from .errors import run_cli

    warnings.showwarning = _show_warning

    sys.exit(run_cli(cli, argv))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """trainctl's own warnings as one line ('warning: ...'), not Python's file:line + source."""
    from ..errors import TrainctlWarning

    if issubclass(category, TrainctlWarning):
        click.secho(f"warning: {message}", err=True, fg="yellow")
    else:
        warnings._showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))  # type: ignore[attr-defined]
