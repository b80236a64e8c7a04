"""`trainctl check SCRIPT [ARGS]...`: the pre-flight checks alone, without starting anything."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("check", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("script", type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--resume", default=None, metavar="PATH",
              help="Check as if resuming from PATH (the script must accept the resume flag).")
@click.option("--gpus", type=click.IntRange(min=0), default=None,
              help="GPUs the script needs (default: `gpus` in trainctl.toml).")
@click.option("--python", "python", default=None, metavar="PATH",
              help="Interpreter that will run the script (default: this one).")
@click.option("--force", is_flag=True, help="With --resume: check as `trainctl local --force` would run.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def check(script: Path, args: tuple[str, ...], resume: str | None, gpus: int | None,
          python: str | None, force: bool, as_json: bool) -> None:
    """Run the pre-flight checks on SCRIPT [ARGS]... and exit 0, or 2 when one fails.

    Checks that the script exists and compiles, that its imports are installed, that it takes
    the resume flag (with --resume), that paths among ARGS exist, that the checkpoint and state
    folders are writable with enough free space, and that requested GPUs are visible.
    Options go before SCRIPT; everything after it is the script's own.
    """
    from .. import config as config_mod
    from ..errors import EXIT_USAGE
    from ..launcher.preflight import run_preflight

    cfg = config_mod.load()
    report = run_preflight(script, list(args), cfg, resume=resume, gpus=gpus,
                           python=python or sys.executable, force=force)
    failures = report.failures
    if as_json:
        import json
        from dataclasses import asdict

        click.echo(json.dumps({"ok": report.ok, "results": [asdict(r) for r in report.results]}, indent=2))
        sys.exit(EXIT_USAGE if failures else 0)
    for line in report.lines():
        click.echo(line)
    warnings = sum(r.status == "warn" for r in report.results)
    if failures:
        click.secho(f"pre-flight: {len(failures)} of {len(report.results)} checks failed; "
                    f"first: {failures[0].name}: {failures[0].message}", fg="red", err=True)
        sys.exit(EXIT_USAGE)
    tail = f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else ""
    click.secho(f"pre-flight: all {len(report.results)} checks passed{tail}", fg="green")
