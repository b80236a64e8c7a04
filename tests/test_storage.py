"""The storage contract, run over every implementation: a local folder and the S3 API against
moto's server on 127.0.0.1 (both checksum modes). S3-only behaviour (multipart resume,
retries, conditional-write probing, error messages) goes through a fault-injecting proxy in
front of moto: real HTTP failures, nothing of trainctl's replaced."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from trainctl.errors import UsageError
from trainctl.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    ConditionalWriteError,
    ConditionalWritesUnsupportedError,
    IntegrityError,
    LocalStore,
    ObjectNotFoundError,
    RetryPolicy,
    StorageConfigError,
    StorageDependencyError,
    StorageError,
    StorageUnavailableError,
    open_store,
)
from trainctl.storage.s3 import S3Store

from .servers import Rule, make_s3_store

FAST_RETRY = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05)
MB = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_s3(endpoint: str, bucket: str, tmp_path: Path, **kw) -> S3Store:
    return make_s3_store(endpoint, bucket, tmp_path / "upload-state", retry=FAST_RETRY, **kw)


@pytest.fixture(params=["local", "s3", "s3-when-required"])
def store(request, tmp_path):  # the contract also runs in the checksum mode for picky endpoints
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    moto = request.getfixturevalue("moto_server")
    bucket = request.getfixturevalue("s3_bucket")
    checksums = "when_required" if request.param.endswith("when-required") else "when_supported"
    return make_s3(moto.endpoint_url, bucket, tmp_path, checksums=checksums)


@pytest.fixture
def proxied(fault_proxy, s3_bucket, tmp_path):
    """An S3Store whose requests go through the fault proxy."""
    return make_s3(fault_proxy.url, s3_bucket, tmp_path)


def random_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    data = bytes(b ^ (i % 251) for i, b in enumerate(data[:4096])) + data[4096:]
    path.write_bytes(data)
    return data


# --- the contract ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1000, 11 * MB + 123], ids=["empty", "small", "multipart"])
def test_file_round_trip_is_verified(store, tmp_path, size):
    data = random_file(tmp_path / "src.bin", size)
    info = store.put_file("checkpoints/ckpt.pt", tmp_path / "src.bin")
    assert (info.key, info.size, info.sha256) == ("checkpoints/ckpt.pt", size, sha(data))
    head = store.head("checkpoints/ckpt.pt")
    assert head is not None and (head.size, head.sha256, head.etag) == (size, sha(data), info.etag)
    got = store.get_file("checkpoints/ckpt.pt", tmp_path / "out" / "back.pt", sha256=sha(data))
    assert (tmp_path / "out" / "back.pt").read_bytes() == data and got.sha256 == sha(data)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["back.pt"]  # no temp file left


def test_put_file_refuses_bytes_that_do_not_match_the_expected_digest(store, tmp_path):
    random_file(tmp_path / "src.bin", 6 * MB)
    with pytest.raises(IntegrityError, match="expected digest"):
        store.put_file("ckpt.pt", tmp_path / "src.bin", sha256="sha256:" + "0" * 64)
    assert store.head("ckpt.pt") is None and store.list() == []


@pytest.mark.parametrize("what", ["missing", "folder"])
def test_put_file_of_something_that_is_not_a_file_says_so(store, tmp_path, what):
    path = tmp_path / "ckpt.pt"
    if what == "folder":
        path.mkdir()
    with pytest.raises(StorageError, match="Cannot upload"):
        store.put_file("ckpt.pt", path)
    assert store.list() == []


def test_get_file_with_a_wrong_expected_digest_writes_nothing(store, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    store.put_file("a.bin", tmp_path / "a.bin")
    (tmp_path / "dest.bin").write_bytes(b"old copy")
    with pytest.raises(IntegrityError, match="does not match its digest"):
        store.get_file("a.bin", tmp_path / "dest.bin", sha256="sha256:" + "1" * 64)
    assert (tmp_path / "dest.bin").read_bytes() == b"old copy"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_json_and_bytes_round_trip_with_versions(store):
    first = store.put_json("session.json", {"status": "running", "step": 3})
    value, info = store.get_json_versioned("session.json")
    assert value == {"status": "running", "step": 3} and info.etag == first.etag
    second = store.put_json("session.json", {"status": "completed"})
    assert second.etag != first.etag and store.get_json("session.json") == {"status": "completed"}
    store.put_bytes("output/000000.log", b"line 1\nline 2\n")
    data, info = store.get_bytes("output/000000.log")
    assert data == b"line 1\nline 2\n" and info.sha256 == sha(data) and info.size == 14


def test_missing_objects_and_idempotent_delete(store, tmp_path):
    assert store.head("nope.json") is None and not store.exists("nope.json")
    with pytest.raises(ObjectNotFoundError, match="No object"):
        store.get_bytes("nope.json")
    with pytest.raises(ObjectNotFoundError):
        store.get_file("nope.bin", tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists()
    store.delete("nope.json")
    store.put_json("a/b.json", {})
    store.delete("a/b.json")
    store.delete("a/b.json")
    assert store.list() == []


def test_list_is_sorted_and_filters_by_prefix(store, tmp_path):
    for key in ["events/000001.jsonl", "events/000000.jsonl", "eventsX.json", "latest.json", "checkpoints/c.pt"]:
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list()] == ["checkpoints/c.pt", "events/000000.jsonl", "events/000001.jsonl",
                                             "eventsX.json", "latest.json"]
    assert [o.key for o in store.list("events/")] == ["events/000000.jsonl", "events/000001.jsonl"]
    assert [o.key for o in store.list("events")] == ["events/000000.jsonl", "events/000001.jsonl", "eventsX.json"]
    assert [(o.size, o.sha256) for o in store.list("latest")] == [(11, None)]  # listings carry no digest
    assert store.list("nothing/") == []


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../up", "a/./b", "a/../b", "a\\b", "trailing/"])
def test_bad_keys_are_refused(store, key):
    with pytest.raises(UsageError, match="Storage key"):
        store.put_bytes(key, b"x")


def test_create_only_write_refuses_an_existing_object(store):
    store.put_json("leases/000000.json", {"owner": "a"}, if_none_match="*")
    with pytest.raises(ConditionalWriteError, match=r"already exists|another writer"):
        store.put_json("leases/000000.json", {"owner": "b"}, if_none_match="*")
    assert store.get_json("leases/000000.json") == {"owner": "a"}


def test_compare_and_swap_refuses_a_stale_etag(store):
    v1 = store.put_json("latest.json", {"step": 1}, if_none_match="*")
    v2 = store.put_json("latest.json", {"step": 2}, if_match=v1.etag)
    with pytest.raises(ConditionalWriteError) as caught:
        store.put_json("latest.json", {"step": 99}, if_match=v1.etag)
    assert store.get_json("latest.json") == {"step": 2}
    assert caught.value.current_etag in (None, v2.etag)
    store.delete("latest.json")
    with pytest.raises(ConditionalWriteError):
        store.put_json("latest.json", {"step": 3}, if_match=v2.etag)
    assert store.head("latest.json") is None


@pytest.mark.parametrize("bad", [{"if_none_match": "abc"}, {"if_none_match": "*", "if_match": '"e"'}, {"if_match": ""}])
def test_bad_conditions_are_refused(store, bad):
    with pytest.raises(UsageError):
        store.put_json("x.json", {}, **bad)


def _race(writers: int, write) -> tuple[list[int], list[BaseException]]:
    barrier = threading.Barrier(writers)
    won: list[int] = []
    other: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            write(i)
            won.append(i)
        except ConditionalWriteError:
            pass
        except BaseException as e:  # anything else is a failure of the test
            other.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, other


@pytest.mark.parametrize("round_", range(3))
def test_racing_create_only_writers_one_wins(store, round_):
    won, other = _race(6, lambda i: store.put_json("lease.json", {"writer": i}, if_none_match="*"))
    assert other == [] and len(won) == 1
    assert store.get_json("lease.json") == {"writer": won[0]}


@pytest.mark.parametrize("round_", range(3))
def test_racing_compare_and_swap_writers_one_wins(store, round_):
    base = store.put_json("latest.json", {"writer": None})
    won, other = _race(6, lambda i: store.put_json("latest.json", {"writer": i}, if_match=base.etag))
    assert other == [] and len(won) == 1
    assert store.get_json("latest.json") == {"writer": won[0]}


# --- corruption ---------------------------------------------------------------------------------

def test_local_bit_rot_is_detected_on_read(tmp_path):
    store = LocalStore(tmp_path / "store")
    (tmp_path / "c.pt").write_bytes(b"A" * 10000)
    store.put_file("c.pt", tmp_path / "c.pt")
    store.put_json("m.json", {"ok": True})
    for key in ("c.pt", "m.json"):
        path = tmp_path / "store" / key
        st = path.stat()
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        with open(path, "r+b") as f:  # in place, same inode, mtime put back: silent corruption
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match="does not match"):
        store.get_file("c.pt", tmp_path / "back.pt")
    assert not (tmp_path / "back.pt").exists()
    with pytest.raises(IntegrityError):
        store.get_json("m.json")


def test_s3_object_that_does_not_match_its_digest_is_refused(moto_server, s3_bucket, tmp_path):
    store = make_s3(moto_server.endpoint_url, s3_bucket, tmp_path, prefix="")
    s3 = moto_server.client()
    # an object whose bytes differ from the digest recorded at upload (damage at rest)
    s3.put_object(Bucket=s3_bucket, Key="c.pt", Body=b"damaged", Metadata={"trainctl-sha256": sha(b"original")})
    with pytest.raises(IntegrityError, match="does not match its digest"):
        store.get_file("c.pt", tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()
    s3.put_object(Bucket=s3_bucket, Key="m.json", Body=b"{}", Metadata={"trainctl-sha256": sha(b"[]")})
    with pytest.raises(IntegrityError):
        store.get_json("m.json")


@pytest.mark.parametrize("checksums", ["when_supported", "when_required"])
def test_bytes_damaged_in_transit_are_refused(fault_proxy, s3_bucket, tmp_path, checksums):
    store = make_s3(fault_proxy.url, s3_bucket, tmp_path, checksums=checksums)
    (tmp_path / "c.pt").write_bytes(os.urandom(100_000))
    store.put_file("c.pt", tmp_path / "c.pt")
    fault_proxy.add(Rule("corrupt", method="GET", times=None))
    with pytest.raises(IntegrityError):
        store.get_file("c.pt", tmp_path / "back.pt")
    assert not (tmp_path / "back.pt").exists()


# --- S3: retries, multipart resume, conditional probing, messages -----------------------------------

def test_injected_500s_are_retried(proxied, fault_proxy):
    fault_proxy.fail(500, method="PUT", times=2)
    info = proxied.put_json("heartbeat.json", {"t": 1})
    puts = [r.status for r in fault_proxy.requests("PUT", r"heartbeat\.json")]
    assert puts == [500, 500, 200]
    assert proxied.get_json("heartbeat.json") == {"t": 1} and info.sha256


def test_retries_are_bounded_and_say_so(proxied, fault_proxy):
    fault_proxy.fail(503, method="PUT", times=None, code="SlowDown")
    with pytest.raises(StorageUnavailableError, match="failed 4 times") as caught:
        proxied.put_json("heartbeat.json", {"t": 1})
    assert len(fault_proxy.requests("PUT")) == FAST_RETRY.attempts
    assert caught.value.hint and "retry" in caught.value.hint


def test_dropped_connection_during_a_part_is_retried(proxied, fault_proxy, tmp_path):
    data = random_file(tmp_path / "big.bin", 16 * MB + 5)
    fault_proxy.drop(method="PUT", query="partNumber=2", times=1)
    info = proxied.put_file("checkpoints/big.bin", tmp_path / "big.bin")
    assert info.sha256 == sha(data)
    assert [r.status for r in fault_proxy.requests("PUT") if r.operation == "UploadPart 2"] == [None, 200]
    proxied.get_file("checkpoints/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_interrupted_multipart_upload_resumes_with_the_missing_parts(proxied, fault_proxy, tmp_path, moto_server,
                                                                     s3_bucket):
    data = random_file(tmp_path / "big.bin", 26 * MB)  # 6 parts of 5 MiB (the last one 1 MiB)
    fault_proxy.fail(500, method="PUT", query="partNumber=3", times=None)
    with pytest.raises(StorageUnavailableError, match="UploadPart 3/6"):
        proxied.put_file("checkpoints/big.bin", tmp_path / "big.bin")
    assert proxied.head("checkpoints/big.bin") is None  # nothing counts before it completes
    first = {r.operation for r in fault_proxy.requests("PUT") if r.status == 200}
    uploads = moto_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert len(uploads) == 1 and list((tmp_path / "upload-state").iterdir())

    fault_proxy.clear()
    info = proxied.put_file("checkpoints/big.bin", tmp_path / "big.bin")
    second = [r.operation for r in fault_proxy.requests("PUT")]
    assert "UploadPart 3" in second and not first & set(second), (first, second)
    assert [r.operation for r in fault_proxy.requests("POST")] == ["CompleteMultipartUpload"]  # no new upload
    assert info.sha256 == sha(data) and info.size == len(data)
    proxied.get_file("checkpoints/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    assert moto_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert list((tmp_path / "upload-state").iterdir()) == []


def test_a_changed_file_does_not_resume_a_stale_upload(proxied, fault_proxy, tmp_path, moto_server, s3_bucket):
    random_file(tmp_path / "big.bin", 12 * MB, seed=1)
    fault_proxy.fail(500, method="PUT", query="partNumber=2", times=None)
    with pytest.raises(StorageUnavailableError):
        proxied.put_file("big.bin", tmp_path / "big.bin")
    fault_proxy.clear()
    data = random_file(tmp_path / "big.bin", 12 * MB, seed=2)
    info = proxied.put_file("big.bin", tmp_path / "big.bin")
    assert info.sha256 == sha(data)
    assert [r.operation for r in fault_proxy.requests("POST")] == ["CreateMultipartUpload", "CompleteMultipartUpload"]
    assert moto_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_interrupted_download_resumes_with_a_range_request(proxied, fault_proxy, tmp_path):
    data = random_file(tmp_path / "big.bin", 3 * MB)
    proxied.put_file("big.bin", tmp_path / "big.bin")
    fault_proxy.clear()
    fault_proxy.add(Rule("truncate", method="GET", times=1))
    proxied.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    gets = fault_proxy.requests("GET")
    assert len(gets) == 2


def test_conditional_write_whose_response_was_lost_still_counts(proxied, fault_proxy):
    proxied.check_conditional_writes()
    fault_proxy.add(Rule("lose_response", method="PUT", path=r"lease\.json$", times=1))
    proxied.put_json("lease.json", {"owner": "me"}, if_none_match="*")  # retried, refused, recognised
    assert [r.status for r in fault_proxy.requests("PUT", r"lease\.json$")] == [200, 412]
    with pytest.raises(ConditionalWriteError):
        proxied.put_json("lease.json", {"owner": "other"}, if_none_match="*")


def test_moto_enforces_conditional_puts_like_aws(moto_server, s3_bucket):
    """What the contract suite relies on: the server itself refuses (not only trainctl)."""
    from botocore.exceptions import ClientError

    s3 = moto_server.client()
    first = s3.put_object(Bucket=s3_bucket, Key="k", Body=b"1", IfNoneMatch="*")
    for extra in ({"IfNoneMatch": "*"}, {"IfMatch": '"' + "0" * 32 + '"'}):
        with pytest.raises(ClientError) as caught:
            s3.put_object(Bucket=s3_bucket, Key="k", Body=b"2", **extra)
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"3", IfMatch=first["ETag"])


def test_a_store_that_ignores_conditional_writes_is_refused(fault_proxy, s3_bucket, tmp_path):
    fault_proxy.add(Rule("strip", headers=("If-None-Match", "If-Match"), times=None))
    store = make_s3(fault_proxy.url, s3_bucket, tmp_path)
    with pytest.raises(ConditionalWritesUnsupportedError, match="does not enforce conditional writes") as caught:
        store.put_json("lease.json", {}, if_none_match="*")
    assert "R2" in caught.value.hint
    assert store.head("lease.json") is None and store.list() == []  # the probe cleaned up


def test_missing_bucket_says_so(moto_server, tmp_path):
    store = make_s3(moto_server.endpoint_url, "no-such-bucket-here", tmp_path)
    for action in (lambda: store.put_json("x.json", {}), lambda: store.list(), lambda: store.get_json("x.json"),
                   lambda: store.get_file("x.bin", tmp_path / "x.bin")):
        with pytest.raises(BucketNotFoundError, match="Bucket 'no-such-bucket-here' does not exist") as caught:
            action()
        assert "aws s3 mb s3://no-such-bucket-here" in caught.value.hint


@pytest.mark.parametrize(("status", "code", "error", "fragment"), [
    (403, "AccessDenied", AccessDeniedError, "s3:PutObject"),
    (403, "InvalidAccessKeyId", AccessDeniedError, "AWS_ACCESS_KEY_ID"),
    (501, "NotImplemented", StorageConfigError, 'checksums = "when_required"'),
    (400, "InvalidRequest", StorageError, "Check the endpoint"),
])
def test_refusals_name_the_fix(proxied, fault_proxy, status, code, error, fragment):
    fault_proxy.fail(status, code=code, method="PUT", times=None)
    with pytest.raises(error) as caught:
        proxied.put_json("x.json", {})
    assert fragment in (caught.value.hint or "")
    assert len(fault_proxy.requests("PUT")) == 1  # not retried


def test_missing_boto3_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "boto3", None)
    store = open_store("s3://some-bucket/x", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StorageDependencyError, match="needs boto3") as caught:
        store.list()
    assert caught.value.hint == "Install with: pip install 'trainctl[aws]'"


def test_no_credentials_names_the_variables(moto_server, s3_bucket, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    store = make_s3(moto_server.endpoint_url, s3_bucket, tmp_path)
    with pytest.raises(StorageConfigError, match="No usable credentials") as caught:
        store.list()
    assert "AWS_ACCESS_KEY_ID" in caught.value.hint


def test_open_store_picks_the_implementation(tmp_path):
    assert isinstance(open_store(tmp_path / "x"), LocalStore)
    assert open_store(f"file://{tmp_path}/x").root == tmp_path / "x"
    s3 = open_store("s3://bucket-1/a/b/", endpoint_url="http://127.0.0.1:9000", region="auto",
                    checksums="when_required")
    assert isinstance(s3, S3Store) and s3.uri == "s3://bucket-1/a/b/" and s3.prefix == "a/b/"
    assert (s3.endpoint_url, s3.region, s3.checksums) == ("http://127.0.0.1:9000", "auto", "when_required")
    assert s3.url("latest.json") == "s3://bucket-1/a/b/latest.json"


def test_upload_state_is_not_left_behind_after_success(store, tmp_path):
    random_file(tmp_path / "big.bin", 11 * MB)
    store.put_file("big.bin", tmp_path / "big.bin")
    state = tmp_path / "upload-state"
    assert not state.exists() or list(state.iterdir()) == []
    assert json.loads(json.dumps([o.key for o in store.list()])) == ["big.bin"]


def test_a_conditional_write_counts_when_the_next_compare_and_swap_follows_it_at_once(moto_server, s3_bucket, tmp_path):
    """Four machines counting boots: B's compare-and-swap on A's version can land before A reads
    back what it wrote. A's write happened (the store accepted it); taking it for lost made A
    count again, and a boot number went missing (seen as [1, 3, 4, 5] under load)."""
    first = make_s3(moto_server.endpoint_url, s3_bucket, tmp_path / "a")
    other = make_s3(moto_server.endpoint_url, s3_bucket, tmp_path / "b")
    first.put_json("boots.json", {"count": 1}, if_none_match="*")
    _, info = first.get_json_versioned("boots.json")
    followed = []

    def then_the_other_writer(http_response, parsed, **kwargs):
        if parsed.get("ETag") and not followed:  # A's PUT was accepted: B swaps on top of it now
            followed.append(other.put_json("boots.json", {"count": 3}, if_match=parsed["ETag"]))

    first.client.meta.events.register("after-call.s3.PutObject", then_the_other_writer)
    written = first.put_json("boots.json", {"count": 2}, if_match=info.etag)
    assert followed and written.etag != followed[0].etag
    assert first.get_json_versioned("boots.json")[0] == {"count": 3}
