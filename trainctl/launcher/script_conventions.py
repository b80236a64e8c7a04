"""What a training script's source shows about how it saves and resumes, for the checkpoint
watcher (`launcher/script_checkpoints.py`) and for `trainctl check` / `trainctl init`, which suggest the
`resume_flag` a script takes.

Recognised: argparse/click flags (`--resume`, `--resume_from_checkpoint`, `--ckpt_path`, ...),
Hugging Face `TrainingArguments` (`--resume_from_checkpoint PATH`), LightningCLI
(`fit --ckpt_path PATH`), nanoGPT-style configurators (`--init_from=resume`, no path: the script
reads its own checkpoint), and the folders a script writes to by default.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Arguments whose value is where a script writes (normalised: lower case, '-' -> '_', last
# dotted part for Hydra-style `trainer.default_root_dir=...`).
DIR_ARGUMENTS = frozenset({
    "out_dir", "outdir", "output_dir", "save_dir", "savedir", "checkpoint_dir", "checkpoints_dir",
    "ckpt_dir", "default_root_dir", "dirpath", "log_dir", "logdir", "logging_dir", "model_dir",
    "run_dir", "exp_dir", "work_dir", "save_path", "ckpt_path", "checkpoint_path", "output_path",
})


def dirs_from_args(args: Sequence[str]) -> list[tuple[str, str]]:
    """(argument, value) for each argument naming where the script writes: `--out_dir X`,
    `--out_dir=X`, `--output-dir X`, nanoGPT's `--out_dir=X`, Hydra's `trainer.default_root_dir=X`."""
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        value: str | None = None
        consumed = 0
        if arg.startswith("-"):
            key = arg.lstrip("-")
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                value, consumed = args[i + 1], 1
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            i += 1
            continue
        name = key.strip().lower().replace("-", "_").rsplit(".", 1)[-1]
        if name in DIR_ARGUMENTS and value and value.strip("'\""):
            found.append((arg.split("=", 1)[0], value.strip("'\"")))
            i += consumed
        i += 1
    return found


def dirs_from_source(source: str) -> list[tuple[str, str]]:
    """(name, folder) the script writes to by default: a module-level `out_dir = 'out'`
    (nanoGPT), `add_argument('--output_dir', default='runs')`, `TrainingArguments(output_dir=...)`,
    `ModelCheckpoint(dirpath=...)`, `Trainer(default_root_dir=...)`."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found: list[tuple[str, str]] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        value = getattr(node, "value", None)
        for target in targets:
            if isinstance(target, ast.Name) and target.id.lower() in DIR_ARGUMENTS and _is_str(value):
                found.append((target.id, value.value))  # type: ignore[union-attr]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called in ("add_argument", "option"):
            flags = [a.value for a in node.args if _is_str(a) and a.value.startswith("-")]
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if flags and _is_str(default):
                name = flags[-1].lstrip("-").replace("-", "_").lower()
                if name in DIR_ARGUMENTS:
                    found.append((flags[-1], default.value))  # type: ignore[union-attr]
            continue
        for kw in node.keywords:
            if kw.arg and kw.arg.lower() in DIR_ARGUMENTS and _is_str(kw.value):
                found.append((f"{called}({kw.arg}=...)", kw.value.value))  # type: ignore[union-attr]
    return found


def _is_str(node: Any) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(node.value)


@dataclass(frozen=True)
class ResumeConvention:
    """A `resume_flag` a script's source shows it takes, and the evidence."""

    flag: str  # the value for trainctl.toml's resume_flag
    why: str  # "defines --resume", "compares init_from with 'resume'", ...
    takes_path: bool = True  # False: `--init_from=resume`, TRAIN_OPS_RESUME names the file
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"flag": self.flag, "why": self.why, "takes_path": self.takes_path, "line": self.line}


# most specific first: a script that defines several takes the first as its resume point
_RESUME_FLAGS = ("--resume_from_checkpoint", "--resume-from-checkpoint", "--resume", "--resume_from",
                 "--resume-from", "--resume_path", "--resume-path", "--ckpt_path", "--ckpt-path",
                 "--checkpoint_path", "--checkpoint-path", "--load_checkpoint", "--load-checkpoint",
                 "--restore", "--restore_from", "--checkpoint", "--ckpt", "--load", "--init_from")
