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
from typing import Any

from .errors import CheckpointError
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


# settings that say how long to train: a resume that trains longer still "matches"
RUN_LENGTH_KEYS = frozenset({"epochs", "max_epochs", "num_epochs", "n_epochs", "num_train_epochs",
                             "steps", "max_steps", "total_steps", "num_steps", "train_steps",
                             "iters", "max_iters", "num_iters", "iterations"})
NOT_GIVEN = "(not given)"


@dataclass
class Difference:
    """One setting that differs between a checkpoint's run and this one."""

    key: str
    then: Any  # the checkpoint's value (NOT_GIVEN when it had none)
    now: Any

    def __str__(self) -> str:
        return f"{self.key} {_shown(self.then)} -> {_shown(self.now)}"


@dataclass
class Candidate:
    """A checkpoint --resume auto could take, judged against this launch."""

    path: Path
    session_id: str | None
    step: int | None
    epoch: Any
    script: str | None
    script_state: str  # same | changed (same file, edited) | other (another script) | unknown
    differences: list[Difference] = field(default_factory=list)
    compared: bool = False  # whether the checkpoint recorded settings to compare with

    @property
    def matches(self) -> bool:
        """Same settings, apart from how long to train."""
        return self.compared and all(d.key in RUN_LENGTH_KEYS for d in self.differences)

    def where(self) -> str:
        parts = [f"session {self.session_id}" if self.session_id else "no recorded session"]
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}")
        if self.step is not None:
            parts.append(f"step {self.step}")
        return ", ".join(parts)


@dataclass
class AutoResume:
    """What `--resume auto` found: the checkpoint (None: start from scratch), what it was
    compared with, and the checkpoints passed over, with why. The caller says it."""

    path: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    chosen: Candidate | None = None
    script: str | None = None
    name: str | None = None
    passed_over: list[Candidate] = field(default_factory=list)  # newer ones whose settings differ
    refused: list[Candidate] = field(default_factory=list)  # another script's (see `force`)

    @property
    def looked_for(self) -> str:
        return f"name {self.name}" if self.name else f"script {Path(self.script).name}" if self.script else "this run"

    def lines(self) -> list[str]:
        """What to tell the user, one line each (without the skipped checkpoints: see `skipped`)."""
        c = self.chosen
        if c is None:
            if self.refused:
                return []  # refuse() says it
            return [f"--resume auto: no checkpoint for {self.looked_for} yet; starting from scratch."]
        out = [f"resuming from {c.path} ({c.where()})"]
        if c.script_state == "changed":
            out.append(f"  {Path(self.script or '').name} changed since this checkpoint was written "
                       "(its digest differs)")
        elif c.script_state == "other":
            out.append(f"  written by another script, {c.script}")
        if c.differences:
            out.append("  settings differ from the checkpoint's run: " + ", ".join(map(str, c.differences)))
        elif not c.compared:
            out.append("  the checkpoint recorded no settings to compare with this run's")
        for other in self.passed_over[:3]:
            out.append(f"  chosen over the newer {other.path} ({other.where()}): its settings differ: "
                       + ", ".join(map(str, other.differences[:4])))
        return out

    def refusal(self, *, in_message: bool = False) -> CheckpointRefusedError | None:
        """The error to raise when only another script's checkpoints were found. A launcher's
        hint is --force; a script's own run (`in_message`: its traceback shows the message
        only) is told to name the checkpoint, which is never refused."""
        if self.chosen is not None or not self.refused:
            return None
        r = self.refused[0]
        message = (f"--resume auto: the newest checkpoint for {self.looked_for}, {r.path} ({r.where()}), "
                   f"was written by another script, {r.script}.")
        if in_message:
            return CheckpointRefusedError(f"{message} To resume it anyway, name it: --resume {r.path}")
        return CheckpointRefusedError(message, "Resume it anyway with --force, or start without --resume.")


