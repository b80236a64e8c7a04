"""`trainctl init`: a commented trainctl.toml for this project."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("init")
@click.argument("script", required=False, type=click.Path(path_type=Path))
@click.option("--template", "template_name", metavar="plain|lightning|hf|list", default=None,
              help="Also write a runnable, commented training script (SCRIPT, default train.py) that "
                   "uses trainctl fully; 'list' shows the templates.")
@click.option("--force", is_flag=True, help="Overwrite an existing trainctl.toml (with --template: SCRIPT).")
def init_cmd(script: Path | None, template_name: str | None, force: bool) -> None:
    """Write a commented trainctl.toml (every key at its default) in this folder.

    With SCRIPT (default: ./train.py when there is one), the resume_flag is the one its source
    shows it takes: --resume_from_checkpoint (Hugging Face), --init_from=resume (nanoGPT),
    --ckpt_path, ... so restarts hand the checkpoint over the way the script expects.

    With --template, SCRIPT is the file to write (default train.py): a training script with
    tracked model/optimizer/scheduler, resume, metrics, periodic and emergency checkpoints,
    seeding and a synthetic dataset; trainctl.toml is written too when the folder has none.
    """
    from ..config import CONFIG_FILE, SCHEMA, template
    from ..errors import ScriptNotFoundError, UsageError

    if template_name is not None:
        _write_template(template_name, script, force)
        return

    path = Path.cwd() / CONFIG_FILE
    if path.exists() and not force:
        raise UsageError(f"{path} already exists.", "Keep it, or overwrite it with: trainctl init --force")
    if script is not None and not script.is_file():
        raise ScriptNotFoundError(f"script {script} does not exist or is not a file.",
                                  "Name the training script, e.g. trainctl init train.py", path=str(script))
    if script is None and (Path.cwd() / "train.py").is_file():
        script = Path("train.py")
    text = template()
    note = None
    if script is not None:
        from ..launcher.script_conventions import detect_resume_conventions

        found = detect_resume_conventions(script.read_text(encoding="utf-8", errors="replace"))
        default = SCHEMA[""]["resume_flag"][1]
        if found:
            c = found[0]
            where = f"{script} line {c.line}" if c.line else str(script)
            note = f"resume_flag = \"{c.flag}\": {script} {c.why} ({where})" + (
                "" if c.takes_path else "; the flag takes no path: the script reads its own checkpoint, "
                "and TRAIN_OPS_RESUME names it")
            text = text.replace(f'resume_flag = "{default}"\n',
                                f'# recognised in {where}: it {c.why}\nresume_flag = "{c.flag}"\n', 1)
        else:
            note = (f"{script} shows no resume flag trainctl recognises: set resume_flag in {CONFIG_FILE} "
                    "to the flag it takes a checkpoint path with, so restarts can resume it")
    from ..config import find_project_root

    outer_root, outer = find_project_root(Path.cwd().parent)
    path.write_text(text, encoding="utf-8")
    click.echo(f"Wrote {path}.")
    if note:
        click.echo(note)
    if outer is not None:
        click.secho(f"note: {outer} also configures the folder above; runs started here now belong "
                    f"to this new project, not to {outer_root}.", fg="yellow", err=True)
    gitignore = Path.cwd() / ".gitignore"
    if not gitignore.exists() or ".trainctl" not in gitignore.read_text(errors="replace"):
        click.echo("Consider adding '.trainctl/' and 'checkpoints/' to .gitignore.")
    click.echo(f"Next: trainctl local {script or 'train.py'} [ARGS]...")


def _write_template(name: str, script: Path | None, force: bool) -> None:
    from .. import scaffold

    if name == "list":
        for t in scaffold.TEMPLATES.values():
            missing = scaffold.missing_requirement(t)
            note = f"  (needs {missing}: {t.install})" if missing else ""
            click.echo(f"{t.name:<10} {t.summary}{note}")
        return
    chosen = scaffold.get(name)
    target = str(script) if script is not None else scaffold.DEFAULT_SCRIPT
    written = scaffold.write(chosen, Path.cwd(), target, force=force)
    for w in written:
        shown = w.path.relative_to(Path.cwd()) if w.path.is_relative_to(Path.cwd()) else w.path
        if w.action == "kept":
            click.echo(f"Kept the existing {shown}.")
        else:
            what = f" ({chosen.name} template)" if w.path.suffix == ".py" else ""
            click.echo(f"{w.action.capitalize()} {shown}{what}.")
    if written[-1].action == "kept":
        from ..config import load

        flag = load().resume_flag
        if flag != chosen.resume_flag:
            click.secho(f"note: {written[-1].path.name} sets resume_flag = \"{flag}\"; the {chosen.name} template "
                        f"takes {chosen.resume_flag}: set resume_flag = \"{chosen.resume_flag}\" there so "
                        "restarts hand it the checkpoint", fg="yellow", err=True)
    click.echo(f"Next: trainctl local {target}    (then: trainctl local --resume auto {target} after a stop)")
