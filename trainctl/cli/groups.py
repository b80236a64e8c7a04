"""A click group that answers a mistyped subcommand with the near ones, at every level."""

from __future__ import annotations

from typing import Any

import click


class SuggestingGroup(click.Group):
    """`trainctl locl` -> "No such command 'locl'. Did you mean 'local'?" (click before 8.4, and
    any group whose commands are loaded lazily, would say only the first half)."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name = click.utils.make_str(args[0])
        if (not ctx.resilient_parsing and not name.startswith("-")
                and self.get_command(ctx, name) is None
                and (ctx.token_normalize_func is None or self.get_command(ctx, ctx.token_normalize_func(name)) is None)):
            raise click.UsageError(unknown_command_message(name, self.list_commands(ctx)), ctx)
        return super().resolve_command(ctx, args)


def unknown_command_message(name: str, known: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    message = f"No such command '{name}'."
    if len(near) == 1:
        return f"{message} Did you mean '{near[0]}'?"
    if near:
        return f"{message} Did you mean one of: {', '.join(repr(n) for n in near)}?"
    return f"{message} Commands: {', '.join(known)}."


def group(name: str, **kwargs: Any) -> Any:
    """`@click.group(name)` with suggestions for mistyped subcommands."""
    return click.group(name, cls=SuggestingGroup, **kwargs)
