"""Typed errors of the storage layer; each subclasses trainctl's hierarchy and the matching builtin,
and says what to do next."""

from __future__ import annotations

from ..errors import EXIT_USAGE, NotFoundError, TrainctlError


class StorageError(TrainctlError, OSError):
    """Something about object storage failed; `uri` names the store or object."""

    def __init__(self, message: str, hint: str | None = None, *, uri: str | None = None) -> None:
        TrainctlError.__init__(self, message, hint)
        self.uri = uri


class StorageDependencyError(TrainctlError, ImportError):
    """The S3 client library (boto3) is not installed (an ImportError, not an I/O failure)."""

    exit_code = EXIT_USAGE


class StorageConfigError(StorageError, ValueError):
    """The endpoint, region or credentials cannot work as given."""

    exit_code = EXIT_USAGE


class ObjectNotFoundError(NotFoundError, StorageError, FileNotFoundError):
    """No object under this key (idempotent callers catch it; readers say so)."""

    def __init__(self, message: str, hint: str | None = None, *, uri: str | None = None) -> None:
        StorageError.__init__(self, message, hint, uri=uri)


class BucketNotFoundError(ObjectNotFoundError):
    """The bucket itself does not exist (or this endpoint does not serve it)."""


class AccessDeniedError(StorageError, PermissionError):
    """The credentials in use may not do this operation on this bucket or key."""

    exit_code = EXIT_USAGE


class ConditionalWriteError(StorageError):
    """A create-only or compare-and-swap write lost: another writer created or changed the object."""

    def __init__(self, message: str, hint: str | None = None, *, uri: str | None = None,
                 current_etag: str | None = None) -> None:
        super().__init__(message, hint, uri=uri)
        self.current_etag = current_etag


class ConditionalWritesUnsupportedError(StorageError):
    """The endpoint accepts If-None-Match / If-Match on writes but does not enforce them."""

    exit_code = EXIT_USAGE


class IntegrityError(StorageError, ValueError):
    """Bytes stored or fetched do not match their recorded size or digest."""


class StorageUnavailableError(StorageError, ConnectionError):
    """Transient failures (5xx, throttling, dropped connections) outlasted the bounded retries."""


class UnsafeBundleError(StorageError, ValueError):
    """A code bundle holds a path that would land outside the folder it is extracted into."""
