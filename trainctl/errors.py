"""One error hierarchy: every expected failure is a TrainctlError with a message and a hint.

The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits with ``exit_code``; no traceback.
"""

from __future__ import annotations

# Stable exit codes (documented in README.md).
EXIT_OK = 0
EXIT_ERROR = 1  # unexpected error (a short traceback and a report path are printed)
EXIT_USAGE = 2  # bad input: arguments, config, pre-flight failure
EXIT_NOT_FOUND = 3  # a session, checkpoint or file that does not exist
EXIT_CHECKPOINT = 4  # a checkpoint that is corrupt, unverified or refused
EXIT_PROVIDER = 5  # the cloud provider refused or could not serve a valid request (credentials,
# permissions, quota, capacity, throttling, network)
EXIT_PREEMPTED = 75  # the script stopped on a preemption signal after an emergency checkpoint (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # the launcher was stopped (Ctrl-C / SIGTERM)


class TrainctlError(Exception):
    """Base of every error trainctl expects; ``hint`` says what to do next."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(TrainctlError, ValueError):
    exit_code = EXIT_USAGE


class ConfigError(TrainctlError, ValueError):
    """A malformed or invalid trainctl.toml; carries the file and line."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None, *, path: str | None = None,
                 line: int | None = None) -> None:
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(where + message, hint)
        self.path = path
        self.line = line


class NotFoundError(TrainctlError, LookupError):
    exit_code = EXIT_NOT_FOUND


class ScriptNotFoundError(NotFoundError, FileNotFoundError):
    def __init__(self, message: str, hint: str | None = None, *, path: str | None = None) -> None:
        super().__init__(message, hint)
        self.path = path


class SessionNotFoundError(NotFoundError):
    def __init__(self, session_ref: str, hint: str | None = None) -> None:
        super().__init__(f"No session '{session_ref}' in this project.",
                         hint or "List sessions with: trainctl sessions list")
        self.session_ref = session_ref


class CheckpointError(TrainctlError):
    exit_code = EXIT_CHECKPOINT


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    exit_code = EXIT_NOT_FOUND


class CorruptCheckpointError(CheckpointError, ValueError):
    """The file is not a readable checkpoint, or does not match its manifest."""


class ResumeMismatchError(CheckpointError, ValueError):
    """A readable checkpoint that doesn't hold what this run tracks (another model, a bare state_dict)."""


class UntrustedCheckpointError(CheckpointError, PermissionError):
    """Loading needs full unpickling, which can run code from the file."""


class UnsupportedCheckpointError(CheckpointError):
    """Written by a newer trainctl checkpoint format than this version reads."""


class PreflightError(TrainctlError):
    exit_code = EXIT_USAGE


class NetCheckError(PreflightError):
    """The nodes of a multi-node job could not all-reduce before the script started; ``kind``
    names the problem as the diagnosis does (rendezvous_timeout, rendezvous_unreachable, ...)."""

    def __init__(self, message: str, hint: str | None = None, *, kind: str = "net_check_failed") -> None:
        super().__init__(message, hint)
        self.kind = kind


class DiskError(TrainctlError, OSError):
    """A folder trainctl must write to is full or read-only: named, with what to do."""

    def __init__(self, problem: str, folder: object, error: OSError) -> None:
        import errno

        hint = ("Point state_dir / checkpoint_dir in trainctl.toml at a writable folder." if error.errno == errno.EROFS
                else f"Free space there (df -h {folder}), or point state_dir / checkpoint_dir in trainctl.toml "
                     "at another disk; trainctl checkpoint cleanup --dry-run shows what retention would remove.")
        TrainctlError.__init__(self, f"{problem}: cannot write in {folder} ({error.strerror or error}).", hint)
        self.errno = error.errno
        self.folder = folder


def disk_problem(error: BaseException) -> str | None:
    """'the disk is full' (or its quota, or a read-only file system) for an OSError that says
    so; None for any other error."""
    import errno

    if not isinstance(error, OSError):
        return None
    return {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EROFS: "the file system is read-only"}.get(error.errno)  # type: ignore[arg-type]


class TrainctlWarning(UserWarning):
    """Warnings trainctl emits (tests turn these into errors)."""
