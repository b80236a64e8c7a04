"""Starting points: a runnable, commented training script that uses trainctl fully
(`trainctl init --template NAME`), kept as package data in trainctl/templates/."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UsageError

DEFAULT_SCRIPT = "train.py"


@dataclass(frozen=True)
class Template:
    name: str
    summary: str
    file: str  # in trainctl/templates/
    requires: tuple[str, ...] = ()  # importable modules it runs on
    install: str = ""  # how to get them
    resume_flag: str = "--resume"  # how the script takes a checkpoint (trainctl.toml: resume_flag)


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("plain", "plain PyTorch loop: run.track(model, optimizer, scheduler), run.restore(), "
                      "periodic checkpoints", "plain.py.tmpl", ("torch",), "pip install torch"),
    Template("lightning", "PyTorch Lightning Trainer with TrainctlCallback and ModelCheckpoint",
             "lightning.py.tmpl", ("torch", "lightning"), "pip install 'trainctl[lightning]'"),
    Template("hf", "Hugging Face Trainer (tiny GPT-2 from a config) reporting to trainctl; "
                   "the Trainer's checkpoint folders resumed", "hf.py.tmpl", ("torch", "transformers"),
             "pip install transformers", "--resume_from_checkpoint"),
)}


def get(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UsageError(f"unknown template '{name}'. Valid: {', '.join(TEMPLATES)}.",
                         "List them with: trainctl init --template list") from None


def text(template: Template) -> str:
    """The template's source, from the installed package."""
    return (resources.files("trainctl") / "templates" / template.file).read_text(encoding="utf-8")


def missing_requirement(template: Template) -> str | None:
    """The first module the template needs that is not importable here, else None."""
    return next((m for m in template.requires if importlib.util.find_spec(m) is None), None)


def check_runnable(template: Template) -> None:
    missing = missing_requirement(template)
    if missing is not None:
        raise UsageError(f"the {template.name} template needs {missing}, which is not installed here.",
                         f"Install it with: {template.install}")


def config_text(template: Template) -> str:
    """trainctl.toml for a project started from `template`: every key at its default, the
    resume flag the script takes."""
    from .config import SCHEMA
    from .config import template as config_template

    out = config_template()
    default = SCHEMA[""]["resume_flag"][1]
    if template.resume_flag != default:
        out = out.replace(f'resume_flag = "{default}"\n',
                          f'# the {template.name} template takes its checkpoint with {template.resume_flag}\n'
                          f'resume_flag = "{template.resume_flag}"\n', 1)
    return out


@dataclass
class Written:
    path: Path
    action: str  # "wrote", "overwrote", "kept"


def write(template: Template, folder: Path, script: str = DEFAULT_SCRIPT, *, force: bool = False) -> list[Written]:
    """Write the script (refused when it exists, unless `force`) and trainctl.toml when the
    folder has none (an existing one is kept). Nothing is written when anything is refused."""
    from .config import CONFIG_FILE

    check_runnable(template)
    target = folder / script
    if target.is_dir():
        raise UsageError(f"{target} is a directory.", "Name the script file, e.g. trainctl init --template "
                                                      f"{template.name} train.py")
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; nothing was written.",
                         f"Keep it and name another file (trainctl init --template {template.name} other.py), "
                         "or overwrite it with --force")
    config = folder / CONFIG_FILE
    written = [Written(target, "overwrote" if target.exists() else "wrote")]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text(template), encoding="utf-8")
    if config.exists():
        written.append(Written(config, "kept"))
    else:
        config.write_text(config_text(template), encoding="utf-8")
        written.append(Written(config, "wrote"))
    return written
