"""AWS failures as one-line typed errors that name the problem and the fix.

``translate`` maps what boto3 raises (``ClientError`` codes, botocore's credential and network
exceptions) to an ``AwsError`` subclass; callers ``raise translate(e, ...) from e``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from ...errors import EXIT_NOT_FOUND, EXIT_PROVIDER, EXIT_USAGE, TrainctlError
from .names import QuotaRef, quota_for


class AwsError(TrainctlError):
    exit_code = EXIT_PROVIDER


class CredentialsError(AwsError, PermissionError):
    """No credentials, or credentials AWS rejects."""


class AccessDeniedError(AwsError, PermissionError):
    def __init__(self, message: str, hint: str | None = None, *, action: str) -> None:
        super().__init__(message, hint)
        self.action = action


class RegionError(AwsError, ValueError):
    """Unknown region, or one the account has not enabled."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None, *, region: str,
                 near: tuple[str, ...] = ()) -> None:
        super().__init__(message, hint)
        self.region = region
        self.near = near


class UnknownInstanceTypeError(AwsError, ValueError):
    exit_code = EXIT_USAGE

    def __init__(self, instance_type: str, near: Iterable[str] = ()) -> None:
        self.instance_type = instance_type
        self.near = tuple(near)
        hint = (f"Did you mean: {', '.join(self.near)}?" if self.near else
                "List the types of a region with: aws ec2 describe-instance-type-offerings --region REGION")
        super().__init__(f"Unknown instance type '{instance_type}'.", hint)


class InstanceTypeNotOfferedError(AwsError, ValueError):
    exit_code = EXIT_USAGE

    def __init__(self, instance_type: str, where: str, offered_in: Iterable[str] = ()) -> None:
        self.instance_type = instance_type
        self.where = where
        self.offered_in = tuple(offered_in)
        hint = (f"It is offered in: {', '.join(self.offered_in)}." if self.offered_in else
                "Pick another --region (or --region auto) or another --instance-type.")
        super().__init__(f"Instance type {instance_type} is not offered in {where}.", hint)


class QuotaExceededError(AwsError):
    def __init__(self, message: str, *, quota: QuotaRef | None, region: str, vcpus_needed: int | None,
                 limit_vcpus: float | None = None) -> None:
        self.quota = quota
        self.region = region
        self.vcpus_needed = vcpus_needed
        self.limit_vcpus = limit_vcpus
        if quota:
            want = max(vcpus_needed or 0, 1)
            hint = (f"Raise quota {quota.code} ('{quota.name}') to at least {want} vCPUs: "
                    f"{quota.raise_command(region, want)}  (or {quota.console_url(region)})")
        else:
            hint = ("Find the quota with: aws service-quotas list-service-quotas --service-code ec2 "
                    f"--region {region}, and request an increase.")
        super().__init__(message, hint)


class CapacityUnavailableError(AwsError):
    def __init__(self, instance_type: str, zones: Iterable[str], market: str) -> None:
        self.instance_type = instance_type
        self.zones = tuple(zones)
        self.market = market
        where = ", ".join(self.zones) if self.zones else "any zone"
        super().__init__(
            f"AWS has no {market} capacity for {instance_type} in {where} right now.",
            "Retry later, try another --region (or --region auto), or another --instance-type"
            + (" or --spot" if market == "on-demand" else " or on-demand (drop --spot)") + ".")


class BucketNotFoundError(AwsError, LookupError):
    exit_code = EXIT_NOT_FOUND

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        super().__init__(f"Bucket '{bucket}' does not exist.",
                         f"Create it with: trainctl aws setup --bucket {bucket}")


class BucketRegionError(AwsError, ValueError):
    exit_code = EXIT_USAGE

    def __init__(self, bucket: str, bucket_region: str | None, region: str) -> None:
        self.bucket = bucket
        self.bucket_region = bucket_region
        self.region = region
        where = f"in {bucket_region}" if bucket_region else "in another region"
        super().__init__(
            f"Bucket '{bucket}' is {where}, not {region}.",
            (f"Use --region {bucket_region}, or " if bucket_region else "Use ")
            + f"a bucket in {region} (trainctl aws setup --region {region} --bucket NEW-NAME); "
              "cross-region transfer is slower and billed.")


class BucketTakenError(AwsError, ValueError):
    exit_code = EXIT_USAGE

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        super().__init__(f"Bucket name '{bucket}' is taken by another AWS account.",
                         "Bucket names are global: pick another, e.g. add your account id or project name.")


class AmiNotFoundError(AwsError, ValueError):
    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint or "Use --ami auto (the newest PyTorch Deep Learning AMI) "
                                          "or an AMI id from this region.")


