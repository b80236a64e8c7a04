"""`S3Store`: the storage interface over the S3 API through boto3 (AWS S3, Cloudflare R2, MinIO,
Backblaze B2, RunPod's network-volume S3 API: anything `endpoint_url` names).

boto3 is imported on first use (`pip install 'trainctl[aws]'`). What this adds to boto3:

- **Integrity.** Every object carries trainctl's digest (``x-amz-meta-trainctl-sha256``) and a
  random writer token; an upload counts once a HEAD shows the size, digest and token it sent.
  In transit, each request body is checked by the store: CRC32 checksums when
  ``checksums="when_supported"`` (boto3's default since 1.36), Content-MD5 when
  ``"when_required"`` (for stores that reject the CRC headers, boto3 #4392 / s3transfer #327;
  every S3 implementation checks Content-MD5). Downloads are re-digested before they count.
- **Multipart with resume.** Files over `part_size_mb` (default 16 MiB: a failed part costs at
  most 16 MiB again; 64 requests per GB; up to 160 GB before the 10,000-part limit makes parts
  bigger) go up in parts, `max_concurrency` at a time. The upload id is recorded under
  `upload_state_dir`; the next `put_file` of the same file (same size and digest) lists the
  parts already stored and sends only those missing or not matching (ETag = MD5 of the part, or
  its CRC32). A bucket lifecycle rule `AbortIncompleteMultipartUpload` cleans up uploads that
  are never resumed.
- **Conditional writes** (``If-None-Match: *``, ``If-Match: etag``) with a one-time probe per
  endpoint and bucket that the store enforces them (S3 ignored them before 2024, and so do
  some compatible stores), and a read-back of the writer token after each, so a store that
  checks-then-writes without a lock (moto's server does) still yields one winner in practice.
  A retried conditional write whose first attempt did land is recognised by its token.
- **Bounded retries** with exponential backoff and jitter for 5xx, throttling, 409
  ConditionalRequestConflict and dropped connections (botocore's own retries are off, so the
  bound is one number); an interrupted download resumes with a Range request pinned to the etag.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import TrainctlError
from .base import (
    CHUNK_BYTES,
    ObjectInfo,
    RetryPolicy,
    Store,
    check_conditions,
    check_digest,
    check_key,
    check_prefix,
    describe_error,
    same_etag,
    sha256_bytes,
    sha256_file,
    with_retries,
)
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
)

CHECKSUM_MODES = ("when_supported", "when_required")
META_DIGEST = "trainctl-sha256"
META_WRITER = "trainctl-writer"
MAX_PARTS = 10_000
MIN_PART_BYTES = 5 << 20
INSTALL_HINT = "Install with: pip install 'trainctl[aws]'"

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "ConditionalRequestConflict", "OperationAborted"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                 "InvalidToken", "ExpiredToken", "AccountProblem", "403", "Forbidden"}
_probed: set[tuple[str, str]] = set()
_probe_lock = threading.Lock()


def _boto3() -> Any:
    try:
        import boto3
    except ImportError as e:
        raise StorageDependencyError("s3:// storage needs boto3, which is not installed.", INSTALL_HINT) from e
    return boto3


def _error_code(e: BaseException) -> tuple[str, int]:
    response = getattr(e, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(e: BaseException) -> bool:
    """5xx (but 501), throttling, 409 conflicts of concurrent conditional writes, dropped or
    timed-out connections: worth another try."""
    from botocore import exceptions as bex

    if isinstance(e, (bex.ConnectionError, bex.HTTPClientError, bex.ResponseStreamingError,
                      bex.IncompleteReadError, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, bex.ClientError):
        code, status = _error_code(e)
        return code in _TRANSIENT_CODES or (status >= 500 and status != 501) or status == 429
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, Urllib3Error)


class S3Store(Store):
    """Objects under `s3://bucket/prefix/` at `endpoint_url` (None: AWS)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, checksums: str = "when_supported", part_size_mb: int = 16,
                 max_concurrency: int = 4, retry: RetryPolicy | None = None,
                 upload_state_dir: str | os.PathLike[str] | None = None) -> None:
        from ..errors import UsageError

        if checksums not in CHECKSUM_MODES:
            raise UsageError(f"checksums={checksums!r} is not a checksum mode.",
                             f"Valid: {', '.join(CHECKSUM_MODES)}.")
        if part_size_mb < 5:
            raise UsageError(f"part_size_mb={part_size_mb} is below S3's 5 MiB minimum part.", "Use 5 or more.")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.checksums = checksums
        self.part_size = part_size_mb << 20
        self.multipart_threshold = self.part_size
        self.max_concurrency = max(1, max_concurrency)
        self.retry = retry or RetryPolicy()
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.upload_state_dir = Path(upload_state_dir) if upload_state_dir else cache / "trainctl" / "uploads"
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._client_obj: Any = None
        self._client_lock = threading.Lock()

    # --- client and errors ---------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use; thread-safe once created)."""
        if self._client_obj is None:
            with self._client_lock:
                if self._client_obj is None:
                    boto3 = _boto3()
                    from botocore.config import Config

                    config = Config(
                        region_name=self.region,
                        retries={"total_max_attempts": 1, "mode": "standard"},  # ours are the retries
                        request_checksum_calculation=self.checksums,
                        response_checksum_validation=self.checksums,
                        max_pool_connections=self.max_concurrency + 4,
                        connect_timeout=10, read_timeout=120,
                        s3={"addressing_style": "path"} if self.endpoint_url else None,
                    )
                    session = boto3.session.Session()
                    self._client_obj = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client_obj

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _where(self) -> str:
        return f"s3://{self.bucket}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def _translate(self, e: Exception, key: str | None, what: str) -> StorageError:
        """A third-party exception as the typed error a user can act on."""
        from botocore import exceptions as bex

        url = self.url(key) if key else self.uri
        if isinstance(e, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return StorageConfigError(
                f"No usable credentials for {self._where()} ({describe_error(e)}).",
                "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); keys of R2, B2 or "
                "MinIO go in the same variables.", uri=url)
        if isinstance(e, bex.FlexibleChecksumError):
            return IntegrityError(f"{url}: the bytes received do not match the store's checksum ({describe_error(e)}).",
                                  "The data was damaged in transit or at rest; download it again.", uri=url)
        if isinstance(e, bex.ParamValidationError):
            return StorageConfigError(f"{what} was refused by the S3 client: {describe_error(e)}",
                                      "Check the bucket name and key.", uri=url)
        if isinstance(e, bex.ClientError):
            code, status = _error_code(e)
            message = e.response.get("Error", {}).get("Message", "") if hasattr(e, "response") else ""
            if code == "NoSuchBucket":
                return self._bucket_missing(url)
            if code in ("NoSuchKey", "NotFound") or (status == 404 and code in ("404", "")):
                return ObjectNotFoundError(f"No object {url}.", "Check the key; list the prefix to see what is there.",
                                           uri=url)
            if code == "NoSuchUpload":
                return ObjectNotFoundError(f"The multipart upload of {url} no longer exists.",
                                           "It was completed or aborted elsewhere; upload the file again.", uri=url)
            if code in _DENIED_CODES or status == 403:
                return AccessDeniedError(
                    f"Access denied: {what} on {url} ({code or status}).",
                    "Check the credentials in use (AWS_PROFILE / AWS_ACCESS_KEY_ID) and that their policy allows "
                    "s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket on this bucket and prefix "
                    "(without ListBucket, a missing key also reads as denied).", uri=url)
            if code == "PreconditionFailed" or status == 412:
                return ConditionalWriteError(f"{url} was created or changed by another writer ({what} refused).",
                                             "Read it again; only one writer may own this object.", uri=url)
            if code in ("BadDigest", "InvalidDigest") or code.endswith("ChecksumMismatch"):
                return IntegrityError(f"{url}: the store received bytes that do not match their checksum ({code}).",
                                      "The data was damaged in transit; retry the upload.", uri=url)
            if status == 501 or (status == 400 and "checksum" in (message + code).lower()):
                return StorageConfigError(
                    f"{self._where()} refused {what}: {code} {message}".rstrip(),
                    'If it names a checksum header, set checksums = "when_required" under [cloud] in trainctl.toml '
                    "for this endpoint.", uri=url)
            return StorageError(f"{what} on {url} failed: {code or status} {message}".rstrip(),
                                "Check the endpoint, bucket and credentials.", uri=url)
        return StorageError(f"{what} on {url} failed: {describe_error(e)}", "Check the endpoint and the network.",
                            uri=url)

    def _call(self, what: str, key: str | None, fn: Callable[[], Any]) -> Any:
        """`fn` with bounded retries; what it raises, as a typed error."""
        _ = self.client  # without boto3: StorageDependencyError, before anything else
        url = self.url(key) if key else self.uri
        try:
            return with_retries(fn, policy=self.retry, is_transient=is_transient, what=f"{what} of {url}", uri=url)
        except TrainctlError:
            raise
        except Exception as e:
            raise self._translate(e, key, what) from e

    def _missing(self, key: str) -> ObjectNotFoundError:
        """Not found after a HEAD (which cannot tell): say whether the bucket itself is missing."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            if _error_code(e)[1] == 404:
                return self._bucket_missing(self.url(key))
        return ObjectNotFoundError(f"No object {self.url(key)}.", "Check the key; list the prefix to see what is there.",
                                   uri=self.url(key))

    def _bucket_missing(self, url: str) -> BucketNotFoundError:
        return BucketNotFoundError(
            f"Bucket '{self.bucket}' does not exist{' at ' + self.endpoint_url if self.endpoint_url else ''}.",
            f"Create it (aws s3 mb s3://{self.bucket}), or fix [cloud] storage / endpoint_url in trainctl.toml.",
            uri=url)

    # --- metadata ------------------------------------------------------------------------------
    def _info(self, key: str, response: dict[str, Any]) -> ObjectInfo:
        meta = response.get("Metadata") or {}
        modified = response.get("LastModified")
        return ObjectInfo(key, int(response.get("ContentLength", response.get("Size", 0))), response.get("ETag", ""),
                          meta.get(META_DIGEST), modified.timestamp() if modified is not None else None)

    def _head_raw(self, key: str) -> dict[str, Any] | None:
        from botocore import exceptions as bex

        def call() -> dict[str, Any] | None:
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            except bex.ClientError as e:
                if _error_code(e)[1] == 404:
                    return None
                raise

        return self._call("HEAD", key, call)

    def head(self, key: str) -> ObjectInfo | None:
        raw = self._head_raw(key)
        return None if raw is None else self._info(key, raw)

    def _verify_stored(self, key: str, size: int, digest: str, token: str, *, conditional: bool,
                       put_etag: str | None = None) -> ObjectInfo:
        """The object counts only if the store now holds what this writer sent. A conditional
        write the store accepted (`put_etag`) counts even when another conditional write already
        followed it: that writer read this one first (a compare-and-swap counter moved on), and
        the store checked its bytes against the MD5 sent with it."""
        raw = self._head_raw(key)
        meta = (raw or {}).get("Metadata") or {}
        if raw is None or meta.get(META_WRITER) != token:
            if conditional and put_etag:
                return ObjectInfo(key, size, put_etag, digest, None)
            if conditional:
                raise ConditionalWriteError(
                    f"{self.url(key)} was replaced by another writer right after this write.",
                    "Only one writer may own this object; stop writing it.", uri=self.url(key),
                    current_etag=raw.get("ETag") if raw else None)
            raise IntegrityError(f"{self.url(key)} is not the object just uploaded (another write replaced it).",
                                 "Two processes are writing this key; make one of them stop.", uri=self.url(key))
        if int(raw["ContentLength"]) != size or meta.get(META_DIGEST) != digest:
            raise IntegrityError(
                f"{self.url(key)} holds {raw['ContentLength']} bytes with digest {meta.get(META_DIGEST)}; "
                f"{size} bytes with {digest} were sent.",
                "The upload did not arrive whole; upload it again.", uri=self.url(key))
        return self._info(key, raw)

    # --- small objects -------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, if_none_match: str | None = None,
                  if_match: str | None = None) -> ObjectInfo:
        check_conditions(if_none_match, if_match)
        conditional = if_none_match is not None or if_match is not None
        if conditional:
            self.check_conditional_writes()
        digest = sha256_bytes(data)
        token = os.urandom(8).hex()
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key), "Body": data,
                                  "Metadata": {META_DIGEST: digest, META_WRITER: token},
                                  "ContentMD5": _md5_b64(data),
                                  "ContentType": "application/json" if key.endswith(".json") else "application/octet-stream"}
        if if_none_match is not None:
            kwargs["IfNoneMatch"] = if_none_match
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        attempts = 0

        def put() -> Any:
            nonlocal attempts
            attempts += 1
            return self.client.put_object(**kwargs)

        response: Any = None
        try:
            response = self._call("PUT", key, put)
        except ConditionalWriteError as e:
            # a retried conditional write is refused when its first attempt landed and only the
            # response was lost: the writer token tells
            raw = self._head_raw(key) if attempts > 1 else None
            if raw is None or (raw.get("Metadata") or {}).get(META_WRITER) != token:
                e.current_etag = raw.get("ETag") if raw else e.current_etag
                raise
        except ObjectNotFoundError as e:
            if if_match is None:
                raise
            raise ConditionalWriteError(f"{self.url(key)} no longer exists (expected etag {if_match}).",
                                        "Another writer deleted it; read it again before writing.",
                                        uri=self.url(key)) from e
        return self._verify_stored(key, len(data), digest, token, conditional=conditional,
                                   put_etag=(response or {}).get("ETag") if attempts == 1 else None)

    def get_bytes(self, key: str) -> tuple[bytes, ObjectInfo]:
        def get() -> tuple[bytes, dict[str, Any]]:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            body = response["Body"]  # its `with` yields the raw stream, skipping botocore's checks
            try:
                return body.read(), response
            finally:
                body.close()

        data, response = self._call("GET", key, get)
        info = self._info(key, response)
        if len(data) != info.size or (info.sha256 and sha256_bytes(data) != info.sha256):
            raise IntegrityError(f"{self.url(key)} does not match its recorded size or digest.",
                                 "The object is damaged or was replaced by something else; write it again.",
                                 uri=self.url(key))
        return data, info

    def check_conditional_writes(self) -> None:
        """Once per endpoint and bucket: the store must refuse a second create-only write and a
        write against a wrong etag; a store that accepts both would let two writers own a session."""
        ident = (self.endpoint_url or "aws", self.bucket)
        with _probe_lock:
            if ident in _probed:
                return
            key = f".trainctl-probe-{os.urandom(6).hex()}"
            full = self._full(key)
            put = self.client.put_object
            try:
                self._call("PUT", key, lambda: put(Bucket=self.bucket, Key=full, Body=b"1", IfNoneMatch="*"))
                enforced = 0
                for extra in ({"IfNoneMatch": "*"}, {"IfMatch": '"' + "0" * 32 + '"'}):
                    try:
                        self._call("PUT", key, lambda extra=extra: put(Bucket=self.bucket, Key=full, Body=b"2", **extra))
                    except ConditionalWriteError:
                        enforced += 1
            except StorageConfigError as e:
                raise self._unsupported(describe_error(e)) from e
            finally:
                try:
                    self.delete(key)
                except StorageError:
                    pass
            if enforced != 2:
                raise self._unsupported("a second create-only write, or a write against a wrong etag, was accepted")
            _probed.add(ident)

    def _unsupported(self, detail: str) -> ConditionalWritesUnsupportedError:
        return ConditionalWritesUnsupportedError(
            f"{self._where()} does not enforce conditional writes (If-None-Match / If-Match): {detail}.",
            "trainctl needs them to keep one writer per session: use AWS S3, Cloudflare R2, MinIO (2024 or "
            "newer) or another store that supports them.", uri=self.uri)

    # --- files ---------------------------------------------------------------------------------
    def put_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        check_digest(sha256)
        check_key(key)
        path = Path(path)
        try:
            before = os.stat(path)
        except OSError as e:
            raise StorageError(f"Cannot upload {path}: {e.strerror or e}.", "Check the path.",
                               uri=self.url(key)) from e
        if not stat.S_ISREG(before.st_mode):
            raise StorageError(f"Cannot upload {path}: not a file.", "Check the path.", uri=self.url(key))
        if before.st_size <= self.multipart_threshold:
            data = path.read_bytes()
            digest = sha256_bytes(data)
            if sha256 is not None and digest != sha256:
                raise IntegrityError(f"{path} does not match the expected digest ({digest[:19]}... != {sha256[:19]}...).",
                                     "The file changed after its digest was taken.", uri=self.url(key))
            token = os.urandom(8).hex()
            self._call("PUT", key, lambda: self.client.put_object(
                Bucket=self.bucket, Key=self._full(key), Body=data, ContentMD5=_md5_b64(data),
                Metadata={META_DIGEST: digest, META_WRITER: token}))
            _check_unchanged(path, before, self.url(key))
            return self._verify_stored(key, len(data), digest, token, conditional=False)
        # the digest goes into the object's metadata when the upload is created, so it is taken
        # first (one read of the file, mostly from the page cache after a checkpoint write)
        digest = sha256_file(path)[0]
        if sha256 is not None and digest != sha256:
            raise IntegrityError(f"{path} does not match the expected digest ({digest[:19]}... != {sha256[:19]}...).",
                                 "The file changed after its digest was taken.", uri=self.url(key))
        return _MultipartUpload(self, key, path, before, digest).run()

    def get_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        check_digest(sha256)
        from ..fsutil import fsync_dir, temp_beside

        raw = self._head_raw(key)
        if raw is None:
            raise self._missing(key)
        info = self._info(key, raw)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with temp_beside(dest) as tmp:
            digest = self._download(key, info, tmp)
            for want in (info.sha256, sha256):
                if want and digest != want:
                    raise IntegrityError(
                        f"Download of {self.url(key)} does not match its digest ({digest[:19]}... != {want[:19]}...).",
                        f"The stored object is damaged or was replaced; nothing was written to {dest}. "
                        "Upload it again from a good copy.", uri=self.url(key))
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return ObjectInfo(key, info.size, info.etag, digest, info.modified_s)

    def _download(self, key: str, info: ObjectInfo, tmp: Path) -> str:
        """Stream the object into `tmp`, hashing; a dropped connection resumes with a Range
        request pinned to the etag (a replaced object fails instead of mixing versions)."""
        h = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb", buffering=0) as out:
            offset = 0

            def fetch_rest() -> None:
                nonlocal offset
                if offset >= info.size and info.size > 0:
                    return
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key), "IfMatch": info.etag}
                if offset:
                    kwargs["Range"] = f"bytes={offset}-"
                body = self.client.get_object(**kwargs)["Body"]
                try:
                    for chunk in body.iter_chunks(CHUNK_BYTES):
                        out.write(chunk)
                        h.update(chunk)
                        offset += len(chunk)
                finally:
                    body.close()
                if offset != info.size:
                    raise ConnectionError(f"the body ended at {offset} of {info.size} bytes")

            try:
                self._call("GET", key, fetch_rest)
            except ConditionalWriteError as e:
                raise IntegrityError(f"{self.url(key)} was replaced while it downloaded.",
                                     "Download it again.", uri=self.url(key)) from e
            os.fsync(out.fileno())
        if offset != info.size:
            raise IntegrityError(f"Download of {self.url(key)} got {offset} of {info.size} bytes.",
                                 "Download it again.", uri=self.url(key))
        return "sha256:" + h.hexdigest()

    # --- listing, deleting ---------------------------------------------------------------------
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        found: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("LIST", prefix or None, lambda kwargs=kwargs: self.client.list_objects_v2(**kwargs))
            for item in page.get("Contents", []):
                found.append(self._info(item["Key"][len(self.prefix):], item))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        self._call("DELETE", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._full(key)))


def _md5_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _crc32_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _check_unchanged(path: Path, before: os.stat_result, url: str) -> None:
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise IntegrityError(f"{path} changed while it was uploaded to {url}.",
                             "Something is still writing it; upload it once it is complete.", uri=url)


class _MultipartUpload:
    """One multipart upload of a file, resumable from its record in `upload_state_dir`."""

    def __init__(self, store: S3Store, key: str, path: Path, before: os.stat_result, digest: str) -> None:
        self.store, self.key, self.path, self.before, self.digest = store, key, path, before, digest
        self.size = before.st_size
        self.part_size = max(store.part_size, -(-self.size // MAX_PARTS))
        self.part_count = -(-self.size // self.part_size)
        name = hashlib.sha256(f"{store.endpoint_url}|{store.bucket}|{store._full(key)}".encode()).hexdigest()[:32]
        self.record_path = store.upload_state_dir / f"{name}.json"

    @property
    def client(self) -> Any:
        return self.store.client

    def _ids(self) -> dict[str, Any]:
        return {"Bucket": self.store.bucket, "Key": self.store._full(self.key)}

    def run(self) -> ObjectInfo:
        upload_id, token, stored = self._resume() or (*self._create(), {})
        try:
            parts = self._upload_parts(upload_id, stored)
            _check_unchanged(self.path, self.before, self.store.url(self.key))
            self._complete(upload_id, parts, token)
        except (IntegrityError, ObjectNotFoundError):
            self._abort(upload_id)  # these won't get better by resuming
            raise
        self._forget()
        return self.store._verify_stored(self.key, self.size, self.digest, token, conditional=False)

    # the record of an upload in progress ------------------------------------------------------
    def _resume(self) -> tuple[str, str, dict[int, dict[str, Any]]] | None:
        try:
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        same = (record.get("sha256") == self.digest and record.get("size") == self.size
                and record.get("part_size") == self.part_size and record.get("checksums") == self.store.checksums)
        if not same:
            self._abort(record.get("upload_id"))
            return None
        try:
            stored = self._list_parts(record["upload_id"])
        except ObjectNotFoundError:
            self._forget()
            return None
        return record["upload_id"], record["writer"], stored

    def _create(self) -> tuple[str, str]:
        token = os.urandom(8).hex()
        kwargs: dict[str, Any] = {**self._ids(), "Metadata": {META_DIGEST: self.digest, META_WRITER: token}}
        if self.store.checksums == "when_supported":
            kwargs["ChecksumAlgorithm"] = "CRC32"
        response = self.store._call("CreateMultipartUpload", self.key,
                                    lambda: self.client.create_multipart_upload(**kwargs))
        upload_id = response["UploadId"]
        from ..fsutil import atomic_write_json

        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record_path, {"upload_id": upload_id, "writer": token, "sha256": self.digest,
                                             "size": self.size, "part_size": self.part_size,
                                             "checksums": self.store.checksums, "uri": self.store.url(self.key),
                                             "file": str(self.path)}, sync_dir=False)
        return upload_id, token

    def _forget(self) -> None:
        try:
            os.unlink(self.record_path)
        except FileNotFoundError:
            pass

    def _abort(self, upload_id: str | None) -> None:
        self._forget()
        if not upload_id:
            return
        try:
            self.client.abort_multipart_upload(**self._ids(), UploadId=upload_id)
        except Exception:
            pass  # best effort: a lifecycle rule removes what is left

    def _list_parts(self, upload_id: str) -> dict[int, dict[str, Any]]:
        stored: dict[int, dict[str, Any]] = {}
        marker = 0
        while True:
            page = self.store._call("ListParts", self.key, lambda marker=marker: self.client.list_parts(
                **self._ids(), UploadId=upload_id, PartNumberMarker=marker))
            for part in page.get("Parts", []):
                stored[int(part["PartNumber"])] = part
            if not page.get("IsTruncated"):
                return stored
            marker = int(page["NextPartNumberMarker"])

    # the parts --------------------------------------------------------------------------------
    def _upload_parts(self, upload_id: str, stored: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            def one(number: int) -> dict[str, Any]:
                offset = (number - 1) * self.part_size
                data = os.pread(fd, min(self.part_size, self.size - offset), offset)
                reused = self._reusable(stored.get(number), data)
                return reused if reused is not None else self._send(upload_id, number, data)

            pool = ThreadPoolExecutor(max_workers=self.store.max_concurrency, thread_name_prefix="trainctl-upload")
            try:
                futures = [pool.submit(one, number) for number in range(1, self.part_count + 1)]
                return [future.result() for future in futures]
            finally:
                # on a failure, parts not started yet are dropped; those in flight finish (and
                # count for the resume)
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            os.close(fd)

    def _reusable(self, part: dict[str, Any] | None, data: bytes) -> dict[str, Any] | None:
        """A part stored by an interrupted run counts only if it holds these very bytes."""
        if part is None or int(part.get("Size", -1)) != len(data):
            return None
        crc = part.get("ChecksumCRC32")
        if crc is not None:
            matches = crc == _crc32_b64(data)
        else:
            matches = same_etag(part.get("ETag"), hashlib.md5(data, usedforsecurity=False).hexdigest())
        if not matches:
            return None
        out = {"PartNumber": int(part["PartNumber"]), "ETag": part["ETag"]}
        if crc is not None:
            out["ChecksumCRC32"] = crc
        return out

    def _send(self, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        kwargs: dict[str, Any] = {**self._ids(), "UploadId": upload_id, "PartNumber": number, "Body": data}
        if self.store.checksums == "when_supported":
            kwargs["ChecksumCRC32"] = _crc32_b64(data)
        else:
            kwargs["ContentMD5"] = _md5_b64(data)
        response = self.store._call(f"UploadPart {number}/{self.part_count}", self.key,
                                    lambda: self.client.upload_part(**kwargs))
        out = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumCRC32" in kwargs:
            out["ChecksumCRC32"] = response.get("ChecksumCRC32") or kwargs["ChecksumCRC32"]
        return out

    def _complete(self, upload_id: str, parts: list[dict[str, Any]], token: str) -> None:
        def complete() -> Any:
            try:
                return self.client.complete_multipart_upload(**self._ids(), UploadId=upload_id,
                                                             MultipartUpload={"Parts": parts})
            except Exception as e:
                # a retried complete after a lost response: the upload is gone, the object is ours
                if _error_code(e)[0] == "NoSuchUpload":
                    raw = self.store._head_raw(self.key)
                    if raw is not None and (raw.get("Metadata") or {}).get(META_WRITER) == token:
                        return raw
                raise

        self.store._call("CompleteMultipartUpload", self.key, complete)
