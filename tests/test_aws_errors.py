"""Every AWS failure a user can meet is one line naming the problem, with the fix.

Rows go through the real path where moto or botocore's hooks can produce the failure (the
error comes back over HTTP from moto, or from a hook answering like AWS); the rest feed
``translate`` the exact error botocore raises for that AWS response.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from tests.aws_fixtures import REGION, error_answer, standard_hooks
from tests.servers import MotoServer
from trainctl.cloud.aws.context import AwsContext, AwsSettings
from trainctl.cloud.aws.errors import (
    AccessDeniedError,
    AmiNotFoundError,
    AwsRequestError,
    BucketNotFoundError,
    BucketRegionError,
    BucketTakenError,
    CapacityUnavailableError,
    CredentialsError,
    InstanceTypeNotOfferedError,
    NetworkError,
    QuotaExceededError,
    RegionError,
    SetupMissingError,
    ThrottledError,
    UnknownInstanceTypeError,
    translate,
)
from trainctl.cloud.aws.facts import gather_facts, resolve_ami
from trainctl.cloud.aws.inventory import list_resources
from trainctl.cloud.aws.launch import launch
from trainctl.cloud.aws.plan import LaunchRequest, plan_launch
from trainctl.cloud.aws.setup import check_bucket, setup
from trainctl.errors import (
    EXIT_NOT_FOUND,
    EXIT_PROVIDER,
    EXIT_USAGE,
    ConfigError,
    TrainctlError,
    UsageError,
)

NOW = datetime(2026, 11, 30, 7, 0, tzinfo=timezone.utc)


def request(**changes: Any) -> LaunchRequest:
    values: dict[str, Any] = {"session_id": "s-err", "project": "demo", "instance_type": "g5.xlarge",
                              "max_hours": 2, "agent_command": ("trainctl", "agent")}
    return LaunchRequest(**(values | changes))


@pytest.fixture(scope="module")
def account(moto_server: MotoServer) -> MotoServer:
    moto_server.reset()
    moto_server.seed_dlami(REGION)
    setup(moto_server.context(REGION), bucket="err-bucket", project="demo", yes=True)
    return moto_server


def launch_with(account: MotoServer, hooks: dict[str, Any], **changes: Any) -> None:
    ctx = account.context(REGION, {**standard_hooks(), **hooks})
    req = request(**changes)
    launch(ctx, plan_launch(req, gather_facts(ctx, req, now=NOW)))


def not_dry_run(answer: Callable[[], Any]) -> Callable[..., Any]:
    return lambda params, **_: None if params["body"].get("DryRun") else answer()


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each row: what to do against the account, the error type, its one-line message, a hint fragment.
LIVE_ROWS: list[tuple[str, Callable[[MotoServer], Any], type[Exception], str, str]] = [
    ("unknown region", lambda a: a.context("us-east-7"), RegionError,
     "Unknown AWS region 'us-east-7'.", "Did you mean: us-east-2, us-east-1"),
    ("unknown instance type", lambda a: gather_facts(a.context(REGION, standard_hooks()),
                                                     request(instance_type="g5.xlarg"), now=NOW),
     UnknownInstanceTypeError, "Unknown instance type 'g5.xlarg'.", "Did you mean: g5.xlarge"),
    ("type not offered in the region", lambda a: gather_facts(a.context(REGION, {
        **standard_hooks(), "before-call.ec2.DescribeInstanceTypeOfferings": lambda **_: (
            error_answer("x", "x", 200)[0], {"InstanceTypeOfferings": []})}), request(), now=NOW),
     InstanceTypeNotOfferedError, "Instance type g5.xlarge is not offered in us-east-1.", "--region auto"),
    ("type not offered in any zone tried", lambda a: launch_with(a, {"before-call.ec2.RunInstances": not_dry_run(
        lambda: error_answer("Unsupported", "Your requested instance type (g5.xlarge) is not supported in your "
                             "requested Availability Zone."))}),
     InstanceTypeNotOfferedError, "Instance type g5.xlarge is not offered in us-east-1a, us-east-1b", "--region"),
    ("vCPU quota exceeded", lambda a: launch_with(a, {"before-call.ec2.RunInstances": not_dry_run(
        lambda: error_answer("VcpuLimitExceeded", "You have requested more vCPU capacity than your current vCPU "
                             "limit of 0 allows for the instance bucket that the specified instance type belongs to."))}),
     QuotaExceededError,
     "The account's on-demand vCPU quota 'Running On-Demand G and VT instances' (L-DB2E81BA) is too low for "
     "on-demand g5.xlarge in us-east-1.",
     "--quota-code L-DB2E81BA --desired-value 4"),
    ("spot quota exceeded", lambda a: launch_with(a, {"before-call.ec2.CreateFleet": lambda **_: error_answer(
        "MaxSpotInstanceCountExceeded", "Max spot instance count exceeded")}, market="spot"),
     QuotaExceededError, "The account's spot vCPU quota 'All G and VT Spot Instance Requests' (L-3819A6DF) is "
     "too low for spot g5.xlarge in us-east-1.", "Cleaned up what the launch had made: launch template"),
    ("capacity unavailable in every zone", lambda a: launch_with(a, {"before-call.ec2.RunInstances": not_dry_run(
        lambda: error_answer("InsufficientInstanceCapacity", "Insufficient capacity.", 500))}),
     CapacityUnavailableError, "AWS has no on-demand capacity for g5.xlarge in us-east-1a, us-east-1b",
     "another --region"),
    ("access denied names the action from the message", lambda a: launch_with(a, {
        "before-call.ec2.RunInstances": not_dry_run(lambda: error_answer(
            "UnauthorizedOperation", "User: arn:aws:iam::123456789012:user/dev is not authorized to perform: "
            "iam:PassRole on resource: arn:aws:iam::123456789012:role/trainctl-demo-machine"))}),
     AccessDeniedError, "Access denied: the AWS identity lacks iam:PassRole.", "Grant iam:PassRole"),
    ("access denied, encoded: the operation's action", lambda a: launch_with(a, {
        "before-call.ec2.RunInstances": not_dry_run(lambda: error_answer(
            "UnauthorizedOperation", "You are not authorized to perform this operation. Encoded authorization "
            "failure message: AbC123"))}),
     AccessDeniedError, "Access denied: the AWS identity lacks ec2:RunInstances.", "decode-authorization-message"),
    ("AMI not in the region", lambda a: gather_facts(a.context(REGION, standard_hooks()),
                                                     request(ami="ami-00000000000000000"), now=NOW),
     AmiNotFoundError, "AMI ami-00000000000000000 is not available in us-east-1", "--ami auto"),
    ("no PyTorch DLAMI published", lambda a: resolve_ami(a.context("eu-west-3"), "auto", "x86_64"),
     AmiNotFoundError, "No PyTorch Deep Learning AMI found under /aws/service/deeplearning/ami/x86_64/ in eu-west-3.",
     "--ami ami-"),
    ("bucket missing", lambda a: list_resources(a.context(REGION, standard_hooks()), bucket="no-such-bucket"),
     BucketNotFoundError, "Bucket 'no-such-bucket' does not exist.", "trainctl aws setup --bucket no-such-bucket"),
    ("bucket missing, checked first", lambda a: check_bucket(a.context(REGION), "no-such-bucket"),
     BucketNotFoundError, "Bucket 'no-such-bucket' does not exist.", "trainctl aws setup"),
    ("bucket in another region", lambda a: check_bucket(a.context("eu-west-1"), "err-bucket"),
     BucketRegionError, "Bucket 'err-bucket' is in us-east-1, not eu-west-1.", "Use --region us-east-1"),
    ("bucket name taken by another account", lambda a: setup(a.context(REGION, {
        "before-call.s3.CreateBucket": lambda **_: error_answer(
            "BucketAlreadyExists", "The requested bucket name is not available.", 409)}),
        bucket="taken-name", project="demo", yes=True),
     BucketTakenError, "Bucket name 'taken-name' is taken by another AWS account.", "pick another"),
    ("bad bucket name", lambda a: setup(a.context(REGION), bucket="My_Bucket", project="demo"),
     UsageError, "'My_Bucket' is not a valid S3 bucket name.", "lowercase letters"),
    ("setup not run in the region", lambda a: plan_launch(request(), gather_facts(
        a.context("us-west-2", standard_hooks()), request(), now=NOW)).check()
     if a.seed_dlami("us-west-2") else None,
     SetupMissingError, "The security group for project 'demo' is missing in us-west-2.",
     "trainctl aws setup --region us-west-2"),
    ("credentials AWS rejects", lambda a: a.context(REGION, {"before-call.sts.GetCallerIdentity": lambda **_: error_answer(
        "InvalidClientTokenId", "The security token included in the request is invalid.", 403)}).account_id(),
     CredentialsError, "AWS rejected the credentials (InvalidClientTokenId).", "aws sts get-caller-identity"),
    ("network unreachable", lambda a: a.context(REGION, endpoint_url=f"http://127.0.0.1:{closed_port()}",
                                                max_attempts=2).account_id(),
     NetworkError, "Could not reach AWS at http://127.0.0.1:", "Check the network"),
]


@pytest.mark.parametrize(("name", "action", "error", "message", "hint"), LIVE_ROWS, ids=[r[0] for r in LIVE_ROWS])
def test_aws_failures_are_one_line_with_the_fix(account: MotoServer, name, action, error, message, hint):
    with pytest.raises(error) as caught:
        action(account)
    assert isinstance(caught.value, TrainctlError)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text and "Traceback" not in text
    assert caught.value.hint and hint in caught.value.hint and "\n" not in caught.value.hint
    assert caught.value.exit_code in (EXIT_PROVIDER, EXIT_USAGE, EXIT_NOT_FOUND)


def test_no_credentials_says_how_to_set_them(account: MotoServer, monkeypatch: pytest.MonkeyPatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    ctx = account.context(REGION, credentials=False)
    with pytest.raises(CredentialsError) as caught:
        ctx.account_id()
    assert str(caught.value) == "No AWS credentials found."
    assert "aws configure" in caught.value.hint and caught.value.exit_code == EXIT_PROVIDER


def test_throttling_is_retried_with_backoff_then_said(account: MotoServer):
    from botocore.awsrequest import AWSResponse

    attempts: list[str] = []

    def throttled(request: Any, **_: Any) -> Any:
        attempts.append(request.url)
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>RequestLimitExceeded</Code>'
                b"<Message>Request limit exceeded.</Message></Error></Errors><RequestID>r1</RequestID></Response>")
        return AWSResponse(request.url, 503, {}, _Raw(body))

    ctx = account.context(REGION, {"before-send.ec2.DescribeInstanceTypes": throttled}, max_attempts=3)
    with pytest.raises(ThrottledError) as caught:
        gather_facts(ctx, request(), now=NOW)
    assert len(attempts) == 3, attempts  # botocore's own retries ran first
    assert str(caught.value) == "AWS kept throttling ec2:DescribeInstanceTypes (RequestLimitExceeded) after 3 attempts."
    assert "max_attempts" in caught.value.hint


def test_the_plan_names_a_permission_the_launch_lacks(account: MotoServer):
    import json

    hooks = {
        "before-call.ec2.RunInstances": lambda params, **_: error_answer(
            "UnauthorizedOperation", "You are not authorized to perform this operation. Encoded authorization "
            "failure message: EnC0d3d") if params["body"].get("DryRun") else None,
        "before-call.sts.DecodeAuthorizationMessage": lambda **_: (error_answer("x", "x", 200)[0], {
            "DecodedMessage": json.dumps({"allowed": False, "context": {"action": "iam:PassRole"}})}),
    }
    ctx = account.context(REGION, {**standard_hooks(), **hooks})
    facts = gather_facts(ctx, request(), now=NOW)
    assert facts.missing_permissions == ("iam:PassRole",)
    plan = plan_launch(request(), facts)
    with pytest.raises(AccessDeniedError, match="lacks iam:PassRole, which the launch needs"):
        plan.check()


def _client_error(code: str, message: str = "", status: int = 400, **metadata: Any) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status, **metadata}}, "Operation")


def _botocore(name: str, **kwargs: Any) -> Exception:
    import botocore.exceptions

    return getattr(botocore.exceptions, name)(**kwargs)


TRANSLATE_ROWS: list[tuple[str, Callable[[], Exception], dict[str, Any], type[Exception], str, str]] = [
    ("expired token", lambda: _client_error("ExpiredToken", "The security token included in the request is expired"),
     {"service": "sts", "operation": "GetCallerIdentity"}, CredentialsError,
     "AWS rejected the credentials (ExpiredToken).", "aws sso login"),
    ("sso session expired", lambda: _botocore("TokenRetrievalError", provider="sso", error_msg="expired"),
     {"service": "ec2", "operation": "DescribeInstances"}, CredentialsError,
     "The AWS SSO session has expired or was never started.", "aws sso login"),
    ("region not enabled", lambda: _client_error("OptInRequired", "You are not subscribed to this service."),
     {"service": "ec2", "operation": "DescribeInstances", "region": "ap-east-1"}, RegionError,
     "The account has not enabled region ap-east-1.", "aws account enable-region --region-name ap-east-1"),
    ("s3 access denied names the s3 action", lambda: _client_error("403", "Forbidden", 403),
     {"service": "s3", "operation": "HeadBucket", "bucket": "b"}, AccessDeniedError,
     "Access denied: the AWS identity lacks s3:ListBucket.", "Grant s3:ListBucket"),
    ("bucket moved", lambda: _client_error("PermanentRedirect", "", 301,
                                           HTTPHeaders={"x-amz-bucket-region": "eu-central-1"}),
     {"service": "s3", "operation": "GetObject", "bucket": "b", "region": "us-east-1"}, BucketRegionError,
     "Bucket 'b' is in eu-central-1, not us-east-1.", "--region eu-central-1"),
    ("throttled with attempts", lambda: _client_error("ThrottlingException", "Rate exceeded", 400, RetryAttempts=7),
     {"service": "service-quotas", "operation": "GetServiceQuota"}, ThrottledError,
     "AWS kept throttling servicequotas:GetServiceQuota (ThrottlingException) after 8 attempts.", "Wait a minute"),
    ("spot capacity names the market", lambda: _client_error("InsufficientInstanceCapacity", "no capacity in us-west-2b", 500),
     {"service": "ec2", "operation": "CreateFleet", "instance_type": "p4d.24xlarge", "market": "spot"},
     CapacityUnavailableError, "AWS has no spot capacity for p4d.24xlarge in us-west-2b right now.", "on-demand"),
    ("P-family spot quota", lambda: _client_error("MaxSpotInstanceCountExceeded", "Max spot instance count exceeded"),
     {"service": "ec2", "operation": "CreateFleet", "instance_type": "p4d.24xlarge", "region": "us-west-2", "vcpus": 96},
     QuotaExceededError, "The account's spot vCPU quota 'All P Spot Instance Requests' (L-7212CCBC) is too low",
     "--quota-code L-7212CCBC --desired-value 96"),
    ("unknown type in a launch", lambda: _client_error("InvalidParameterValue", "Invalid value 'g5.xlarj' for InstanceType."),
     {"service": "ec2", "operation": "RunInstances", "type_choices": ["g5.xlarge", "g5.2xlarge", "m5.large"]},
     UnknownInstanceTypeError, "Unknown instance type 'g5.xlarj'.", "Did you mean: g5.xlarge"),
    ("instance profile not visible yet", lambda: _client_error(
        "InvalidParameterValue", "Value (trainctl-demo-machine) for parameter iamInstanceProfile.name is invalid. "
        "Invalid IAM Instance Profile name"),
     {"service": "ec2", "operation": "RunInstances", "region": "us-east-1"}, SetupMissingError,
     "The instance profile is missing", "trainctl aws setup --region us-east-1"),
    ("an error with no advice keeps AWS's words", lambda: _client_error("InvalidBlockDeviceMapping", "bad mapping"),
     {"service": "ec2", "operation": "RunInstances"}, AwsRequestError,
     "AWS refused ec2:RunInstances: InvalidBlockDeviceMapping: bad mapping", "--dry-run"),
]


@pytest.mark.parametrize(("name", "raised", "where", "error", "message", "hint"), TRANSLATE_ROWS,
                         ids=[r[0] for r in TRANSLATE_ROWS])
def test_translate_maps_each_aws_code(name, raised, where, error, message, hint):
    translated = translate(raised(), **where)
    assert isinstance(translated, error)
    assert str(translated).startswith(message) and "\n" not in str(translated)
    assert translated.hint and hint in translated.hint


@pytest.mark.parametrize(("data", "message"), [
    ({"regoin": "us-east-1"}, "Unknown key 'regoin' in [aws]."),
    ({"max_attempts": "3"}, "[aws] max_attempts must be int, not '3'."),
    ({"max_attempts": 0}, "[aws] max_attempts must be at least 1."),
    ({"budget_usd": True}, "[aws] budget_usd must be a number, not True."),
    ({"disk_gb": 4}, "[aws] disk_gb must be at least 8"),
])
def test_bad_aws_settings_are_refused(data, message):
    with pytest.raises(ConfigError) as caught:
        AwsSettings.from_mapping(data)
    assert str(caught.value).startswith(message)


def test_settings_read_from_a_plain_mapping():
    settings = AwsSettings.from_mapping({"region": "eu-west-1", "budget_usd": 20, "max_attempts": 4})
    assert (settings.region, settings.budget_usd, settings.max_attempts, settings.ami) == ("eu-west-1", 20.0, 4, "auto")
    with pytest.raises(RegionError, match="No AWS region is set"):
        AwsContext.from_settings(AwsSettings())


def test_importing_trainctl_and_the_aws_layer_does_not_import_boto3():
    import subprocess
    import sys

    from tests.conftest import clean_env

    code = ("import sys, trainctl, trainctl.cloud.aws.plan, trainctl.cloud.aws.setup, trainctl.cloud.aws.inventory, "
            "trainctl.cloud.aws.launch; print(sorted(m for m in ('boto3', 'botocore') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.stdout.strip() == "[]", r.stderr