_PARSER_CALLS = ("add_argument", "option", "Option", "argument", "Argument", "add_option")


def detect_resume_conventions(source: str) -> list[ResumeConvention]:
    """The resume flags a script's source shows it takes, best first: argparse/click flags,
    Hugging Face `TrainingArguments` (`--resume_from_checkpoint PATH`), LightningCLI
    (`--ckpt_path PATH`) and nanoGPT-style configurators (`--init_from=resume`)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return _detect_by_text(source)
    found: list[ResumeConvention] = []
    defined: dict[str, int] = {}
    names: set[str] = set()
    compared: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in _PARSER_CALLS:
                for a in node.args:
                    if _is_str(a) and a.value.startswith("-"):
                        defined.setdefault(a.value, node.lineno)
        if isinstance(node, ast.Compare) and len(node.comparators) == 1:
            left, right = node.left, node.comparators[0]
            for var, const in ((left, right), (right, left)):
                if isinstance(var, ast.Name) and isinstance(const, ast.Constant) and const.value == "resume":
                    compared.setdefault(var.id, node.lineno)
    module_vars = {t.id: node.lineno for node in tree.body if isinstance(node, ast.Assign)
                   for t in node.targets if isinstance(t, ast.Name)}
    for flag in _RESUME_FLAGS:
        if flag in defined and flag != "--init_from":
            found.append(ResumeConvention(flag, f"defines {flag}", line=defined[flag]))
    # configurator style (nanoGPT): a module-level variable the script compares with 'resume'
    for var, line in compared.items():
        if var in module_vars or f"--{var}" in defined:
            found.append(ResumeConvention(
                f"--{var}=resume", f"compares {var} with 'resume'", takes_path=False, line=line))
    if "init_from" in module_vars and "init_from" not in compared and "configurator" in source:
        found.append(ResumeConvention(
            "--init_from=resume", "sets init_from, which nanoGPT's configurator overrides with --init_from=resume",
            takes_path=False, line=module_vars["init_from"]))
    if {"TrainingArguments", "HfArgumentParser", "Seq2SeqTrainingArguments"} & names \
            and not any(c.flag.startswith("--resume_from_checkpoint") for c in found):
        found.append(ResumeConvention(
            "--resume_from_checkpoint", "uses Hugging Face TrainingArguments, which take "
            "--resume_from_checkpoint PATH (the script must pass it to trainer.train())"))
    if "LightningCLI" in names and "--ckpt_path" not in defined:
        found.append(ResumeConvention("--ckpt_path", "uses LightningCLI: `fit --ckpt_path PATH` resumes"))
    return found


def _detect_by_text(source: str) -> list[ResumeConvention]:
    """The same conventions, for a script that doesn't parse (another Python's syntax)."""
    found = []
    for flag in _RESUME_FLAGS:
        if flag != "--init_from" and re.search(rf"['\"]{re.escape(flag)}['\"]", source):
            found.append(ResumeConvention(flag, f"mentions '{flag}'"))
    match = re.search(r"(\w+)\s*==\s*['\"]resume['\"]", source)
    if match:
        found.append(ResumeConvention(f"--{match.group(1)}=resume", f"compares {match.group(1)} with 'resume'",
                                      takes_path=False, line=source.count("\n", 0, match.start()) + 1))
    return found


def takes_resume_flag(source: str, flag: str) -> bool:
    """Whether a script takes `flag`: it defines it, or (`--init_from=resume`) it sets the
    module-level variable a configurator overrides, or it shows the convention."""
    name = flag.split("=", 1)[0]
    if f"'{name}'" in source or f'"{name}"' in source:
        return True
    if "=" not in flag:
        return False
    variable = name.lstrip("-")
    if re.search(rf"^{re.escape(variable)}\s*(:[^=]+)?=", source, re.MULTILINE):
        return True  # nanoGPT: `init_from = 'scratch'`, overridden by `--init_from=resume`
    return any(c.flag == flag for c in detect_resume_conventions(source))
