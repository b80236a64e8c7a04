"""Keep secrets out of everything trainctl records."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_mapping(data: Any) -> Any:
    """Copy of a (nested) mapping with credential-looking keys' values replaced."""
    if isinstance(data, dict):
        return {k: (REDACTED if isinstance(k, str) and is_secret_name(k) and v not in (None, "")
                    else redact_mapping(v)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_mapping(v) for v in data]
    return data


def redact_args(args: list[str]) -> list[str]:
    """['--api-key', 'x', '--token=y', '--lr', '1'] -> ['--api-key', '***', '--token=***', '--lr', '1']."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-"):
            name, eq, _value = arg.partition("=")
            if is_secret_name(name):
                if eq:
                    out.append(f"{name}={REDACTED}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        elif "=" in arg:  # KEY=value style (hydra, nanoGPT configurator)
            name, _eq, _value = arg.partition("=")
            if is_secret_name(name):
                out.append(f"{name}={REDACTED}")
                continue
        out.append(arg)
    return out
