"""A session in storage (RemoteSession): the order of checkpoint writes, segmented logs, one
writer, the boot counter and the tombstone, and the incremental pull, over a folder and S3."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from trainctl.errors import TrainctlWarning, UsageError
from trainctl.storage import (
    ConditionalWriteError,
    IntegrityError,
    ObjectNotFoundError,
    StorageUnavailableError,
)
from trainctl.storage.remote import RemoteSession, SegmentReader, SegmentWriter, parse_jsonl

from .servers import make_s3_store

MB = 1 << 20


def checkpoint(folder: Path, name: str, size: int, *, step: int, seed: int = 0) -> tuple[Path, dict]:
    """A checkpoint-like file and the manifest trainctl would write beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = (hashlib.sha256(f"{seed}".encode()).digest() * (size // 32 + 1))[:size]
    path = folder / name
    path.write_bytes(data)
    manifest = {"format_version": 1, "file": name, "bytes": size,
                "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "meta": {"step": step, "epoch": 1}}
    return path, manifest


def test_push_checkpoint_then_latest_points_at_a_verified_copy(store, tmp_path):
    session = RemoteSession(store, "proj/20260101-000000-abc123")
    path, manifest = checkpoint(tmp_path / "ckpts", "ckpt-step00000010.pt", 6 * MB + 7, step=10)
    latest = session.push_checkpoint(path, manifest)
    assert latest == session.latest_checkpoint()
    assert latest["checkpoint"] == "proj/20260101-000000-abc123/checkpoints/ckpt-step00000010.pt"
    assert (latest["step"], latest["bytes"], latest["sha256"]) == (10, 6 * MB + 7, manifest["digest"])
    remote = store.get_json(latest["manifest"])
    assert remote["meta"] == manifest["meta"] and remote["storage"]["sha256"] == manifest["digest"]
    fetched = session.fetch_checkpoint(tmp_path / "machine")
    assert fetched.read_bytes() == path.read_bytes()
    assert json.loads(fetched.with_name(fetched.name + ".json").read_text()) == manifest
    assert [m["file"] for m in session.checkpoints()] == ["ckpt-step00000010.pt"]


def test_checkpoint_order_is_file_then_manifest_then_latest(fault_proxy, s3_bucket, tmp_path):
    store = make_s3_store(fault_proxy.url, s3_bucket, tmp_path / "state", prefix="")
    session = RemoteSession(store, "p/s")
    for step in (1, 2):
        path, manifest = checkpoint(tmp_path, f"ckpt-{step}.pt", 11 * MB, step=step, seed=step)
        session.push_checkpoint(path, manifest)
    writes = [(r.operation, r.path.split("/p/s/", 1)[1]) for r in fault_proxy.log
              if r.method in ("PUT", "POST") and r.status == 200 and "/p/s/" in r.path]
    for step in (1, 2):
        ckpt = f"checkpoints/ckpt-{step}.pt"
        complete = writes.index(("CompleteMultipartUpload", ckpt))
        parts = [i for i, w in enumerate(writes) if w[1] == ckpt and w[0].startswith("UploadPart")]
        manifest = writes.index(("PUT", ckpt + ".json"))
        latest = [i for i, w in enumerate(writes) if w == ("PUT", "latest.json")][step - 1]
        assert max(parts) < complete < manifest < latest, writes
    # every latest.json write was conditional: create-only, then against the etag last written
    latest_puts = [r for r in fault_proxy.requests("PUT", r"/p/s/latest\.json$")]
    assert latest_puts[0].headers.get("If-None-Match") == "*" and "If-Match" in latest_puts[1].headers


def test_a_failed_upload_moves_nothing(fault_proxy, s3_bucket, tmp_path):
    store = make_s3_store(fault_proxy.url, s3_bucket, tmp_path / "state", prefix="")
    session = RemoteSession(store, "p/s")
    first, first_manifest = checkpoint(tmp_path, "ckpt-1.pt", 1000, step=1)
    session.push_checkpoint(first, first_manifest)
    second, manifest = checkpoint(tmp_path, "ckpt-2.pt", 11 * MB, step=2, seed=2)
    fault_proxy.fail(500, method="PUT", query="partNumber=2", times=None)
    with pytest.raises(StorageUnavailableError):
        session.push_checkpoint(second, manifest)
    assert session.latest_checkpoint()["file"] == "ckpt-1.pt"
    assert not store.exists("p/s/checkpoints/ckpt-2.pt") and not store.exists("p/s/checkpoints/ckpt-2.pt.json")
    fault_proxy.clear()
    session.push_checkpoint(second, manifest)  # resumes the upload, then moves latest
    assert session.latest_checkpoint()["file"] == "ckpt-2.pt"


def test_a_file_that_does_not_match_its_manifest_is_not_uploaded(store, tmp_path):
    session = RemoteSession(store)
    path, manifest = checkpoint(tmp_path, "ckpt.pt", 2000, step=1)
    for bad in ({**manifest, "bytes": 1999}, {**manifest, "digest": "sha256:" + "0" * 64}):
        with pytest.raises(IntegrityError):
            session.push_checkpoint(path, bad)
    assert store.list() == [] and session.latest_checkpoint() is None


def test_a_second_writer_takes_over_and_the_first_one_is_refused(store, tmp_path):
    old = RemoteSession(store, "s")
    old.push_checkpoint(*checkpoint(tmp_path, "ckpt-1.pt", 100, step=1))
    replacement = RemoteSession(store, "s")  # a replacement machine: reads latest, then moves it
    replacement.push_checkpoint(*checkpoint(tmp_path, "ckpt-2.pt", 100, step=2))
    with pytest.raises(ConditionalWriteError):
        old.push_checkpoint(*checkpoint(tmp_path, "ckpt-3.pt", 100, step=3))
    assert replacement.latest_checkpoint()["file"] == "ckpt-2.pt"


def test_retention_never_deletes_what_latest_points_to(store, tmp_path):
    session = RemoteSession(store, "s")
    session.push_checkpoint(*checkpoint(tmp_path, "a.pt", 100, step=1))
    session.push_checkpoint(*checkpoint(tmp_path, "b.pt", 100, step=2))
    with pytest.raises(UsageError, match=r"latest\.json points to"):
        session.delete_checkpoint("b.pt")
    session.delete_checkpoint("a.pt")
    assert [o.key for o in store.list("s/checkpoints/")] == ["s/checkpoints/b.pt", "s/checkpoints/b.pt.json"]


def test_segments_rotate_by_size_and_readers_concatenate(store):
    session = RemoteSession(store, "s")
    writer = session.events_writer(max_bytes=200)
    events = [{"v": 1, "t": i, "kind": "metric", "step": i, "values": {"loss": 1 / (i + 1)}} for i in range(20)]
    for event in events:
        writer.append((json.dumps(event) + "\n").encode())
        if event["step"] % 3 == 0:
            writer.flush()
    writer.flush()
    keys = [o.key for o in store.list("s/events/")]
    assert len(keys) > 3 and keys == sorted(keys) and keys[0] == "s/events/000000.jsonl"
    for key in keys[:-1]:  # sealed segments end with a whole line
        data, _ = store.get_bytes(key)
        assert data.endswith(b"\n") and len(data) <= 200
    assert session.read_events() == events


def test_segments_rotate_by_age(store):
    now = [0.0]
    writer = SegmentWriter(store, "out/", ".log", max_age_s=600, clock=lambda: now[0])
    writer.append(b"first\n")
    writer.flush()
    writer.append(b"second\n")
    now[0] = 601.0
    writer.flush()  # rewrites segment 0 whole, then seals it
    writer.append(b"third\n")
    writer.flush()
    assert [o.key for o in store.list("out/")] == ["out/000000.log", "out/000001.log"]
    assert store.get_bytes("out/000000.log")[0] == b"first\nsecond\n"
    assert SegmentReader(store, "out/", ".log").poll() == b"first\nsecond\nthird\n"


def test_a_torn_last_line_is_dropped_until_it_is_whole(store):
    session = RemoteSession(store)
    writer = session.events_writer()
    writer.append(b'{"kind": "metric", "step": 1}\n{"kind": "met')
    writer.flush()
    assert session.read_events() == [{"kind": "metric", "step": 1}]
    writer.append(b'ric", "step": 2}\n')
    writer.flush()
    assert [e["step"] for e in session.read_events()] == [1, 2]


def test_a_malformed_middle_line_is_skipped_with_a_warning():
    with pytest.warns(TrainctlWarning, match="skipped 1 malformed"):
        assert parse_jsonl(b'{"a": 1}\nnot json\n{"a": 2}\n') == [{"a": 1}, {"a": 2}]


def test_a_new_writer_continues_after_existing_segments(store):
    first = SegmentWriter(store, "events/", ".jsonl")
    first.append(b'{"n": 1}\n')
    first.flush()
    second = SegmentWriter(store, "events/", ".jsonl")  # the next attempt's writer
    second.append(b'{"n": 2}\n')
    second.flush()
    assert [o.key for o in store.list("events/")] == ["events/000000.jsonl", "events/000001.jsonl"]
    assert parse_jsonl(SegmentReader(store, "events/", ".jsonl").poll()) == [{"n": 1}, {"n": 2}]


def test_reader_polls_only_what_is_new(store, tmp_path):
    writer = SegmentWriter(store, "output/", ".log", max_bytes=10)
    reader = SegmentReader(store, "output/", ".log")
    log = tmp_path / "output.log"
    log.write_bytes(b"line one\n")
    assert writer.append_file(log) == 9
    writer.flush()
    assert reader.poll() == b"line one\n"
    assert reader.poll() == b""
    with open(log, "ab") as f:
        f.write(b"line two\nline three\n")
    assert writer.append_file(log) == 20 and writer.append_file(log) == 0
    writer.flush()
    assert reader.poll() == b"line two\nline three\n"
    log.write_bytes(b"new\n")  # a replaced file is read from its start
    assert writer.append_file(log) == 4


def test_one_lease_per_attempt(store):
    session = RemoteSession(store, "s")
    barrier = threading.Barrier(4)
    won: list[int] = []

    def take(i: int) -> None:
        barrier.wait()
        try:
            session.acquire_lease(0, agent=i)
            won.append(i)
        except ConditionalWriteError:
            pass

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and session.current_lease()["agent"] == won[0]
    session.acquire_lease(1, agent="replacement")
    assert session.current_lease()["attempt"] == 1
    with pytest.raises(UsageError):
        session.acquire_lease(-1)


def test_boot_counter_counts_every_boot_under_races(store):
    session = RemoteSession(store, "s")
    counts: list[int] = []
    barrier = threading.Barrier(4)

    def boot(i: int) -> None:
        barrier.wait()
        counts.append(session.count_boot(machine=i))

    threads = [threading.Thread(target=boot, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(counts) == [1, 2, 3, 4] and session.boots() == 4


def test_the_first_end_wins(store):
    session = RemoteSession(store, "s")
    assert session.ended() is None
    _, created = session.mark_ended("completed", exit_code=0)
    assert created and session.ended()["reason"] == "completed"
    again, created = session.mark_ended("failed")
    assert not created and again["reason"] == "completed"


def test_heartbeat_and_session_record(store):
    session = RemoteSession(store, "s")
    assert session.read_session() is None and session.read_heartbeat() is None
    session.write_session({"id": "s", "status": "running"})
    session.heartbeat(attempt=0, step=12, rate=3.5)
    assert session.read_session()["status"] == "running"
    beat = session.read_heartbeat()
    assert (beat["attempt"], beat["step"], beat["rate"]) == (0, 12, 3.5)


def test_fetch_checkpoint_refuses_a_damaged_copy(store, tmp_path):
    session = RemoteSession(store, "s")
    path, manifest = checkpoint(tmp_path, "ckpt.pt", 4000, step=1)
    latest = session.push_checkpoint(path, manifest)
    store.put_bytes(latest["checkpoint"], b"x" * 4000)  # replaced behind latest.json's back
    with pytest.raises(IntegrityError):
        session.fetch_checkpoint(tmp_path / "machine")
    assert not (tmp_path / "machine" / "ckpt.pt").exists()
    with pytest.raises(ObjectNotFoundError, match=r"no latest\.json"):
        RemoteSession(store, "other").fetch_checkpoint(tmp_path / "machine")


def test_pull_mirrors_incrementally(store, tmp_path):
    session = RemoteSession(store, "proj/s1")
    session.write_session({"id": "s1", "status": "running"})
    events = session.events_writer()
    events.append(b'{"kind": "status", "status": "running"}\n')
    events.flush()
    output = session.output_writer()
    output.append(b"epoch 1 loss=0.5\n")
    output.flush()
    session.push_checkpoint(*checkpoint(tmp_path, "ckpt-1.pt", 3000, step=1))
    dest = tmp_path / "mirror"
    first = session.pull(dest)
    assert "checkpoints/ckpt-1.pt" in first.skipped and "checkpoints/ckpt-1.pt.json" in first.downloaded
    assert (dest / "events.jsonl").read_bytes() == b'{"kind": "status", "status": "running"}\n'
    assert (dest / "output.log").read_text() == "epoch 1 loss=0.5\n"
    assert json.loads((dest / "latest.json").read_text())["file"] == "ckpt-1.pt"
    assert session.pull(dest).downloaded == []
    events.append(b'{"kind": "metric", "step": 1}\n')
    events.flush()
    again = session.pull(dest, checkpoints=True)
    assert sorted(again.downloaded) == ["checkpoints/ckpt-1.pt", "events/000000.jsonl"]
    assert (dest / "events.jsonl").read_text().count("\n") == 2
    assert (dest / "checkpoints" / "ckpt-1.pt").stat().st_size == 3000


def test_pull_never_writes_outside_its_folder(moto_server, s3_bucket, tmp_path):
    store = make_s3_store(moto_server.endpoint_url, s3_bucket, tmp_path / "state", prefix="")
    session = RemoteSession(store, "proj/s1")
    session.write_session({"id": "s1"})
    moto_server.client().put_object(Bucket=s3_bucket, Key="proj/s1/../../escape.txt", Body=b"x")
    result = session.pull(tmp_path / "mirror")
    assert result.downloaded == ["session.json"] and result.skipped == ["../../escape.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirror"]