def resolve_auto(checkpoint_dir: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None, *,
                 script: str | None = None, name: str | None = None, args: Sequence[str] | None = None,
                 config: dict[str, Any] | None = None, resume_flag: str = "--resume",
                 force: bool = False) -> AutoResume:
    """The checkpoint `--resume auto` means: of the same run name (or, without one, the same
    script), valid, not of a session still running (a sweep's siblings); one whose settings
    match this run's (`args`, and `config` where the caller has it) before a newer one whose
    settings differ; never another script's unless `force`."""
    from . import checkpoint
    from .session import SessionStore, State

    running: set[str] = set()
    if state_dir is not None:
        records, _problems = SessionStore(state_dir).list(status=State.RUNNING)
        running = {r["id"] for r in records}
    digest = _digest(script)
    scanned = [i for i in checkpoint.scan(checkpoint_dir)
               if i.kind == "trainctl" and i.meta.get("session_id") not in running and _wanted(i, script, name)]
    infos = [i for i in scanned if i.status == "valid"]
    # one judgement per session (its checkpoints share script and settings), newest first
    by_session: dict[Any, Candidate] = {}
    for info in infos:
        key = info.meta.get("session_id") or str(info.path)
        if key not in by_session:
            by_session[key] = _judge(info, script, digest, args, config, resume_flag, state_dir)
    newest_first = list(by_session)
    ranked = sorted(newest_first, key=lambda k: not by_session[k].matches)  # stable: newest first
    result = AutoResume(None, script=script, name=name)
    skipped: list[tuple[Path, str]] = []
    for key in ranked:
        candidate = by_session[key]
        if candidate.script_state == "other" and not force:
            result.refused.append(candidate)
            continue
        # the newest of the session's checkpoints that verifies (a session keeps them in one folder)
        found, passed = checkpoint.newest_valid(candidate.path.parent, session_id=candidate.session_id,
                                                skip_sessions=running)
        skipped += passed
        if found is None:
            continue
        chosen = candidate if found == candidate.path else _judge(
            next((i for i in infos if i.path == found), None), script, digest, args, config, resume_flag, state_dir)
        if chosen is None:  # verified, but written after the listing above
            chosen = candidate
            chosen.path = found
        result.path, result.chosen = found, chosen
        if chosen.matches:
            result.passed_over = [by_session[k] for k in newest_first[:newest_first.index(key)]
                                  if not by_session[k].matches and by_session[k].script_state != "other"]
        break
    # a torn or corrupt checkpoint newer than the one taken is said, wherever it is
    taken = {p for p, _ in skipped}
    since = next((i.time for i in infos if i.path == result.path), None)
    skipped += [(i.path, i.error or i.status) for i in scanned
                if i.status != "valid" and i.path not in taken and (since is None or i.time > since)]
    result.skipped = skipped
    if result.chosen is not None:  # another script's newer checkpoints are noise once one is chosen
        result.refused = []
    return result


def judge_path(path: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None, *,
               script: str | None, args: Sequence[str] | None = None, config: dict[str, Any] | None = None,
               resume_flag: str = "--resume") -> AutoResume:
    """A checkpoint named by path, judged as --resume auto judges its candidates (where it
    comes from, which script wrote it, what differs), for the caller to say before resuming."""
    from . import checkpoint

    info = checkpoint.inspect(path)
    chosen = _judge(info, script, _digest(script), args, config, resume_flag, state_dir)
    return AutoResume(Path(path), chosen=chosen, script=script)


class CheckpointRefusedError(CheckpointError, ValueError):
    """--resume auto found only checkpoints another script wrote."""


def script_state(recorded_script: Any, recorded_digest: Any, script: str | None,
                 digest: str | None = None) -> str:
    """same | changed | other | unknown: how the script that wrote a checkpoint relates to
    `script`. A copy elsewhere with the same bytes is the same script; a file edited in place
    has changed; another path whose bytes differ (or are unknown) is another script."""
    if not script or not isinstance(recorded_script, str):
        return "unknown"
    digest = digest if digest is not None else _digest(script)
    if isinstance(recorded_digest, str) and digest and recorded_digest == digest:
        return "same"
    here = os.path.realpath(script)
    if recorded_script == script or os.path.realpath(recorded_script) == here:
        return "changed" if isinstance(recorded_digest, str) and digest else "same"
    return "other"


