"""The test servers and the loopback guard that the cloud tests stand on: they must behave like
the real services where the tests rely on it, and the guard must refuse before any packet leaves."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from .netguard import loopback_guard
from .servers import loopback_env


def test_guard_refuses_non_loopback_connects_in_this_process():
    assert socket.socket.connect.__module__ == loopback_guard.__name__  # installed before any test runs
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, \
            pytest.raises(loopback_guard.LoopbackOnlyError, match="only reach loopback"):
        # 0.0.0.0 is not loopback to the guard, yet a real connect to it would stay on this host
        s.connect(("0.0.0.0", 9))
    assert socket.getaddrinfo.__module__ == loopback_guard.__name__
    with pytest.raises(loopback_guard.LoopbackOnlyError, match=r"name lookup of 'example\.invalid'"):
        socket.getaddrinfo("example.invalid", 443)
    assert len(loopback_guard.violations) == 2
    del loopback_guard.violations[:]  # recorded violations fail a test at teardown; these were wanted
    with socket.create_server(("127.0.0.1", 0)) as server:
        socket.create_connection(server.getsockname(), timeout=5).close()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "::ffff:127.0.0.1"])
def test_guard_allows_loopback(host):
    assert loopback_guard.is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "169.254.169.254", "192.0.2.1", "::", "s3.amazonaws.com"])
def test_guard_refuses_other_hosts(host):
    assert not loopback_guard.is_loopback(host)


def test_guard_is_installed_in_child_processes(tmp_path):
    log = tmp_path / "netguard.log"
    code = ("import socket\n"
            "s = socket.socket()\n"
            "try:\n"
            "    s.connect(('0.0.0.0', 9))\n"
            "except Exception as e:\n"
            "    print(type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], env=loopback_env(guard_log=log), capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.strip() == "LoopbackOnlyError", r.stderr
    assert "blocked connect to 0.0.0.0:9" in log.read_text()


def test_child_processes_get_fake_aws_credentials_only(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "someones-real-profile")
    env = loopback_env()
    assert "AWS_PROFILE" not in env and env["AWS_ACCESS_KEY_ID"] == "testing"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"


def _imds(imds, path: str, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(imds.endpoint + path, headers={"X-aws-ec2-metadata-token": token} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def _token(imds, ttl: str = "60") -> str:
    request = urllib.request.Request(imds.endpoint + "/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def test_fake_imds_speaks_imdsv2(imds):
    meta = "/latest/meta-data/"
    assert _imds(imds, meta + "instance-id", None)[0] == 401  # IMDSv2: a token is required
    token = _token(imds)
    assert _imds(imds, meta + "instance-id", token) == (200, imds.instance_id)
    assert _imds(imds, meta + "placement/region", token) == (200, "us-east-1")
    assert _imds(imds, meta + "spot/instance-action", token)[0] == 404
    assert _imds(imds, meta + "events/recommendations/rebalance", token)[0] == 404
    imds.set_rebalance()
    status, body = _imds(imds, meta + "events/recommendations/rebalance", token)
    assert status == 200 and json.loads(body)["noticeTime"].endswith("Z")
    notice = imds.set_spot_action("terminate", in_s=120)
    status, body = _imds(imds, meta + "spot/instance-action", token)
    assert status == 200 and json.loads(body) == notice and notice["action"] == "terminate"
    assert "spot/" in _imds(imds, meta, token)[1].split()
    imds.clear()
    assert _imds(imds, meta + "spot/instance-action", token)[0] == 404


@pytest.mark.parametrize("ttl", ["0", "21601", "x"])
def test_fake_imds_refuses_bad_token_ttls(imds, ttl):
    with pytest.raises(urllib.error.HTTPError) as caught:
        _token(imds, ttl)
    assert caught.value.code == 400


def test_botocore_reads_the_fake_imds_through_the_endpoint_variable(imds, monkeypatch):
    import botocore.session
    from botocore.utils import InstanceMetadataRegionFetcher

    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint)
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    imds.region = "eu-west-1"
    endpoint = botocore.session.Session().get_config_variable("ec2_metadata_service_endpoint")
    assert endpoint == imds.endpoint
    fetcher = InstanceMetadataRegionFetcher(timeout=5, num_attempts=1,
                                            config={"ec2_metadata_service_endpoint": endpoint})
    assert fetcher.retrieve_region() == "eu-west-1"
    assert any(method == "PUT" for method, _path, _status in imds.log)


def test_fault_proxy_injects_and_logs(fault_proxy, s3_bucket):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    # botocore's own retries off, so the injected status reaches the caller
    plain = boto3.session.Session().client("s3", endpoint_url=fault_proxy.url, region_name="us-east-1",
                                           config=Config(retries={"total_max_attempts": 1}))
    fault_proxy.fail(503, code="SlowDown", method="PUT", times=1)
    with pytest.raises(ClientError) as caught:
        plain.put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    assert caught.value.response["Error"]["Code"] == "SlowDown"
    plain.put_object(Bucket=s3_bucket, Key="k", Body=b"x")
    assert [(r.method, r.status, r.action) for r in fault_proxy.requests("PUT")] == [
        ("PUT", 503, "status"), ("PUT", 200, None)]
    assert plain.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"x"
