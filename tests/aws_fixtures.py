"""AWS without an account: moto's server on 127.0.0.1 (the `moto_server` fixture of
conftest.py, tests/servers.MotoServer), plus what moto lacks answered through botocore's own
event hooks (Pricing, Service Quotas, spot prices, injected AWS errors).

Nothing here reaches a non-loopback address: conftest.py's guard (tests/netguard) fails any
test that tries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from .servers import MOTO_ACCOUNT, FaultProxy, MotoServer, loopback_env

ACCOUNT = MOTO_ACCOUNT
REGION = "us-east-1"
PUBLICATION_DATE = "2026-11-01T00:00:00Z"


@pytest.fixture
def moto(moto_server: MotoServer) -> MotoServer:
    """A fresh, empty AWS for each test."""
    moto_server.reset()
    return moto_server


@dataclass
class Account:
    """One prepared account shared by this module's tests: `aws setup` done, DLAMIs published.

    Tests keep to their own session ids, so they can share it without seeing each other.
    """

    moto: MotoServer
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
def account(moto_server: MotoServer) -> Account:
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
    return {
        "before-call.pricing.GetProducts": pricing_hook(PRICES),
        "before-call.service-quotas.GetServiceQuota": quota_hook(QUOTAS),
        "before-call.ec2.DescribeSpotPriceHistory": spot_price_hook(SPOT_PRICES, spot_when or SPOT_WHEN),
    }


def golden(path: Path, text: str) -> None:
    """Compare with a golden file; TRAINCTL_UPDATE_GOLDEN=1 rewrites it (review the diff)."""
    if os.environ.get("TRAINCTL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; create it with TRAINCTL_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{path.name} changed; rerun with TRAINCTL_UPDATE_GOLDEN=1 and review"


# ------------------------------------------- the same answers on the wire, for the CLI's processes

# What standard_hooks() answers, as tables (the CLI runs in its own process: no hooks there).
PRICES = {"g5.xlarge": 1.006, "g5.2xlarge": 1.212, "p4d.24xlarge": 21.9576, "g6.xlarge": 0.8048}
QUOTAS = {"L-DB2E81BA": 64, "L-3819A6DF": 64, "L-417A185B": 96, "L-7212CCBC": 96}
SPOT_PRICES = {("g5.xlarge", "us-east-1a"): 0.4123, ("g5.xlarge", "us-east-1b"): 0.3911,
               ("g5.2xlarge", "us-east-1a"): 0.5002, ("g6.xlarge", "us-east-1a"): 0.3020}
SPOT_WHEN = datetime(2026, 11, 30, 6, 0, tzinfo=timezone.utc)


def _json_reply(status: int, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(body).encode()


def price_list_reply(prices: dict[str, float], publication_date: str = PUBLICATION_DATE) -> Callable[[bytes], Any]:
    """Pricing GetProducts on the wire (JSON 1.1), from instance type -> USD/h."""

    def reply(body: bytes) -> Any:
        filters = {f["Field"]: f["Value"] for f in json.loads(body or b"{}").get("Filters", [])}
        usd = prices.get(filters.get("instanceType", ""))
        if usd is None:
            return _json_reply(200, {"PriceList": [], "FormatVersion": "aws_v1"})
        sku = "SKU" + filters["instanceType"].replace(".", "")
        product = {"product": {"sku": sku, "attributes": filters}, "publicationDate": publication_date,
                   "terms": {"OnDemand": {f"{sku}.JRTCKXETXF": {"effectiveDate": publication_date, "priceDimensions": {
                       f"{sku}.JRTCKXETXF.6YS6EN2CT7": {"unit": "Hrs", "pricePerUnit": {"USD": f"{usd:.10f}"}}}}}}}
        return _json_reply(200, {"PriceList": [json.dumps(product)], "FormatVersion": "aws_v1"})

    return reply


def quota_reply(values: dict[str, float]) -> Callable[[bytes], Any]:
    """Service Quotas GetServiceQuota on the wire, from quota code -> vCPUs."""

    def reply(body: bytes) -> Any:
        code = json.loads(body or b"{}").get("QuotaCode", "")
        if code not in values:
            return _json_reply(400, {"__type": "NoSuchResourceException", "message": f"quota {code} does not exist"})
        return _json_reply(200, {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "Value": values[code],
                                           "Unit": "None", "Adjustable": True, "GlobalQuota": False}})

    return reply


def spot_history_reply(prices: dict[tuple[str, str], float], when: datetime) -> Callable[[bytes], Any]:
    """EC2 DescribeSpotPriceHistory on the wire (the EC2 query protocol's XML)."""
    from urllib.parse import parse_qs

    def reply(body: bytes) -> Any:
        form = parse_qs(body.decode())
        wanted = {v[0] for k, v in form.items() if k.startswith("InstanceType.")}
        items = "".join(
            f"<item><instanceType>{itype}</instanceType><productDescription>Linux/UNIX</productDescription>"
            f"<spotPrice>{usd:.6f}</spotPrice><timestamp>{when.strftime('%Y-%m-%dT%H:%M:%S.000Z')}</timestamp>"
            f"<availabilityZone>{zone}</availabilityZone></item>"
            for (itype, zone), usd in prices.items() if not wanted or itype in wanted)
        xml = ('<?xml version="1.0" encoding="UTF-8"?><DescribeSpotPriceHistoryResponse '
               'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>trainctl-test</requestId>'
               f"<spotPriceHistorySet>{items}</spotPriceHistorySet><nextToken/></DescribeSpotPriceHistoryResponse>")
        return 200, {"Content-Type": "text/xml"}, xml.encode()

    return reply


def add_standard_answers(front: Any, *, prices: dict[str, float] | None = None,
                         quotas: dict[str, float] | None = None) -> Any:
    """Rules on a FaultProxy in front of moto: Pricing, Service Quotas and spot prices answered
    like a paid account (standard_hooks' tables), everything else forwarded to moto."""
    from .servers import Rule

    front.add(Rule("reply", target=r"^AWSPriceListService\.GetProducts$", times=None,
                   reply=price_list_reply(PRICES if prices is None else prices)))
    front.add(Rule("reply", target=r"^ServiceQuotasV20190624\.Get(AWSDefault)?ServiceQuota$", times=None,
                   reply=quota_reply(QUOTAS if quotas is None else quotas)))
    front.add(Rule("reply", form=r"(^|&)Action=DescribeSpotPriceHistory(&|$)", times=None,
                   reply=spot_history_reply(SPOT_PRICES, SPOT_WHEN)))
    return front


# ----------------------------------------------------- projects that run the real CLI against it

BUCKET = "demo-bucket"
TRAIN = """\
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=1)
print("training for", parser.parse_args().epochs, "epochs")
"""


@dataclass
class Cloud:
    """moto, and the proxy in front of it the CLI talks to; helpers to see what the CLI made."""

    moto: MotoServer
    front: FaultProxy

    def ec2(self) -> Any:
        return self.moto.client("ec2")

    def instances(self, session: str) -> list[dict[str, Any]]:
        reservations = self.ec2().describe_instances(
            Filters=[{"Name": "tag:trainctl:session", "Values": [session]}])["Reservations"]
        return sorted((i for r in reservations for i in r["Instances"]), key=lambda i: i["LaunchTime"])

    def keys(self, prefix: str = "") -> list[str]:
        """The bucket's keys under `prefix` (none before any setup made the bucket)."""
        s3 = self.moto.client("s3")
        try:
            found = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        except s3.exceptions.NoSuchBucket:
            return []
        return sorted(o["Key"] for o in found)


@pytest.fixture(scope="module")
def cloud(moto_server: MotoServer) -> Any:
    """A fresh account for this module with the PyTorch DLAMIs published, behind a FaultProxy
    that answers what moto lacks: what the CLI's own processes talk to."""
    moto_server.reset()
    moto_server.seed_dlami(REGION)
    front = add_standard_answers(FaultProxy(moto_server.endpoint_url).start())
    yield Cloud(moto_server, front)
    front.stop()


@dataclass
class Project:
    """A project folder whose trainctl.toml points [aws] at the proxy."""

    root: Path
    cloud: Cloud
    guard_log: Path

    def run(self, *args: str, timeout: float = 180, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        """`trainctl ARGS` in its own process, in the project, reaching loopback only."""
        from .conftest import clean_env

        environ = loopback_env(clean_env(COLUMNS="200"), guard_log=self.guard_log, **env)
        r = subprocess.run([sys.executable, "-m", "trainctl", *args], cwd=self.root, env=environ,
                           capture_output=True, text=True, timeout=timeout)
        assert not self.guard_log.exists(), self.guard_log.read_text()
        if check:
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    def launch(self, *args: str, **env: str) -> str:
        """`aws launch --yes --detach ...`; the new session's id."""
        r = self.run("aws", "launch", "--yes", "--detach", *args, **env)
        return re.search(r"Started session (\S+) on AWS", r.stdout).group(1)

    def record(self, session: str) -> dict[str, Any]:
        return json.loads((self.root / ".trainctl" / "sessions" / session / "session.json").read_text())


def make_project(root: Path, cloud: Cloud, *, setup: bool = True) -> Project:
    root.mkdir(parents=True, exist_ok=True)
    (root / "trainctl.toml").write_text(f'[aws]\nendpoint_url = "{cloud.front.url}"\nregion = "{REGION}"\n')
    (root / "train.py").write_text(TRAIN)
    project = Project(root, cloud, root.parent / "netguard.log")
    if setup:
        project.run("aws", "setup", "--bucket", BUCKET, "--yes")
    return project


def reclaim(cloud: Cloud, instance_id: str) -> None:
    """The test plays AWS reclaiming a spot machine (moto never does)."""
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    from tests.aws_fixtures import ACCOUNT

    cloud.ec2().terminate_instances(InstanceIds=[instance_id])
    instance = ec2_backends[ACCOUNT][REGION].get_instance(instance_id)
    instance.state_reason = StateReason("Server.SpotInstanceTermination: Spot instance termination",
                                        "Server.SpotInstanceTermination")