class SetupMissingError(AwsError, LookupError):
    """Something `trainctl aws setup` creates is not there."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, region: str | None = None) -> None:
        where = f" --region {region}" if region else ""
        super().__init__(message, f"Run once: trainctl aws setup{where} --bucket BUCKET")


class ThrottledError(AwsError):
    def __init__(self, action: str, code: str, attempts: int | None) -> None:
        self.action = action
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts else ""
        super().__init__(f"AWS kept throttling {action} ({code}){tries}.",
                         "Wait a minute and retry; for a busy account raise [aws] max_attempts in trainctl.toml.")


class NetworkError(AwsError, ConnectionError):
    def __init__(self, endpoint: str, detail: str, attempts: int | None = None) -> None:
        self.endpoint = endpoint
        tries = f" after {attempts} attempts" if attempts else ""
        super().__init__(f"Could not reach AWS at {endpoint}{tries}: {detail}.",
                         "Check the network, a proxy (HTTPS_PROXY) or the endpoint setting, then retry.")


class BudgetExceededError(AwsError, ValueError):
    exit_code = EXIT_USAGE

    def __init__(self, projected_usd: float, budget_usd: float, max_hours: float, usd_per_hour: float) -> None:
        self.projected_usd = projected_usd
        self.budget_usd = budget_usd
        affordable = budget_usd / usd_per_hour if usd_per_hour > 0 else max_hours
        super().__init__(
            f"Projected cost ${projected_usd:.2f} ({max_hours:g} h x ${usd_per_hour:.4f}/h) exceeds "
            f"the budget of ${budget_usd:.2f}.",
            f"Lower --max-hours to {int(affordable * 100) / 100:g} or less, use --spot or a cheaper "
            "--instance-type, or raise [cloud] budget_usd in trainctl.toml.")


class LaunchRefusedError(AwsError, ValueError):
    """The plan has a blocking problem (user data too large, setup missing, ...)."""

    exit_code = EXIT_USAGE


class AwsRequestError(AwsError):
    """An AWS error this module has no specific advice for: code and message as AWS gave them."""

    def __init__(self, action: str, code: str, message: str) -> None:
        self.action = action
        self.code = code
        super().__init__(f"AWS refused {action}: {code}: {message}",
                         "See the AWS message above; rerun with --dry-run to see the request.")


def missing_boto3() -> TrainctlError:
    return TrainctlError("The AWS backend needs boto3, which is not installed.",
                         "Install with: pip install 'trainctl[aws]'")


# --------------------------------------------------------------------------- translation

_CREDENTIAL_CODES = frozenset({
    "AuthFailure", "UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidAccessKeyId",
    "MissingAuthenticationToken", "IncompleteSignature", "InvalidToken",
})
_ACCESS_CODES = frozenset({
    "UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "Forbidden", "403",
    "UnauthorizedAccess", "AllAccessDisabled", "Client.UnauthorizedOperation",
})
_THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
    "EC2ThrottledException", "503",
})
_CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity", "InsufficientCapacityOnHost",
})
_BUCKET_MOVED_CODES = frozenset({
    "PermanentRedirect", "301", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException",
})

_IAM_PREFIX = {"service-quotas": "servicequotas", "ec2": "ec2", "s3": "s3", "iam": "iam", "ssm": "ssm",
               "sts": "sts", "pricing": "pricing"}
# S3 operations whose IAM action has another name than the operation.
_S3_ACTIONS = {
    "HeadBucket": "s3:ListBucket", "ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket",
    "HeadObject": "s3:GetObject", "CreateMultipartUpload": "s3:PutObject", "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject", "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "PutBucketLifecycleConfiguration": "s3:PutLifecycleConfiguration",
    "GetBucketLifecycleConfiguration": "s3:GetLifecycleConfiguration",
    "DeleteObjects": "s3:DeleteObject", "CopyObject": "s3:PutObject",
    "PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
}
_ACTION_IN_MESSAGE = re.compile(r"perform:? ([a-z0-9-]+:[A-Za-z0-9*]+)")
_ZONE_IN_MESSAGE = re.compile(r"\b([a-z]{2}(?:-gov)?-[a-z]+-\d[a-z])\b")
_TYPE_IN_MESSAGE = re.compile(r"\b([a-z][a-z0-9-]*\.[0-9a-z]+)\b")


def iam_action(service: str, operation: str) -> str:
    """The IAM action an API call needs: ('ec2', 'RunInstances') -> 'ec2:RunInstances'."""
    if service == "s3" and operation in _S3_ACTIONS:
        return _S3_ACTIONS[operation]
    return f"{_IAM_PREFIX.get(service, service)}:{operation}"


def near_matches(word: str, choices: Iterable[str], n: int = 3) -> tuple[str, ...]:
    return tuple(difflib.get_close_matches(word, sorted(set(choices)), n=n, cutoff=0.6))


def _error_parts(exc: Any) -> tuple[str, str, dict[str, Any]]:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {}) or {}
    code = str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    return code, str(error.get("Message") or ""), response


def _attempts(response: dict[str, Any]) -> int | None:
    retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
    return retries + 1 if isinstance(retries, int) else None


def translate(exc: BaseException, *, service: str, operation: str, region: str | None = None,
              instance_type: str | None = None, market: str | None = None, bucket: str | None = None,
              zone: str | None = None, vcpus: int | None = None,
              type_choices: Iterable[str] | None = None) -> TrainctlError:
    """The typed, one-line error for what boto3 raised while calling ``service.operation``."""
    if isinstance(exc, TrainctlError):
        return exc
    import botocore.exceptions as bex  # only reached once boto3 is in use

    action = iam_action(service, operation)
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return CredentialsError(
            "No AWS credentials found.",
            "Set them with: aws configure (or aws sso login --profile NAME, then AWS_PROFILE=NAME).")
    if isinstance(exc, bex.ProfileNotFound):
        return CredentialsError(f"{exc}.", "List profiles with: aws configure list-profiles")
    if isinstance(exc, (bex.SSOTokenLoadError, bex.TokenRetrievalError, bex.UnauthorizedSSOTokenError)):
        return CredentialsError("The AWS SSO session has expired or was never started.",
                                "Log in with: aws sso login (with --profile NAME if you use one).")
    if isinstance(exc, bex.NoRegionError):
        return RegionError("No AWS region is set.", "Pass --region REGION or set [aws] region in "
                           "trainctl.toml (or AWS_DEFAULT_REGION).", region="")
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
                        bex.ConnectionClosedError)):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url") or f"{service} in {region or '?'}"
        return NetworkError(str(endpoint), type(exc).__name__)
    if not isinstance(exc, bex.ClientError):
        return AwsRequestError(action, type(exc).__name__, str(exc))

    code, message, response = _error_parts(exc)
    if code in _CREDENTIAL_CODES:
        return CredentialsError(f"AWS rejected the credentials ({code}).",
                                "Check them with: aws sts get-caller-identity; renew with aws configure "
                                "or aws sso login.")
    if code == "OptInRequired":
        return RegionError(f"The account has not enabled region {region}.",
                           f"Enable it with: aws account enable-region --region-name {region}, or pick "
                           "another --region.", region=region or "")
    if code in _ACCESS_CODES:
        named = _ACTION_IN_MESSAGE.search(message)
        needed = named.group(1) if named else action
        hint = f"Grant {needed} to the IAM identity trainctl runs as"
        if "Encoded authorization failure message" in message:
            hint += "; details: aws sts decode-authorization-message --encoded-message MESSAGE"
        return AccessDeniedError(f"Access denied: the AWS identity lacks {needed}.", hint + ".",
                                 action=needed)
    if code in _THROTTLE_CODES:
        return ThrottledError(action, code, _attempts(response))
    if code in _CAPACITY_CODES:
        where = _ZONE_IN_MESSAGE.search(message)
        zones = (zone,) if zone else ((where.group(1),) if where else ())
        return CapacityUnavailableError(instance_type or "this instance type", zones, market or "on-demand")
    if code in ("VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded",
                "MaxFleetCountExceeded"):
        spot = code == "MaxSpotInstanceCountExceeded" or market == "spot"
        mkt = "spot" if spot else "on-demand"
        quota = quota_for(instance_type, mkt) if instance_type else None
        what = f"{mkt} {instance_type}" if instance_type else mkt
        name = f" '{quota.name}' ({quota.code})" if quota else ""
        return QuotaExceededError(f"The account's {mkt} vCPU quota{name} is too low for {what} in "
                                  f"{region}.", quota=quota, region=region or "?", vcpus_needed=vcpus)
    if code == "InvalidInstanceType" or (
            code in ("InvalidParameterValue", "ValidationError") and "instancetype" in message.lower().replace(" ", "")):
        name = instance_type or (_TYPE_IN_MESSAGE.findall(message) or ["?"])[-1]
        return UnknownInstanceTypeError(name, near_matches(name, type_choices or ()))
    if code == "Unsupported" or (code == "InvalidParameterCombination" and "instance type" in message.lower()):
        where = _ZONE_IN_MESSAGE.search(message)
        return InstanceTypeNotOfferedError(instance_type or "this instance type",
                                           zone or (where.group(1) if where else region or "this region"))
    if code.startswith("InvalidAMIID"):
        return AmiNotFoundError(f"AMI not usable in {region}: {message}")
    if code in ("InvalidParameterValue", "InvalidParameter") and "instance profile" in message.lower().replace("instanceprofile", "instance profile"):
        return SetupMissingError(f"The instance profile is missing: {message}", region)
    if code == "InvalidGroup.NotFound":
        return SetupMissingError(f"The security group is missing: {message}", region)
    if code in ("NoSuchBucket", "404", "NotFound") and bucket:
        return BucketNotFoundError(bucket)
    if code in _BUCKET_MOVED_CODES and bucket:
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return BucketRegionError(bucket, headers.get("x-amz-bucket-region") or response.get("Error", {}).get("Region"),
                                 region or "?")
    if code == "BucketAlreadyExists" and bucket:
        return BucketTakenError(bucket)
    return AwsRequestError(action, code or "Error", message or str(exc))
