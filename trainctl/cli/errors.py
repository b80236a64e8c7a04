"""Turn errors into what a user should see: one line, a hint, a stable exit code."""

from __future__ import annotations

import os
import sys

import click

from ..errors import EXIT_ERROR, EXIT_INTERRUPTED, DiskError, TrainctlError, disk_problem


def print_error(message: str, hint: str | None = None) -> None:
    click.secho(f"error: {message}", err=True, fg="red")
    if hint:
        click.echo(f"hint: {hint}", err=True)


def _write_report(exc: BaseException) -> str | None:
    import tempfile
    import time
    import traceback

    from ..redact import redact_args, redact_command_text

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = "\n".join(redact_command_text(line) for line in text.split("\n"))
    try:
        fd, path = tempfile.mkstemp(prefix=f"trainctl-crash-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".txt")  # created 0600
        with os.fdopen(fd, "w") as f:
            f.write(f"argv: {redact_args(list(sys.argv))}\n\n{text}")
        return path
    except OSError:
        return None


def run_cli(group: click.Group, argv: list[str] | None = None) -> int:
    try:
        rv = group.main(args=argv, prog_name="trainctl", standalone_mode=False)
    except TrainctlError as e:
        print_error(e.message, e.hint)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("Interrupted.", err=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `trainctl sessions list | head`: the reader left; not an error
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        except OSError:
            pass
        return 0
    except OSError as e:
        problem = disk_problem(e)
        if problem is None:
            return _unexpected(e)
        error = DiskError(problem, os.path.dirname(str(e.filename)) if e.filename else
                          "the state or checkpoint folder", e)
        print_error(error.message, error.hint)
        return error.exit_code
    except Exception as e:
        return _unexpected(e)
    return rv if isinstance(rv, int) else 0


def _unexpected(e: Exception) -> int:
    """An error trainctl did not expect: a short traceback, the full report on disk."""
    import traceback

    from ..redact import redact_command_text

    tb = traceback.extract_tb(e.__traceback__)[-3:]
    click.echo(redact_command_text("".join(traceback.format_list(tb)).rstrip()), err=True)
    report = _write_report(e)
    print_error(redact_command_text(f"unexpected {e.__class__.__name__}: {e}"),
                f"This is a bug in trainctl. Full report: {report}" if report else
                "This is a bug in trainctl.")
    return EXIT_ERROR
