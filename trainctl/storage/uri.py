"""Storage URIs: `s3://bucket/prefix`, `file:///abs/path` or a plain path, parsed and checked."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import UsageError

SCHEMES = ("s3://", "file://", "a local path")
# AWS's rules for new buckets (R2, MinIO and B2 follow them): 3-63 lowercase letters, digits,
# dots and hyphens, starting and ending with a letter or digit, not shaped like an IP address
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
EXAMPLE = "s3://my-bucket/trainctl"


@dataclass(frozen=True)
class StorageURI:
    """A parsed storage URI: `scheme` "s3" with `bucket` and `prefix`, or "file" with `path`."""

    scheme: str
    bucket: str = ""
    prefix: str = ""
    path: Path | None = None

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        assert self.path is not None
        return self.path.as_uri()

    def join(self, *parts: str) -> StorageURI:
        """The URI of a folder below this one (e.g. the project, then the session)."""
        clean = [p.strip("/") for p in parts if p.strip("/")]
        for part in clean:
            _check_parts(part, str(self))
        if self.scheme == "s3":
            return StorageURI("s3", self.bucket, "/".join([p for p in (self.prefix, *clean) if p]))
        assert self.path is not None
        return StorageURI("file", path=self.path.joinpath(*clean))


def _bad(uri: str, why: str, fix: str) -> UsageError:
    return UsageError(f"Storage URI {uri!r} {why}.", fix)


def _check_parts(prefix: str, uri: str) -> None:
    parts = prefix.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise _bad(uri, "has an empty, '.' or '..' part in its path",
                   f"Write the prefix as plain names joined by '/', e.g. {EXAMPLE}/project.")
    if any(ch in prefix for ch in ("\\", "\x00")) or any(ord(ch) < 32 for ch in prefix):
        raise _bad(uri, "has a backslash or a control character in its path", f"Use plain names, e.g. {EXAMPLE}.")


def parse_uri(uri: str | os.PathLike[str]) -> StorageURI:
    """Parse and check a storage URI; a bad one is a one-line UsageError naming the fix."""
    if isinstance(uri, os.PathLike):
        return StorageURI("file", path=Path(uri).expanduser().absolute())
    if not isinstance(uri, str) or not uri.strip():
        raise UsageError("Storage URI is empty.", f"Set it, e.g. storage = \"{EXAMPLE}\" under [cloud] in trainctl.toml.")
    if uri != uri.strip():
        raise _bad(uri, "has leading or trailing spaces", "Remove them.")
    if "://" not in uri:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
            raise _bad(uri, "looks like a URI without '//'", f"Write it as {EXAMPLE} or file:///abs/path.")
        return StorageURI("file", path=Path(uri).expanduser().absolute())
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in ("s3", "file"):
        raise _bad(uri, f"uses the unsupported scheme '{scheme}://'",
                   f"Valid: {', '.join(SCHEMES)} (S3-compatible stores such as R2, MinIO or B2 use s3:// "
                   "with endpoint_url).")
    parts = urlsplit(uri)
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise _bad(uri, "has a query or fragment ('?' or '#')", f"Remove it: {uri.split('?')[0].split('#')[0]}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise _bad(uri, f"names the host '{parts.netloc}'",
                       "file:// URIs name a local folder: file:///abs/path (three slashes).")
        if not parts.path.startswith("/"):
            raise _bad(uri, "names no folder", "Write file:///abs/path.")
        return StorageURI("file", path=Path(unquote(parts.path)))
    bucket = uri[len("s3://"):].split("/", 1)[0]
    prefix = uri[len("s3://") + len(bucket):].strip("/") if "/" in uri[len("s3://"):] else ""
    if not bucket:
        raise _bad(uri, "names no bucket", f"Write it as {EXAMPLE}.")
    if ":" in bucket or "@" in bucket:
        raise _bad(uri, f"has a host or credentials ('{bucket}') where the bucket goes",
                   "Put the bucket name after s3:// and the server in endpoint_url under [cloud].")
    if not _BUCKET_RE.match(bucket) or ".." in bucket or _IP_RE.match(bucket):
        raise _bad(uri, f"has an invalid bucket name '{bucket}'",
                   "Bucket names are 3-63 lowercase letters, digits, dots or hyphens, starting and ending with a "
                   "letter or digit.")
    inner = uri[len("s3://") + len(bucket):]
    if inner.startswith("//") or "//" in inner.rstrip("/"):
        raise _bad(uri, "has an empty part in its path ('//')", f"Write the prefix as plain names, e.g. {EXAMPLE}/project.")
    if prefix:
        _check_parts(prefix, uri)
    return StorageURI("s3", bucket, prefix)


def check_endpoint_url(endpoint_url: str) -> str:
    """An endpoint is an http(s) URL with a host: 'https://<account>.r2.cloudflarestorage.com'."""
    parts = urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"endpoint_url {endpoint_url!r} is not an http(s) URL with a host.",
                         "Write it as https://host[:port], e.g. https://<account>.r2.cloudflarestorage.com.")
    return endpoint_url