def settings_differences(then: dict[str, Any], now: dict[str, Any], *, only_now: bool = False) -> list[Difference]:
    """What differs between two flat settings maps (NOT_GIVEN for a key one side lacks);
    with `only_now`, only keys this run sets (the other side is a full config)."""
    from .redact import is_secret_name

    keys = list(now) if only_now else list(dict.fromkeys([*now, *then]))
    out = []
    for key in keys:
        if is_secret_name(str(key)):
            continue  # never recorded (only ***), so never compared, and never shown
        a, b = then.get(key, NOT_GIVEN), now.get(key, NOT_GIVEN)
        if not _same_value(a, b):
            out.append(Difference(key, a, b))
    return out


def args_settings(args: Sequence[str], flag: str = "--resume") -> dict[str, Any]:
    """`--lr 0.1 --amp out=x.pt data/` -> {'lr': '0.1', 'amp': True, 'out': 'x.pt', 'arg1': 'data/'}:
    a command line's settings by name, as a config dict would name them."""
    out: dict[str, Any] = {}
    args = strip_resume_args(list(args), flag)
    positional = 0
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and not _number(arg):
            name, eq, value = arg.lstrip("-").partition("=")
            key = name.replace("-", "_")
            if eq:
                out[key] = value
            elif i + 1 < len(args) and not (args[i + 1].startswith("-") and not _number(args[i + 1])):
                out[key] = args[i + 1]
                i += 1
            else:
                out[key] = True
        elif "=" in arg and not arg.startswith(("/", ".")):
            name, _eq, value = arg.partition("=")
            out[name.replace("-", "_")] = value
        else:
            positional += 1
            out[f"arg{positional}"] = arg
        i += 1
    return out


def config_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as one flat map: {'optim': {'lr': 1}} -> {'optim.lr': 1}."""
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(config_settings(v, key + "."))
            else:
                out[key] = v
    return out


def _judge(info: Any, script: str | None, digest: str | None, args: Sequence[str] | None,
           config: dict[str, Any] | None, flag: str, state_dir: Any) -> Candidate | None:
    if info is None:
        return None
    meta = info.meta or {}
    candidate = Candidate(info.path, meta.get("session_id"), info.step, info.epoch, meta.get("script"),
                          script_state(meta.get("script"), meta.get("script_digest"), script, digest))
    resume_key = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
    recorded_args = meta.get("args")
    if not isinstance(recorded_args, list):
        recorded_args = _session_args(state_dir, candidate.session_id)
    recorded_config = config_settings(meta.get("config")) if isinstance(meta.get("config"), dict) else {}
    if config and recorded_config:  # the runtime: both configs in full
        now = {k: v for k, v in config_settings(config).items() if k != resume_key}
        then = {k: v for k, v in recorded_config.items() if k != resume_key}
        candidate.differences, candidate.compared = settings_differences(then, now), True
    elif args is not None and recorded_args is not None:
        candidate.differences = settings_differences(args_settings(recorded_args, flag), args_settings(args, flag))
        candidate.compared = True
    elif args is not None and recorded_config:  # what this run sets, against the full config
        candidate.differences = settings_differences(recorded_config, args_settings(args, flag), only_now=True)
        candidate.compared = True
    return candidate


def _session_args(state_dir: Any, session_id: str | None) -> list[str] | None:
    """The arguments a session recorded (redacted), for checkpoints written before they carried them."""
    if state_dir is None or not session_id:
        return None
    from .session import CorruptSessionError, Session

    try:
        args = Session(Path(state_dir) / "sessions" / session_id).read().get("args")
    except (CorruptSessionError, OSError):
        return None
    return [str(a) for a in args] if isinstance(args, list) else None


def _wanted(info: Any, script: str | None, name: str | None) -> bool:
    meta = info.meta or {}
    if name is not None:
        return meta.get("run_name") == name
    if script is None:
        return True
    recorded = meta.get("script")
    # the same script run from another folder or machine counts: compare file names (then bytes)
    return isinstance(recorded, str) and (recorded == script or Path(recorded).name == Path(script).name)


def _digest(script: str | None) -> str | None:
    if not script:
        return None
    from .checkpoint import file_sha256

    try:
        return file_sha256(script)
    except OSError:
        return None


def _number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _same_value(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if NOT_GIVEN in (a, b):
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    if _number(a) and _number(b):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return str(list(a) if isinstance(a, (list, tuple)) else a) == str(list(b) if isinstance(b, (list, tuple)) else b)
    return str(a) == str(b)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)
