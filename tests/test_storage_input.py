"""Bad storage input, row by row: each gives one line naming the problem and the fix, a stable
exit code through the CLI, no traceback, nothing on disk changed."""

from __future__ import annotations

import pytest

from trainctl.errors import EXIT_USAGE, UsageError
from trainctl.storage import open_store, parse_uri

from .conftest import run_cli

BAD_URIS = [
    # (uri, message fragment, hint fragment)
    ("", "Storage URI is empty", "storage = "),
    ("   ", "Storage URI is empty", "s3://my-bucket"),
    (" s3://bucket-a/x", "leading or trailing spaces", "Remove"),
    ("gs://bucket-a/x", "unsupported scheme 'gs://'", "s3://"),
    ("https://bucket-a.s3.amazonaws.com/x", "unsupported scheme 'https://'", "endpoint_url"),
    ("s3:bucket-a/x", "without '//'", "s3://my-bucket"),
    ("s3://", "names no bucket", "s3://my-bucket"),
    ("s3:///prefix", "names no bucket", "s3://my-bucket"),
    ("s3://Bucket_A/x", "invalid bucket name 'Bucket_A'", "3-63 lowercase"),
    ("s3://ab", "invalid bucket name 'ab'", "3-63"),
    ("s3://-bucket/x", "invalid bucket name", "starting and ending"),
    ("s3://bucket..a/x", "invalid bucket name", "lowercase"),
    ("s3://192.168.1.10/x", "invalid bucket name", "lowercase"),
    ("s3://localhost:9000/bucket", "has a host or credentials", "endpoint_url"),
    ("s3://key:secret@bucket/x", "has a host or credentials", "endpoint_url"),
    ("s3://bucket-a//x", "empty part", "plain names"),
    ("s3://bucket-a/a/../b", "'..' part", "plain names"),
    ("s3://bucket-a/a/./b", "'.' or '..' part", "plain names"),
    ("s3://bucket-a/x?versionId=1", "query or fragment", "s3://bucket-a/x"),
    ("s3://bucket-a/x#frag", "query or fragment", "Remove"),
    ("file://host/path", "names the host 'host'", "file:///abs/path"),
    ("file://", "names no folder", "file:///abs/path"),
]


@pytest.mark.parametrize(("uri", "message", "hint"), BAD_URIS, ids=[repr(r[0]) for r in BAD_URIS])
def test_bad_storage_uris(uri, message, hint):
    with pytest.raises(UsageError) as caught:
        parse_uri(uri)
    assert message in caught.value.message and "\n" not in caught.value.message
    assert hint in caught.value.hint and caught.value.exit_code == EXIT_USAGE


GOOD_URIS = [
    ("s3://my-bucket", "s3", "my-bucket", ""),
    ("s3://my-bucket/", "s3", "my-bucket", ""),
    ("s3://my.bucket-1/a/b/", "s3", "my.bucket-1", "a/b"),
    ("S3://my-bucket/p", "s3", "my-bucket", "p"),
]


@pytest.mark.parametrize(("uri", "scheme", "bucket", "prefix"), GOOD_URIS)
def test_good_storage_uris(uri, scheme, bucket, prefix):
    parsed = parse_uri(uri)
    assert (parsed.scheme, parsed.bucket, parsed.prefix) == (scheme, bucket, prefix)
    assert parse_uri(str(parsed)) == parsed


def test_local_uris_and_joining(tmp_path):
    assert parse_uri(f"file://{tmp_path}/store").path == tmp_path / "store"
    assert parse_uri("relative/folder").path.is_absolute()
    assert str(parse_uri("s3://my-bucket/base").join("proj", "20260101-000000-abc123")) == \
        "s3://my-bucket/base/proj/20260101-000000-abc123"
    with pytest.raises(UsageError, match=r"'\.\.' part"):
        parse_uri("s3://my-bucket/base").join("..")


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"endpoint_url": "127.0.0.1:9000"}, "not an http(s) URL"),
    ({"endpoint_url": "ftp://host"}, "not an http(s) URL"),
    ({"endpoint_url": "https://"}, "not an http(s) URL"),
    ({"checksums": "always"}, "is not a checksum mode"),
    ({"part_size_mb": 4}, "below S3's 5 MiB"),
])
def test_bad_store_options(kwargs, fragment):
    with pytest.raises(UsageError) as caught:
        open_store("s3://my-bucket/x", **kwargs)
    assert fragment in caught.value.message and caught.value.hint


BAD_CONFIG = [
    # (trainctl.toml, message fragment with its line)
    ('[cloud]\nstorage = "gs://bucket-a"\n', "trainctl.toml:2: Storage URI 'gs://bucket-a' uses the unsupported scheme"),
    ('[cloud]\nregion = "us-east-1"\nstorage = "s3://Bad_Bucket"\n', "trainctl.toml:3: Storage URI 's3://Bad_Bucket' has an invalid bucket name"),
    ('[cloud]\nendpoint_url = "r2.example.com"\n', "trainctl.toml:2: endpoint_url 'r2.example.com' is not an http(s) URL"),
    ('[cloud]\nchecksums = "sometimes"\n', "trainctl.toml:2: 'cloud.checksums' must be one of when_supported, when_required"),
    ('[cloud]\nstorage = 3\n', "trainctl.toml:2: 'cloud.storage' must be a string"),
    ('[cloud]\nstorag = "s3://bucket-a"\n', "Did you mean 'storage'?"),
]


@pytest.mark.parametrize(("toml", "fragment"), BAD_CONFIG, ids=["scheme", "bucket", "endpoint", "checksums", "type", "typo"])
def test_bad_cloud_config(project, toml, fragment):
    (project / "trainctl.toml").write_text(toml)
    before = sorted(p.name for p in project.rglob("*"))
    r = run_cli(["sessions", "list"], project)
    assert r.returncode == EXIT_USAGE, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("error:") == 1
    assert sorted(p.name for p in project.rglob("*")) == before


def test_good_cloud_config_is_read(project):
    from trainctl import config

    (project / "trainctl.toml").write_text('[cloud]\nstorage = "s3://my-bucket/runs"\n'
                                           'endpoint_url = "https://acct.r2.cloudflarestorage.com"\n'
                                           'region = "auto"\nchecksums = "when_required"\n')
    loaded = config.load(project)
    assert loaded.get("cloud", "storage") == "s3://my-bucket/runs"
    assert loaded.resolved()["cloud"] == {"storage": "s3://my-bucket/runs",
                                          "endpoint_url": "https://acct.r2.cloudflarestorage.com",
                                          "region": "auto", "checksums": "when_required", "budget_usd": 0}
    store = open_store(loaded.get("cloud", "storage"), endpoint_url=loaded.get("cloud", "endpoint_url"),
                       region=loaded.get("cloud", "region"), checksums=loaded.get("cloud", "checksums"))
    assert store.uri == "s3://my-bucket/runs/" and store.checksums == "when_required"
    assert 'checksums = "when_supported"' in config.template()
