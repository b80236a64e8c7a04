"""Resuming, in one place: how a resume reaches a script's arguments, which checkpoint
`--resume auto` means, and the command that continues a run.

Used by the launcher (it resolves and passes the resume), by the runtime (`Run.resume_path`)
and by the Lightning callback, so all three agree on every rule.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .redact import redact_args

AUTO = "auto"


def find_resume_arg(args: Sequence[str], flag: str) -> str | None:
    """The value given with `flag` among `args` (`--resume PATH` or `--resume=PATH`), else None."""
    return split_resume_arg(args, flag)[0]


def split_resume_arg(args: Sequence[str], flag: str) -> tuple[str | None, list[str]]:
    """`train.py --lr 1 --resume x.pt` -> ('x.pt', ['--lr', '1']): a resume the user put among
    the script's own arguments, so trainctl verifies and records it like --resume before SCRIPT."""
    if "=" in flag:  # '--init_from=resume' style: the script resolves its own checkpoint
        return None, list(args)
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1], [*args[:i], *args[i + 2:]]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], [*args[:i], *args[i + 1:]]
    return None, list(args)


def strip_resume_args(args: Sequence[str], flag: str) -> list[str]:
    """The args without any `flag PATH` / `flag=...` (the resume flag)."""
    name = flag.split("=", 1)[0]
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = "=" not in flag
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def with_resume_args(args: Sequence[str], flag: str, resume: str | None, takes_flag: bool) -> list[str]:
    """When trainctl resumes: args without any old resume flag, plus `flag resume` when the
    script takes the flag. When it doesn't resume, the args are the user's, untouched."""
    if not resume:
        return list(args)
    out = strip_resume_args(args, flag)
    if takes_flag:
        out += [flag] if "=" in flag else [flag, resume]
    return out


def script_takes_flag(script: str | os.PathLike[str], flag: str) -> bool:
    """Whether the script's source names `flag` (argparse/click definition) or uses trainctl.init."""
    try:
        text = Path(script).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    name = flag.split("=", 1)[0]
    return f"'{name}'" in text or f'"{name}"' in text


def resume_command(script: str, args: Sequence[str], checkpoint: str | None, flag: str = "--resume") -> str:
    """How to continue a run: a new session from its newest checkpoint, or (none written) the
    same command again. Secrets in the arguments are redacted, an old resume flag dropped."""
    rest = redact_args(strip_resume_args(list(args), flag))
    if checkpoint:
        return shlex.join(["trainctl", "checkpoint", "resume", checkpoint, script, *rest])
    return shlex.join(["trainctl", "local", script, *rest])


@dataclass
class AutoResume:
    """What `--resume auto` found: the checkpoint (None: start from scratch) and the newer
    ones it passed over, with why."""

    path: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def resolve_auto(checkpoint_dir: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None, *,
                 script: str | None = None, name: str | None = None) -> AutoResume:
    """The newest valid checkpoint of the same run name (or, without one, the same script)
    under `checkpoint_dir`, skipping those of sessions still running (a sweep's siblings)."""
    from . import checkpoint
    from .session import SessionStore, State

    running: set[str] = set()
    if state_dir is not None:
        records, _problems = SessionStore(state_dir).list(status=State.RUNNING)
        running = {r["id"] for r in records}
    found, skipped = checkpoint.newest_valid(checkpoint_dir, script=None if name else script,
                                             name=name, skip_sessions=running)
    return AutoResume(found, skipped)
