"""Settings and the one place boto3 clients are made (retries, endpoint, error translation)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from ...errors import ConfigError
from .errors import RegionError, missing_boto3, near_matches, translate

# The Price List API answers in these regions only; prices of every region come from them.
PRICING_REGION = "us-east-1"


@dataclass(frozen=True)
class AwsSettings:
    """The `[aws]` table of trainctl.toml (plus `[cloud] budget_usd`), read from a plain dict."""

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None  # one endpoint for every service (moto, LocalStack)
    bucket: str | None = None
    prefix: str = "trainctl"
    max_attempts: int = 8  # botocore's "standard" retry mode, with backoff
    ami: str = "auto"
    disk_gb: int = 100
    budget_usd: float | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "[aws]") -> AwsSettings:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                near = near_matches(key, known)
                raise ConfigError(f"Unknown key '{key}' in {source}.",
                                  f"Did you mean '{near[0]}'?" if near else f"Valid: {', '.join(known)}.")
            want = {"max_attempts": int, "disk_gb": int, "budget_usd": (int, float)}.get(key, str)
            if value is not None and (not isinstance(value, want) or isinstance(value, bool)):
                kind = "a number" if want == (int, float) else want.__name__  # type: ignore[union-attr]
                raise ConfigError(f"{source} {key} must be {kind}, not {value!r}.")
            values[key] = float(value) if key == "budget_usd" and value is not None else value
        if values.get("max_attempts", 1) < 1:
            raise ConfigError(f"{source} max_attempts must be at least 1.")
        if values.get("disk_gb", 8) < 8:
            raise ConfigError(f"{source} disk_gb must be at least 8 (the AMI's root volume).")
        return cls(**values)


@functools.lru_cache(maxsize=1)
def known_regions() -> tuple[str, ...]:
    """Regions botocore knows for EC2 (from its bundled endpoint data; no network)."""
    try:
        import botocore.session
    except ImportError as e:  # pragma: no cover - the aws extra is missing
        raise missing_boto3() from e
    session = botocore.session.get_session()
    regions: set[str] = set()
    for partition in ("aws", "aws-us-gov", "aws-cn"):
        regions.update(session.get_available_regions("ec2", partition_name=partition))
    return tuple(sorted(regions))


def validate_region(region: str) -> str:
    regions = known_regions()
    if region in regions:
        return region
    near = near_matches(region, regions)
    raise RegionError(f"Unknown AWS region '{region}'.",
                      f"Did you mean: {', '.join(near)}?" if near else f"Valid: {', '.join(regions)}.",
                      region=region, near=near)


class AwsContext:
    """One region's clients with retries and trainctl's error translation.

    ``session`` (a boto3.Session) may be given to share credentials or event hooks.
    """

    def __init__(self, region: str, *, profile: str | None = None, endpoint_url: str | None = None,
                 max_attempts: int = 8, session: Any = None) -> None:
        try:
            import boto3
        except ImportError as e:
            raise missing_boto3() from e
        self.region = validate_region(region)
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts
        try:
            self.session = session or boto3.Session(profile_name=profile, region_name=region)
        except Exception as e:
            raise translate(e, service="sts", operation="GetCallerIdentity", region=region) from e
        self._clients: dict[tuple[str, str], Any] = {}
        self._account_id: str | None = None

    @classmethod
    def from_settings(cls, settings: AwsSettings, *, region: str | None = None, session: Any = None) -> AwsContext:
        chosen = region or settings.region
        if not chosen:
            raise RegionError("No AWS region is set.", "Pass --region REGION or set [aws] region in "
                              "trainctl.toml.", region="")
        return cls(chosen, profile=settings.profile, endpoint_url=settings.endpoint_url,
                   max_attempts=settings.max_attempts, session=session)

    def for_region(self, region: str) -> AwsContext:
        """The same credentials and settings in another region."""
        return AwsContext(region, endpoint_url=self.endpoint_url, max_attempts=self.max_attempts,
                          session=self.session)

    def client(self, service: str, region: str | None = None) -> Any:
        region = region or (PRICING_REGION if service == "pricing" else self.region)
        key = (service, region)
        if key not in self._clients:
            from botocore.config import Config

            config = Config(retries={"mode": "standard", "total_max_attempts": self.max_attempts},
                            user_agent_extra="trainctl", connect_timeout=10, read_timeout=60)
            self._clients[key] = self.session.client(service, region_name=region,
                                                     endpoint_url=self.endpoint_url, config=config)
        return self._clients[key]

    def call(self, service: str, method: str, *, error_context: Mapping[str, Any] | None = None,
             **params: Any) -> dict[str, Any]:
        """``client(service).<method>(**params)`` with failures translated to typed errors."""
        client = self.client(service)
        try:
            return getattr(client, method)(**params)
        except Exception as e:
            operation = client.meta.method_to_api_mapping.get(method, method)
            raise translate(e, service=service, operation=operation, region=self.region,
                            **dict(error_context or {})) from e

    def paginate(self, service: str, method: str, key: str, *,
                 error_context: Mapping[str, Any] | None = None, **params: Any) -> Iterator[Any]:
        """Every item under ``key`` across pages, failures translated."""
        client = self.client(service)
        operation = client.meta.method_to_api_mapping.get(method, method)
        try:
            for page in client.get_paginator(method).paginate(**params):
                yield from page.get(key, [])
        except Exception as e:
            raise translate(e, service=service, operation=operation, region=self.region,
                            **dict(error_context or {})) from e

    def account_id(self) -> str:
        if self._account_id is None:
            self._account_id = self.call("sts", "get_caller_identity")["Account"]
        return self._account_id

    def partition(self) -> str:
        return self.session.get_partition_for_region(self.region)
