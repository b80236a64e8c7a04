"""AWS without an account: moto's server on 127.0.0.1, plus what moto lacks answered through
botocore's own event hooks (Pricing, Service Quotas, spot prices, injected AWS errors).

Nothing here reaches a non-loopback address: ``loopback_only`` makes any other connection or
name lookup fail loudly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

ACCOUNT = "123456789012"  # moto's account
REGION = "us-east-1"
PUBLICATION_DATE = "2026-11-01T00:00:00Z"

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _is_loopback(host: Any) -> bool:
    return isinstance(host, str) and (host in _LOOPBACK or host.startswith("127."))


@pytest.fixture(scope="session")
def loopback_only() -> Iterator[None]:
    """Any connection or DNS lookup beyond loopback raises: a test can't reach AWS by accident."""
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise AssertionError(f"test tried to reach {address!r}: only loopback is allowed")
        return real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_loopback(host if isinstance(host, str) else host.decode()):
            raise AssertionError(f"test tried to resolve {host!r}: only loopback is allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    try:
        yield
    finally:
        socket.socket.connect = real_connect  # type: ignore[method-assign]
        socket.getaddrinfo = real_getaddrinfo


@pytest.fixture(scope="session")
def aws_isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """No real credentials, config files or instance metadata can be picked up."""
    home = tmp_path_factory.mktemp("aws-home")
    values = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"), "AWS_CONFIG_FILE": str(home / "config"),
    }
    drop = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    saved = {k: os.environ.get(k) for k in (*values, *drop)}
    os.environ.update(values)
    for key in drop:
        os.environ.pop(key, None)
    try:
        yield values
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@functools.lru_cache(maxsize=1)
def _shared_loader() -> Any:
    import botocore.loaders

    return botocore.loaders.create_loader()


class MotoAws:
    """One moto server and helpers to seed it and to build trainctl contexts against it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + "/moto-api/reset", method="POST"), timeout=10).read()

    def session(self, hooks: dict[str, Callable[..., Any]] | None = None, *, credentials: bool = True) -> Any:
        import boto3
        import botocore.session

        core = botocore.session.get_session()
        core.register_component("data_loader", _shared_loader())  # parse AWS's model files once
        keys = ({"aws_access_key_id": "testing", "aws_secret_access_key": "testing"} if credentials else {})
        session = boto3.Session(region_name=REGION, botocore_session=core, **keys)
        for event, handler in (hooks or {}).items():
            session.events.register(event, handler)
        return session

    def context(self, region: str = REGION, hooks: dict[str, Callable[..., Any]] | None = None, *,
                max_attempts: int = 2, credentials: bool = True, endpoint_url: str | None = None) -> Any:
        from trainctl.cloud.aws.context import AwsContext

        return AwsContext(region, endpoint_url=endpoint_url or self.url, max_attempts=max_attempts,
                          session=self.session(hooks, credentials=credentials))

    def client(self, service: str, region: str = REGION) -> Any:
        return self.session().client(service, region_name=region, endpoint_url=self.url)

    def seed_dlami(self, region: str = REGION, arch: str = "x86_64",
                   types: tuple[str, ...] = ("oss-nvidia-driver-gpu-pytorch-2.6-amazon-linux-2023",
                                             "oss-nvidia-driver-gpu-pytorch-2.7-ubuntu-22.04",
                                             "oss-nvidia-driver-gpu-pytorch-2.10-ubuntu-22.04",
                                             "oss-nvidia-driver-gpu-pytorch-2.10-ubuntu-24.04",
                                             "base-oss-nvidia-driver-gpu-ubuntu-24.04")) -> dict[str, str]:
        """Public DLAMI parameters as AWS publishes them (moto refuses writes under /aws/)."""
        from moto.ssm.models import Parameter, ssm_backends

        ec2 = self.client("ec2", region)
        backend = ssm_backends[ACCOUNT][region]
        seeded: dict[str, str] = {}
        for ami_type in types:
            image_id = ec2.register_image(Name=f"Deep Learning {ami_type} 20261101",
                                          Architecture=arch, RootDeviceName="/dev/sda1")["ImageId"]
            for suffix in ("latest/ami-id", "20261101/ami-id"):
                name = f"/aws/service/deeplearning/ami/{arch}/{ami_type}/{suffix}"
                backend._parameters[name].append(Parameter(
                    account_id=ACCOUNT, name=name, value=image_id, parameter_type="String",
                    description=None, allowed_pattern=None, keyid=None, last_modified_date=time.time(),
                    version=1, data_type="aws:ec2:image"))
            seeded[ami_type] = image_id
        return seeded


@pytest.fixture(scope="session")
def moto_server(loopback_only: None, aws_isolated_env: dict[str, str]) -> Iterator[MotoAws]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoAws(f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def moto(moto_server: MotoAws) -> MotoAws:
    """A fresh, empty AWS for each test."""
    moto_server.reset()
    return moto_server


@dataclass
class Account:
    """One prepared account shared by this module's tests: `aws setup` done, DLAMIs published.

    Tests keep to their own session ids, so they can share it without seeing each other.
    """

    moto: MotoAws
    seeded: dict[str, str]

    def context(self, hooks: dict[str, Any] | None = None) -> Any:
        return self.moto.context(REGION, {**standard_hooks(), **(hooks or {})})

    def instances(self, session: str) -> list[dict[str, Any]]:
        reservations = self.moto.client("ec2").describe_instances(
            Filters=[{"Name": "tag:trainctl:session", "Values": [session]}])["Reservations"]
        return [i for r in reservations for i in r["Instances"]]

    def templates(self, session: str) -> list[dict[str, Any]]:
        return self.moto.client("ec2").describe_launch_templates(
            Filters=[{"Name": "tag:trainctl:session", "Values": [session]}])["LaunchTemplates"]


@pytest.fixture(scope="module")
def account(moto_server: MotoAws) -> Account:
    """A fresh account per test module, prepared once."""
    moto_server.reset()
    seeded = moto_server.seed_dlami(REGION)
    from trainctl.cloud.aws.setup import setup

    setup(moto_server.context(REGION), bucket="demo-bucket-us-east-1", project="demo", yes=True)
    return Account(moto_server, seeded)


@pytest.fixture
def sid(request: pytest.FixtureRequest) -> str:
    """A session id of this test's own."""
    return "s-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:10]


