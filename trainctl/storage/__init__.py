"""Object storage: one small interface (`Store`) over a local folder (`LocalStore`) and the S3 API
(`S3Store`, any endpoint), the layout of a session in storage (`RemoteSession`) and the code
bundle a cloud machine runs (`build_bundle`, `build_wheel`, `extract_bundle`).

    store = open_store("s3://my-bucket/trainctl", endpoint_url=None, region="us-east-1")
    store.put_file("checkpoints/ckpt.pt", path)     # verified before it returns
    store.put_json("latest.json", record, if_match=etag)

Importing this package loads neither boto3 nor the runtime's heavy parts; boto3 loads when an
S3 store first talks to its endpoint.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from .base import ObjectInfo, RetryPolicy, Store
from .errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConditionalWriteError,
    ConditionalWritesUnsupportedError,
    IntegrityError,
    ObjectNotFoundError,
    StorageConfigError,
    StorageDependencyError,
    StorageError,
    StorageUnavailableError,
    UnsafeBundleError,
)
from .local import LocalStore
from .uri import StorageURI, check_endpoint_url, parse_uri

if TYPE_CHECKING:
    from .bundle import Bundle, build_bundle, build_wheel, extract_bundle
    from .remote import RemoteSession, SegmentReader, SegmentWriter
    from .s3 import S3Store

_LAZY = {
    "S3Store": "trainctl.storage.s3",
    "RemoteSession": "trainctl.storage.remote", "SegmentWriter": "trainctl.storage.remote",
    "SegmentReader": "trainctl.storage.remote",
    "Bundle": "trainctl.storage.bundle", "build_bundle": "trainctl.storage.bundle",
    "build_wheel": "trainctl.storage.bundle", "extract_bundle": "trainctl.storage.bundle",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainctl.storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def open_store(uri: str | os.PathLike[str] | StorageURI, *, endpoint_url: str | None = None, region: str | None = None,
               checksums: str = "when_supported", **s3_options: Any) -> Store:
    """The store a URI names: `s3://bucket/prefix` (at `endpoint_url`, None for AWS),
    `file:///abs/path` or a plain path. Bad input is a UsageError naming the fix."""
    parsed = uri if isinstance(uri, StorageURI) else parse_uri(uri)
    if parsed.scheme == "file":
        assert parsed.path is not None
        return LocalStore(parsed.path)
    if endpoint_url:
        check_endpoint_url(endpoint_url)
    from .s3 import S3Store

    return S3Store(parsed.bucket, parsed.prefix, endpoint_url=endpoint_url or None, region=region or None,
                   checksums=checksums, **s3_options)


__all__ = [
    "AccessDeniedError", "BucketNotFoundError", "Bundle", "ConditionalWriteError",
    "ConditionalWritesUnsupportedError", "IntegrityError", "LocalStore", "ObjectInfo",
    "ObjectNotFoundError", "RemoteSession", "RetryPolicy", "S3Store", "SegmentReader", "SegmentWriter",
    "StorageConfigError", "StorageDependencyError", "StorageError", "StorageURI", "StorageUnavailableError",
    "Store", "UnsafeBundleError", "build_bundle", "build_wheel", "check_endpoint_url", "extract_bundle",
    "open_store", "parse_uri",
]
