"""Real servers on 127.0.0.1 for the cloud tests: moto's S3 server, a fault-injecting proxy in
front of it, and a fake EC2 instance metadata service (IMDSv2). Fixtures in conftest.py start
them; each is usable on its own:

    moto = MotoServer.start()                       # moto.server.ThreadedMotoServer, port 0
    proxy = FaultProxy(moto.endpoint_url).start()   # proxy.fail(...), proxy.drop(...), proxy.log
    imds = FakeIMDS().start()                       # imds.set_spot_action(), imds.set_rebalance()

Everything listens on loopback only. Subprocesses must be given these endpoints explicitly
(`endpoint_url`, AWS_EC2_METADATA_SERVICE_ENDPOINT) with `loopback_env()`, which also installs
the no-network guard (tests/netguard/) in every Python child.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
NETGUARD_DIR = Path(__file__).resolve().parent / "netguard"
MOTO_ACCOUNT = "123456789012"  # the account moto answers as

# Credentials and settings every AWS client in a test uses: fake keys, no IMDS lookups, no
# profile or config file of the person running the tests.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
UNSET_AWS_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_CA_BUNDLE")


def loopback_env(base: dict[str, str] | None = None, *, guard_log: Path | None = None,
                 **extra: str) -> dict[str, str]:
    """An environment for a child process of a cloud test: fake AWS credentials, the
    no-network guard on its PYTHONPATH (it refuses any non-loopback connect), violations
    appended to `guard_log` when given. Pass endpoints (moto, IMDS) in `extra`."""
    env = dict(base if base is not None else os.environ)
    for name in UNSET_AWS_ENV:
        env.pop(name, None)
    env.update(FAKE_AWS_ENV)
    paths = [str(NETGUARD_DIR), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if guard_log is not None:
        env["TRAINCTL_TEST_NETGUARD_LOG"] = str(guard_log)
    env.update(extra)
    return env


# --- moto ---------------------------------------------------------------------------------------

def make_s3_store(endpoint_url: str, bucket: str, state_dir: Path, **options: Any) -> Any:
    """An S3Store for tests: 5 MiB parts (multipart at test sizes), fast bounded retries, its
    upload records under `state_dir`, keys under the prefix 'proj/sess' unless told."""
    from trainctl.storage import RetryPolicy
    from trainctl.storage.s3 import S3Store

    settings: dict[str, Any] = {"region": "us-east-1", "part_size_mb": 5,
                                "retry": RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05),
                                "upload_state_dir": state_dir, "prefix": "proj/sess"}
    settings.update(options)
    prefix = settings.pop("prefix")
    return S3Store(bucket, prefix, endpoint_url=endpoint_url, **settings)


class MotoServer:
    """moto's server (every AWS service) on 127.0.0.1, in this process's threads: the one AWS
    of the test suite, for storage and the AWS provider alike."""

    def __init__(self, server: Any, endpoint_url: str) -> None:
        self._server = server
        self.endpoint_url = endpoint_url

    @classmethod
    def start(cls) -> MotoServer:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        return cls(server, f"http://{host}:{port}")

    def reset(self) -> None:
        """Forget every resource (a fresh, empty account)."""
        request = urllib.request.Request(self.endpoint_url + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def session(self, hooks: dict[str, Callable[..., Any]] | None = None, *, credentials: bool = True) -> Any:
        """A boto3 Session with fake keys (none with `credentials=False`) and botocore event
        `hooks` registered (what moto doesn't answer, or an error to inject)."""
        import boto3
        import botocore.session

        core = botocore.session.get_session()
        core.register_component("data_loader", _shared_loader())  # parse AWS's model files once
        keys = ({"aws_access_key_id": "testing", "aws_secret_access_key": "testing"} if credentials else {})
        session = boto3.Session(region_name="us-east-1", botocore_session=core, **keys)
        for event, handler in (hooks or {}).items():
            session.events.register(event, handler)
        return session

    def context(self, region: str = "us-east-1", hooks: dict[str, Callable[..., Any]] | None = None, *,
                max_attempts: int = 2, credentials: bool = True, endpoint_url: str | None = None) -> Any:
        """A trainctl AwsContext on this server."""
        from trainctl.cloud.aws.context import AwsContext

        return AwsContext(region, endpoint_url=endpoint_url or self.endpoint_url, max_attempts=max_attempts,
                          session=self.session(hooks, credentials=credentials))

    def client(self, service: str = "s3", region: str = "us-east-1", *, endpoint_url: str | None = None) -> Any:
        """A plain boto3 client on this server (for setting up and inspecting, not under test)."""
        return self.session().client(service, endpoint_url=endpoint_url or self.endpoint_url,
                                     region_name=region)

    def create_bucket(self) -> str:
        name = "t-" + os.urandom(6).hex()
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Empty and remove a bucket (moto keeps objects in memory)."""
        s3 = self.client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=name, Key=item["Key"])
        for upload in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        s3.delete_bucket(Bucket=name)

    def seed_dlami(self, region: str = "us-east-1", arch: str = "x86_64",
                   types: tuple[str, ...] = ("oss-nvidia-driver-gpu-pytorch-2.6-amazon-linux-2023",
                                             "oss-nvidia-driver-gpu-pytorch-2.7-ubuntu-22.04",
                                             "oss-nvidia-driver-gpu-pytorch-2.10-ubuntu-22.04",
                                             "oss-nvidia-driver-gpu-pytorch-2.10-ubuntu-24.04",
                                             "base-oss-nvidia-driver-gpu-ubuntu-24.04")) -> dict[str, str]:
        """Public DLAMI parameters as AWS publishes them (moto refuses writes under /aws/)."""
        from moto.ssm.models import Parameter, ssm_backends

        ec2 = self.client("ec2", region=region)
        backend = ssm_backends[MOTO_ACCOUNT][region]
        seeded: dict[str, str] = {}
        for ami_type in types:
            image_id = ec2.register_image(Name=f"Deep Learning {ami_type} 20261101",
                                          Architecture=arch, RootDeviceName="/dev/sda1")["ImageId"]
            for suffix in ("latest/ami-id", "20261101/ami-id"):
                name = f"/aws/service/deeplearning/ami/{arch}/{ami_type}/{suffix}"
                backend._parameters[name].append(Parameter(
                    account_id=MOTO_ACCOUNT, name=name, value=image_id, parameter_type="String",
                    description=None, allowed_pattern=None, keyid=None, last_modified_date=time.time(),
                    version=1, data_type="aws:ec2:image"))
            seeded[ami_type] = image_id
        return seeded

    def stop(self) -> None:
        self._server.stop()


@functools.lru_cache(maxsize=1)
def _shared_loader() -> Any:
    import botocore.loaders

    return botocore.loaders.create_loader()


# --- a proxy that injects faults ------------------------------------------------------------------

@dataclass
class Rule:
    """What the proxy does to requests that match: `action` is "status" (answer `status` with
    S3 error `code`, without forwarding), "reply" (answer with what `reply(body)` returns:
    status, headers, bytes; an AWS service moto lacks), "drop" (read the request, close the connection),
    "lose_response" (forward, so the store applies it, then close without answering),
    "truncate" (forward, then send half the response body and close), "corrupt" (forward, flip
    a byte of the response body) or "strip" (forward without the `headers` named). `times`
    matches at most that many requests (None: all), after skipping the first `skip`."""

    action: str
    method: str | None = None
    path: str | None = None  # regex searched in the path
    query: str | None = None  # regex searched in the query string
    target: str | None = None  # regex searched in X-Amz-Target (the JSON protocol's operation)
    form: str | None = None  # regex searched in the request body (the query protocol's Action=...)
    reply: Callable[[bytes], tuple[int, dict[str, str], bytes]] | None = None  # action "reply"
    status: int = 500
    code: str = "InternalError"
    headers: tuple[str, ...] = ()
    times: int | None = 1
    skip: int = 0
    matched: int = 0
    applied: int = 0

    def matches(self, method: str, path: str, query: str, target: str = "", body: bytes = b"") -> bool:
        if self.method and method != self.method:
            return False
        if self.path and not re.search(self.path, path):
            return False
        if self.target and not re.search(self.target, target):
            return False
        if self.form and not re.search(self.form, body.decode("utf-8", "replace")):
            return False
        return not (self.query and not re.search(self.query, query))


@dataclass
class LoggedRequest:
    method: str
    path: str
    query: str
    status: int | None
    action: str | None
    headers: dict[str, str] = field(default_factory=dict)
    t: float = 0.0

    @property
    def operation(self) -> str:
        """A readable S3 operation name for order assertions (PUT key, UploadPart n, ...)."""
        q = self.query
        if self.method == "PUT" and "partNumber=" in q:
            return "UploadPart " + re.search(r"partNumber=(\d+)", q).group(1)  # type: ignore[union-attr]
        if self.method == "POST" and "uploads" in q.split("&"):
            return "CreateMultipartUpload"
        if self.method == "POST" and "uploadId=" in q:
            return "CompleteMultipartUpload"
        return self.method


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `target` (moto) that forwards every request, logs
    it, and applies the first matching `Rule`; e.g. `proxy.fail(query="partNumber=3", times=2)`."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        assert parts.hostname in ("127.0.0.1", "localhost", "::1"), target
        self.target_host, self.target_port = parts.hostname, parts.port or 80
        self.rules: list[Rule] = []
        self.log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # rules
    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail(self, status: int = 500, **match: Any) -> Rule:
        return self.add(Rule("status", status=status, **match))

    def drop(self, **match: Any) -> Rule:
        return self.add(Rule("drop", **match))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def _pick(self, method: str, path: str, query: str, target: str = "", body: bytes = b"") -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(method, path, query, target, body):
                    continue
                rule.matched += 1
                if rule.matched <= rule.skip or (rule.times is not None and rule.applied >= rule.times):
                    continue
                rule.applied += 1
                return rule
        return None

    def requests(self, method: str | None = None, path: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (path is None or re.search(path, r.path))]

    # server
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                path, _, query = self.path.partition("?")
                body = self._body()
                rule = proxy._pick(self.command, path, query, self.headers.get("X-Amz-Target", ""), body)
                entry = LoggedRequest(self.command, path, query, None, rule.action if rule else None,
                                      {k: v for k, v in self.headers.items()
                                       if k.lower().startswith(("if-", "x-amz-meta-", "content-md5", "x-amz-checksum"))},
                                      time.time())
                with proxy._lock:
                    proxy.log.append(entry)
                if rule and rule.action == "status":
                    payload = (f"<?xml version=\"1.0\"?><Error><Code>{rule.code}</Code>"
                               f"<Message>injected by the test proxy</Message></Error>").encode()
                    entry.status = rule.status
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if rule and rule.action == "reply":
                    assert rule.reply is not None
                    status, reply_headers, payload = rule.reply(body)
                    entry.status = status
                    self.send_response(status)
                    for k, v in reply_headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if rule and rule.action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "connection", "expect")}
                if rule and rule.action == "strip":
                    dropped = {h.lower() for h in rule.headers}
                    headers = {k: v for k, v in headers.items() if k.lower() not in dropped}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    status, reply_headers = response.status, response.getheaders()
                finally:
                    upstream.close()
                entry.status = status
                if rule and rule.action == "lose_response":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_response(status)
                keep_length = self.command == "HEAD"  # a HEAD's Content-Length is the object's
                for k, v in reply_headers:
                    if k.lower() not in ("transfer-encoding", "connection", "date", "server") and (
                            keep_length or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not keep_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if rule and rule.action == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if rule and rule.action == "corrupt" and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --- a fake EC2 instance metadata service ------------------------------------------------------------

class FakeIMDS:
    """IMDSv2 on 127.0.0.1: `PUT /latest/api/token` hands out a token (TTL from the
    X-aws-ec2-metadata-token-ttl-seconds header, 1-21600 s); every GET needs a live token (401
    otherwise, as with IMDSv2 required). `spot/instance-action` and
    `events/recommendations/rebalance` are 404 until the test sets them. Point clients at it
    with AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint."""

    def __init__(self, *, instance_id: str = "i-0123456789abcdef0", region: str = "us-east-1",
                 instance_type: str = "g5.xlarge", local_ipv4: str = "127.0.0.1") -> None:
        self.instance_id = instance_id
        self.local_ipv4 = local_ipv4  # the machine's private address (loopback: every played machine is here)
        self.region = region
        self.instance_type = instance_type
        self.spot_action: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None
        self.tokens: dict[str, float] = {}
        self.log: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @staticmethod
    def _iso(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    def set_spot_action(self, action: str = "terminate", in_s: float = 120.0) -> dict[str, str]:
        """A spot interruption notice: `action` (terminate, stop, hibernate) `in_s` from now."""
        with self._lock:
            self.spot_action = {"action": action, "time": self._iso(time.time() + in_s)}
            return dict(self.spot_action)

    def set_rebalance(self) -> dict[str, str]:
        with self._lock:
            self.rebalance = {"noticeTime": self._iso(time.time())}
            return dict(self.rebalance)

    def clear(self) -> None:
        with self._lock:
            self.spot_action = None
            self.rebalance = None

    def _document(self) -> dict[str, Any]:
        return {"instanceId": self.instance_id, "region": self.region, "instanceType": self.instance_type,
                "availabilityZone": self.region + "a", "accountId": "123456789012",
                "architecture": "x86_64", "imageId": "ami-0123456789abcdef0"}

    def _answer(self, path: str) -> tuple[int, str, str]:
        """(status, content type, body) for a GET of `path`."""
        meta = "/latest/meta-data/"
        with self._lock:
            spot, rebalance = self.spot_action, self.rebalance
        table: dict[str, Any] = {
            meta + "instance-id": self.instance_id,
            meta + "instance-type": self.instance_type,
            meta + "local-ipv4": self.local_ipv4,
            meta + "placement/region": self.region,
            meta + "placement/availability-zone": self.region + "a",
            meta + "spot/instance-action": json.dumps(spot) if spot else None,
            meta + "events/recommendations/rebalance": json.dumps(rebalance) if rebalance else None,
            "/latest/dynamic/instance-identity/document": json.dumps(self._document(), indent=2),
        }
        if path == meta:
            listing = "\n".join(sorted({p[len(meta):].split("/")[0] + ("/" if "/" in p[len(meta):] else "")
                                        for p, v in table.items() if p.startswith(meta) and v is not None}))
            return 200, "text/plain", listing
        body = table.get(path) if path in table else table.get(path.rstrip("/"))  # IMDS takes both
        if body is None:
            return 404, "text/html", "<html><body><h1>404 - Not Found</h1></body></html>"
        return 200, "application/json" if body.startswith("{") else "text/plain", body

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeIMDS:
        imds = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: str, content_type: str = "text/plain",
                       headers: dict[str, str] | None = None) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                with imds._lock:
                    imds.log.append((self.command, self.path, status))

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/latest/api/token":
                    return self._reply(404, "")
                try:
                    ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
                except ValueError:
                    return self._reply(400, "missing or invalid X-aws-ec2-metadata-token-ttl-seconds")
                if not 1 <= ttl <= 21600:
                    return self._reply(400, "TTL must be 1-21600 seconds")
                token = os.urandom(16).hex()
                with imds._lock:
                    imds.tokens[token] = time.monotonic() + ttl
                self._reply(200, token, headers={"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})

            def do_GET(self) -> None:
                token = self.headers.get("X-aws-ec2-metadata-token", "")
                with imds._lock:
                    live = imds.tokens.get(token, 0.0) > time.monotonic()
                if not live:
                    return self._reply(401, "")
                status, content_type, body = imds._answer(self.path.split("?")[0])
                self._reply(status, body, content_type)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-imds", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextmanager
def running(server: Any) -> Iterator[Any]:
    """`with running(FakeIMDS()) as imds:` starts a server and stops it after the block."""
    started = server.start()
    try:
        yield started
    finally:
        started.stop()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.02) -> Any:
    """Poll until `predicate()` is truthy (returns it) or fail after `timeout_s` (a bound against
    hanging, not a timed assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
