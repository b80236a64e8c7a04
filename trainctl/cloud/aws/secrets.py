"""Secrets for the machines: SSM SecureString parameters under /trainctl/<project>/.

The laptop writes the values the user forwards (``--secret NAME``); the machine's role may read
only its project's path, and the boot script carries names, never values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ...errors import UsageError
from .context import AwsContext
from .names import project_tags, secrets_path, tag_list

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def secret_parameter(project: str, name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"'{name}' is not an environment variable name.",
                         "Use letters, digits and underscores, not starting with a digit.")
    return secrets_path(project) + name


def put_secrets(ctx: AwsContext, project: str, values: Mapping[str, str]) -> list[str]:
    """Write (or overwrite) each value as a SecureString; returns the parameter names, never values."""
    written = []
    for name, value in values.items():
        if not value:
            raise UsageError(f"The value of {name} is empty.", f"Set {name} in your environment first.")
        parameter = secret_parameter(project, name)
        ctx.call("ssm", "put_parameter", Name=parameter, Value=value, Type="SecureString", Overwrite=True,
                 Description=f"trainctl secret {name} of project {project}")
        ctx.call("ssm", "add_tags_to_resource", ResourceType="Parameter", ResourceId=parameter,
                 Tags=tag_list(project_tags(project, "secret")))
        written.append(parameter)
    return written


def secret_names(ctx: AwsContext, project: str) -> list[str]:
    """The names of the project's secrets (values are not read)."""
    path = secrets_path(project)
    params = ctx.paginate("ssm", "get_parameters_by_path", "Parameters", Path=path, Recursive=False,
                          WithDecryption=False)
    return sorted(p["Name"][len(path):] for p in params)
