"""`trainctl init`: a commented trainctl.toml for this project."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("init")
@click.option("--force", is_flag=True, help="Overwrite an existing trainctl.toml.")
def init_cmd(force: bool) -> None:
    """Write a commented trainctl.toml (every key at its default) in this folder."""
    from ..config import CONFIG_FILE, template
    from ..errors import UsageError

    path = Path.cwd() / CONFIG_FILE
    if path.exists() and not force:
        raise UsageError(f"{path} already exists.", "Keep it, or overwrite it with: trainctl init --force")
    from ..config import find_project_root

    outer_root, outer = find_project_root(Path.cwd().parent)
    path.write_text(template(), encoding="utf-8")
    click.echo(f"Wrote {path}.")
    if outer is not None:
        click.secho(f"note: {outer} also configures the folder above; runs started here now belong "
                    f"to this new project, not to {outer_root}.", fg="yellow", err=True)
    gitignore = Path.cwd() / ".gitignore"
    if not gitignore.exists() or ".trainctl" not in gitignore.read_text(errors="replace"):
        click.echo("Consider adding '.trainctl/' and 'checkpoints/' to .gitignore.")
    click.echo("Next: trainctl local train.py [ARGS]...")
