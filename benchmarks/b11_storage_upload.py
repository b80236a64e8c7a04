"""B11: upload of a large checkpoint-sized file to moto's S3 server on 127.0.0.1 through
trainctl's `S3Store.put_file` (digest taken, multipart, every part checksummed, the stored
object verified by a HEAD before it counts) against boto3's plain `upload_file` of the same
file (boto3's default TransferConfig, no verification), in the same run.

moto runs in its own process, as a remote store would, so the client's threads do not share an
interpreter with the server. Both sides use boto3's default checksum mode (CRC32). Each upload
goes to a fresh key, deleted after it is timed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, emit, interleaved, parse_args, pick, row, stats

MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
server.stop()
"""


def write_file(path: Path, size_mb: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size_mb):
            f.write(block[i % 7:] + block[: i % 7])  # no two MiB alike
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    args = parse_args(__doc__)
    size_mb = pick(args.mode, 1024, 64, 8)
    repeats = pick(args.mode, 3, 3, 1)
    warmup = pick(args.mode, 0, 1, 0)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_EC2_METADATA_DISABLED")})
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    server = subprocess.Popen([sys.executable, "-c", MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        endpoint = f"http://127.0.0.1:{int(server.stdout.readline())}"  # type: ignore[union-attr]
        import boto3

        sys.path.insert(0, str(REPO))
        from trainctl.storage.s3 import S3Store

        client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(prefix="trainctl-b11-") as tmp:
            path = Path(tmp) / "checkpoint.pt"
            write_file(path, size_mb)
            store = S3Store("bench", "", endpoint_url=endpoint, region="us-east-1",
                            upload_state_dir=Path(tmp) / "state")
            counter = iter(range(10**9))

            def baseline() -> float:
                key = f"plain-{next(counter)}.pt"
                t0 = time.perf_counter()
                client.upload_file(str(path), "bench", key)
                elapsed = time.perf_counter() - t0
                client.delete_object(Bucket="bench", Key=key)
                return elapsed

            def trainctl_put() -> float:
                key = f"trainctl-{next(counter)}.pt"
                t0 = time.perf_counter()
                info = store.put_file(key, path)
                elapsed = time.perf_counter() - t0
                assert info.size == size_mb << 20 and info.sha256
                store.delete(key)
                return elapsed

            base, ours = interleaved(repeats, baseline, trainctl_put, warmup=warmup)
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    b, t = stats(base), stats(ours)
    mb_s = size_mb / t["median"] if t["median"] else 0.0
    rows = [
        row("B11 put_file (verified) vs boto3 upload_file", t["median"], b["median"], unit="s", goal="<= 1.10x",
            passed=t["median"] <= 1.10 * b["median"], baseline_name="boto3 upload_file",
            trainctl_stats=t, baseline_stats=b),
        row("B11 put_file throughput to moto (MB/s)", mb_s, size_mb / b["median"] if b["median"] else None,
            unit="MB/s", goal="report", passed=None, baseline_name="boto3 upload_file (MB/s)"),
    ]
    emit("B11", "S3 upload: put_file vs boto3 upload_file", args.mode, rows,
         params={"file_mb": size_mb, "repeats": repeats, "part_size_mb": store.part_size >> 20,
                 "max_concurrency": store.max_concurrency},
         extra={"baseline": b, "trainctl": t})


if __name__ == "__main__":
    main()
