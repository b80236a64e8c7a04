"""Keep secrets out of everything trainctl records or prints: one redaction for command lines,
configs and lines of text.

A value is secret when its name says so (`--api-key=...`, `--password X`, `hf_token=...`,
a config key `db_passwd`): names holding KEY, TOKEN, SECRET, PASSWORD, PASSWD, CREDENTIAL or
AUTH. Lists of strings are read as command lines (`["--password", "x"]`, `["extra_api_key=x"]`),
so a config that holds one is covered too. Environment values are never recorded at all.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.IGNORECASE)
# `name=value`, the name as flags and overrides spell it (`--api-key`, `db.password`, `HF_TOKEN`)
_ASSIGNMENT = re.compile(r"^(-{0,2}[A-Za-z_][\w.\-]*)=(.*)$", re.DOTALL)
SECRETS_NOTE = ("*** stands for a secret trainctl does not record: "
                "put the original values back before running it")


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_mapping(data: Any) -> Any:
    """Copy of a (nested) config with secrets replaced: values of credential-looking keys, and
    secrets inside lists of strings and `name=value` strings."""
    if isinstance(data, dict):
        return {k: (REDACTED if isinstance(k, str) and is_secret_name(k) and v not in (None, "")
                    else redact_mapping(v)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        if data and all(isinstance(v, str) for v in data):
            return redact_args(list(data))
        return [redact_mapping(v) for v in data]
    if isinstance(data, str):
        return _redact_assignment(data)
    return data


def redact_args(args: list[str]) -> list[str]:
    """['--api-key', 'x', '--token=y', 'hf_token=z', '--lr', '1'] ->
    ['--api-key', '***', '--token=***', 'hf_token=***', '--lr', '1']."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            hide_next = False
            if not _is_flag(arg):
                out.append(REDACTED)
                continue
        if _is_flag(arg):
            name, eq, _value = arg.partition("=")
            if is_secret_name(name):
                if eq:
                    out.append(f"{name}={REDACTED}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        out.append(_redact_assignment(arg))
    return out


def redact_command_text(text: str) -> str:
    """A line of text that may quote a command line (a usage error, a traceback, a command
    printed for the user), with the same redaction applied word by word."""
    if not _SECRET_NAME.search(text):
        return text
    parts = re.split(r"(\s+)", text)
    words = parts[::2]
    redacted = redact_args([w.strip("'\"") if _quoted_flag(w) else w for w in words])
    for i, (before, after) in enumerate(zip(words, redacted, strict=True)):
        if after != before.strip("'\"") and after != before:
            parts[2 * i] = after
    return "".join(parts)


def secrets_note(command: str) -> str | None:
    """What to say under a printed command that had secrets taken out of it."""
    return SECRETS_NOTE if REDACTED in command else None


def _quoted_flag(word: str) -> bool:
    return len(word) > 1 and word[0] in "'\"" and word[-1] == word[0]


def _is_flag(arg: str) -> bool:
    if not arg.startswith("-") or arg == "-":
        return False
    try:
        float(arg)
    except ValueError:
        return True
    return False  # a negative number is a value


def _redact_assignment(text: str) -> str:
    m = _ASSIGNMENT.match(text)
    if m and is_secret_name(m.group(1)) and m.group(2):
        return f"{m.group(1)}={REDACTED}"
    return text