# ----------------------------------------------------------------- answers moto doesn't give

def http_response(status: int = 200) -> Any:
    from botocore.awsrequest import AWSResponse

    return AWSResponse("http://127.0.0.1/", status, {}, None)


def error_answer(code: str, message: str, status: int = 400, **extra: Any) -> tuple[Any, dict[str, Any]]:
    """What botocore would have parsed from an AWS error response."""
    return http_response(status), {"Error": {"Code": code, "Message": message, **extra},
                                   "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 0}}


def request_params(params: dict[str, Any]) -> dict[str, Any]:
    """The API parameters of a serialized request (query protocol: a dict; JSON: bytes)."""
    body = params.get("body")
    if isinstance(body, (bytes, str)) and body:
        try:
            return json.loads(body)
        except ValueError:
            return {}
    return body if isinstance(body, dict) else {}


def pricing_hook(prices: dict[Any, float], publication_date: str = PUBLICATION_DATE) -> Callable[..., Any]:
    """Answer Pricing GetProducts like AWS (PriceList entries are JSON strings); ``prices`` is
    keyed by instance type, or by (instance type, region) for a region's own price."""

    def handler(params: dict[str, Any], **_: Any) -> Any:
        filters = {f["Field"]: f["Value"] for f in request_params(params).get("Filters", [])}
        itype = filters.get("instanceType", "")
        usd = prices.get((itype, filters.get("regionCode")), prices.get(itype))
        if usd is None:
            return http_response(), {"PriceList": [], "FormatVersion": "aws_v1"}
        sku = "SKU" + filters["instanceType"].replace(".", "")
        product = {"product": {"sku": sku, "attributes": filters}, "publicationDate": publication_date,
                   "terms": {"OnDemand": {f"{sku}.JRTCKXETXF": {"effectiveDate": publication_date,
                                                                 "priceDimensions": {f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                                                                     "unit": "Hrs", "pricePerUnit": {"USD": f"{usd:.10f}"}}}}}}}
        return http_response(), {"PriceList": [json.dumps(product)], "FormatVersion": "aws_v1"}

    return handler


def quota_hook(values: dict[str, float]) -> Callable[..., Any]:
    """Answer Service Quotas GetServiceQuota (or the default-value call) from ``values`` by code."""

    def handler(params: dict[str, Any], **_: Any) -> Any:
        code = request_params(params).get("QuotaCode", "")
        if code not in values:
            return error_answer("NoSuchResourceException", f"The request failed because the specified "
                                f"quota {code} does not exist.")
        return http_response(), {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "Value": values[code],
                                           "Unit": "None", "Adjustable": True, "GlobalQuota": False}}

    return handler


def spot_price_hook(prices: dict[tuple[str, str], float], when: datetime) -> Callable[..., Any]:
    """Answer DescribeSpotPriceHistory with one current price per (instance type, zone)."""

    def handler(params: dict[str, Any], **_: Any) -> Any:
        body = request_params(params)
        wanted = {v for k, v in body.items() if k.startswith("InstanceType.")}
        history = [{"AvailabilityZone": zone, "InstanceType": itype, "ProductDescription": "Linux/UNIX",
                    "SpotPrice": f"{usd:.6f}", "Timestamp": when}
                   for (itype, zone), usd in prices.items() if not wanted or itype in wanted]
        return http_response(), {"SpotPriceHistory": history, "NextToken": ""}

    return handler


def standard_hooks(*, spot_when: datetime | None = None) -> dict[str, Callable[..., Any]]:
    """Prices and quotas a paid account could have, for the tests that don't study them."""
    when = spot_when or datetime(2026, 11, 30, 6, 0, tzinfo=timezone.utc)
    return {
        "before-call.pricing.GetProducts": pricing_hook({"g5.xlarge": 1.006, "g5.2xlarge": 1.212,
                                                         "p4d.24xlarge": 21.9576, "g6.xlarge": 0.8048}),
        "before-call.service-quotas.GetServiceQuota": quota_hook({"L-DB2E81BA": 64, "L-3819A6DF": 64,
                                                                  "L-417A185B": 96, "L-7212CCBC": 96}),
        "before-call.ec2.DescribeSpotPriceHistory": spot_price_hook(
            {("g5.xlarge", "us-east-1a"): 0.4123, ("g5.xlarge", "us-east-1b"): 0.3911,
             ("g5.2xlarge", "us-east-1a"): 0.5002, ("g6.xlarge", "us-east-1a"): 0.3020}, when),
    }


def golden(path: Path, text: str) -> None:
    """Compare with a golden file; TRAINCTL_UPDATE_GOLDEN=1 rewrites it (review the diff)."""
    if os.environ.get("TRAINCTL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; create it with TRAINCTL_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{path.name} changed; rerun with TRAINCTL_UPDATE_GOLDEN=1 and review"
