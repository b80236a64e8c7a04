"""Secrets the user forwards to a remote script (`--secret WANDB_API_KEY`), through a secret store.

Values never travel in user data, pod environments, storage objects or records: the launcher
puts each into the platform's store (AWS SSM SecureString, RunPod secrets), the machine names
only the store and the variable names, and the agent reads the values into the script's
environment alone (not its own, not any record). The interface (`SecretStore`) lives with the
backends, each of which provides its platform's store, named here and imported on first use
(`ssm`: trainctl.backends.aws, what an AWS boot script names in TRAINCTL_SSM_PATH);
`FolderSecretStore` keeps values as 0600 files (tests, a machine with a shared disk), and
`EnvSecretStore` reads variables the platform already injected (RunPod's secret references).

    open_secret_store("folder:/run/trainctl-secrets")
    resolve_secrets(store, ["HF_TOKEN"]) -> {"HF_TOKEN": "..."}
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..backends.base import SecretNotFoundError, SecretStore
from ..backends.base import check_secret_name as check_name
from ..errors import UsageError
from ..fsutil import atomic_write_bytes

__all__ = ["SECRET_STORES", "EnvSecretStore", "FolderSecretStore", "SecretNotFoundError", "SecretStore",
           "check_name", "open_secret_store", "register_secret_store", "resolve_secrets"]

SECRET_STORES: dict[str, str] = {
    "folder": "trainctl.agent.secrets:FolderSecretStore",
    "env": "trainctl.agent.secrets:EnvSecretStore",
    "ssm": "trainctl.backends.aws:SsmSecretStore",
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class FolderSecretStore(SecretStore):
    """One file per secret, 0600, in a 0700 folder."""

    name = "folder"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def put(self, name: str, value: str) -> None:
        if not isinstance(value, str):
            raise UsageError(f"Secret {name} must be text, not {type(value).__name__}.", "Pass a string.")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self._path(name), value.encode("utf-8"), mode=0o600)

    def get(self, name: str) -> str:
        try:
            return self._path(name).read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise SecretNotFoundError(name, str(self.root)) from None

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_file() and _NAME.match(p.name))
        except FileNotFoundError:
            return []


class EnvSecretStore(SecretStore):
    """Secrets the platform put in this process's environment (RunPod resolves
    `{{ RUNPOD_SECRET_name }}` references when it starts the pod). `prefix` names where to look:
    `env:RUNPOD_SECRET_` reads HF_TOKEN from RUNPOD_SECRET_HF_TOKEN, else from HF_TOKEN."""

    name = "env"

    def __init__(self, prefix: str = "", environ: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix
        self.environ = os.environ if environ is None else environ

    def put(self, name: str, value: str) -> None:
        raise UsageError("The env secret store is read-only.", "Set the variable in the platform's secrets.")

    def get(self, name: str) -> str:
        check_name(name)
        for key in (self.prefix + name, name) if self.prefix else (name,):
            if key in self.environ:
                return self.environ[key]
        raise SecretNotFoundError(name, "this machine's environment")

    def delete(self, name: str) -> None:
        raise UsageError("The env secret store is read-only.", "Remove the variable in the platform's secrets.")

    def names(self) -> list[str]:
        return sorted({k[len(self.prefix):] for k in self.environ if self.prefix and k.startswith(self.prefix)})


def register_secret_store(name: str, target: str) -> None:
    """Make a secret store known by `name` ("module:Class", constructed with the text after ':')."""
    if ":" not in target:
        raise ValueError(f"secret store target must be 'module:Class', not {target!r}")
    SECRET_STORES[name] = target


def open_secret_store(spec: str) -> SecretStore:
    """`folder:/path`, `env[:PREFIX]` or a registered `name:argument` (e.g. `ssm:/trainctl/proj`)."""
    kind, _, argument = spec.partition(":")
    target = SECRET_STORES.get(kind)
    if target is None:
        raise UsageError(f"Unknown secret store {kind!r}. Valid: {', '.join(SECRET_STORES)}.",
                         "Example: --secret-store folder:/run/trainctl-secrets")
    if kind == "folder" and not argument:
        raise UsageError("The folder secret store needs a folder.", "Example: --secret-store folder:/run/secrets")
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    return cls(argument) if argument or kind != "env" else cls()


def resolve_secrets(store: SecretStore, names: Iterable[str]) -> dict[str, str]:
    """The values of `names`, for the script's environment only; every missing one is named."""
    values: dict[str, str] = {}
    missing = []
    for name in dict.fromkeys(names):
        try:
            values[name] = store.get(check_name(name))
        except SecretNotFoundError:
            missing.append(name)
    if missing:
        raise SecretNotFoundError(", ".join(missing), store.name + " secret store")
    return values
