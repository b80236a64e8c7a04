"""What a launch plan needs to know about the account and region, looked up once.

Every lookup returns plain frozen data; a price or quota that can't be had is recorded as
unknown with the reason, never guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .errors import (
    AccessDeniedError,
    AmiNotFoundError,
    AwsError,
    AwsRequestError,
    InstanceTypeNotOfferedError,
    SetupMissingError,
    UnknownInstanceTypeError,
    near_matches,
)
from .names import (
    QuotaRef,
    instance_profile_name,
    quota_for,
    security_group_name,
)

if TYPE_CHECKING:
    from .context import AwsContext
    from .request import LaunchRequest

DLAMI_ROOT = "/aws/service/deeplearning/ami/{arch}/"
_DLAMI_TYPE = re.compile(r"^oss-nvidia-driver-gpu-pytorch-(\d+(?:\.\d+)*)-(.+)$")
SPOT_PRODUCT = "Linux/UNIX"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class InstanceTypeInfo:
    name: str
    vcpus: int
    memory_mib: int
    gpu_model: str | None = None
    gpu_manufacturer: str | None = None
    gpu_count: int = 0
    gpu_memory_mib: int = 0  # per GPU
    architectures: tuple[str, ...] = ("x86_64",)
    efa_supported: bool = False

    @property
    def dlami_arch(self) -> str:
        return "arm64" if "arm64" in self.architectures and "x86_64" not in self.architectures else "x86_64"

    def describe(self) -> str:
        gpus = (f"{self.gpu_count} x {self.gpu_manufacturer or ''} {self.gpu_model} "
                f"({self.gpu_memory_mib / 1024:.1f} GiB)".replace("  ", " ")
                if self.gpu_count else "no GPU")
        return (f"{self.name}: {gpus}, {self.vcpus} vCPUs, {self.memory_mib / 1024:.1f} GiB memory, "
                f"{'/'.join(self.architectures)}")

    @classmethod
    def from_api(cls, item: dict[str, Any]) -> InstanceTypeInfo:
        gpus = (item.get("GpuInfo") or {}).get("Gpus") or []
        first = gpus[0] if gpus else {}
        return cls(
            name=item["InstanceType"],
            vcpus=int(item["VCpuInfo"]["DefaultVCpus"]),
            memory_mib=int(item["MemoryInfo"]["SizeInMiB"]),
            gpu_model=first.get("Name"),
            gpu_manufacturer=first.get("Manufacturer"),
            gpu_count=sum(int(g.get("Count", 0)) for g in gpus),
            gpu_memory_mib=int((first.get("MemoryInfo") or {}).get("SizeInMiB", 0)),
            architectures=tuple(item.get("ProcessorInfo", {}).get("SupportedArchitectures") or ("x86_64",)),
            efa_supported=bool((item.get("NetworkInfo") or {}).get("EfaSupported")),
        )


@dataclass(frozen=True)
class PriceFact:
    """A price per hour in USD, where it came from and when; ``usd_per_hour`` None = unknown."""

    usd_per_hour: float | None
    market: str
    source: str
    as_of: str | None = None
    zone: str | None = None  # the zone the (highest) spot price is from
    per_zone: tuple[tuple[str, str, float], ...] = ()  # (instance type, zone, usd/h)

    @classmethod
    def unknown(cls, market: str, reason: str) -> PriceFact:
        return cls(None, market, f"unknown: {reason}")

    def describe(self) -> str:
        if self.usd_per_hour is None:
            return f"{self.market} price {self.source}"
        where = f" in {self.zone}" if self.zone else ""
        many = f", highest of {len(self.per_zone)} type/zone prices" if len(self.per_zone) > 1 else ""
        when = f", {self.as_of}" if self.as_of else ""
        return f"${self.usd_per_hour:.4f}/h {self.market}{where} ({self.source}{when}{many})"


@dataclass(frozen=True)
class QuotaFact:
    market: str
    code: str | None
    name: str | None
    value_vcpus: float | None  # None: unknown
    source: str  # applied | default | unknown: <why>

    @classmethod
    def unknown(cls, market: str, ref: QuotaRef | None, reason: str) -> QuotaFact:
        return cls(market, ref.code if ref else None, ref.name if ref else None, None, f"unknown: {reason}")


@dataclass(frozen=True)
class AmiFact:
    image_id: str
    name: str
    architecture: str
    root_device_name: str
    source: str  # "auto: newest of N PyTorch DLAMIs (<parameter>)" or "given"


@dataclass(frozen=True)
class NetworkFact:
    vpc_id: str
    subnets: tuple[tuple[str, str], ...]  # (zone, subnet id), default subnet of each zone
    security_group_id: str | None  # the one `aws setup` made; None: missing

    def subnet_for(self, zone: str) -> str | None:
        return dict(self.subnets).get(zone)


@dataclass(frozen=True)
class Facts:
    """Everything ``plan_launch`` reads; ``now`` is here so planning stays pure."""

    region: str
    now: datetime
    instance_types: tuple[InstanceTypeInfo, ...]  # the requested type first
    offered_zones: dict[str, tuple[str, ...]]  # instance type -> zones offering it
    price: PriceFact  # in the requested market
    on_demand_price: PriceFact | None
    quota: QuotaFact
    ami: AmiFact
    network: NetworkFact
    instance_profile_arn: str | None
    account_id: str | None = None
    missing_permissions: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["now"] = iso_utc(self.now)
        return data


# --------------------------------------------------------------------------- lookups

def offered_instance_types(ctx: AwsContext) -> list[str]:
    return [o["InstanceType"] for o in ctx.paginate("ec2", "describe_instance_type_offerings",
                                                    "InstanceTypeOfferings", LocationType="region")]


def describe_instance_types(ctx: AwsContext, names: list[str]) -> dict[str, InstanceTypeInfo]:
    """Type facts from DescribeInstanceTypes; an unknown name raises with near matches."""
    try:
        items = ctx.call("ec2", "describe_instance_types", InstanceTypes=list(names),
                         error_context={"instance_type": names[0] if len(names) == 1 else None})["InstanceTypes"]
    except (UnknownInstanceTypeError, AwsRequestError) as e:
        if isinstance(e, AwsRequestError) and e.code != "InvalidInstanceType":
            raise
        offered = offered_instance_types(ctx)
        bad = next((n for n in names if n not in offered), names[0])
        raise UnknownInstanceTypeError(bad, near_matches(bad, offered)) from e
    found = {item["InstanceType"]: InstanceTypeInfo.from_api(item) for item in items}
    missing = [n for n in names if n not in found]
    if missing:
        raise UnknownInstanceTypeError(missing[0], near_matches(missing[0], offered_instance_types(ctx)))
    return {n: found[n] for n in names}


def equivalent_instance_types(ctx: AwsContext, instance_type: str, *, max_vcpu_ratio: float = 2.0) -> list[str]:
    """Types of the same family with the same GPU model and count, up to ``max_vcpu_ratio`` times
    the vCPUs (a bigger machine costs more): what a spot fleet may replace a machine with."""
    primary = describe_instance_types(ctx, [instance_type])[instance_type]
    family = instance_type.split(".")[0]
    items = ctx.paginate("ec2", "describe_instance_types", "InstanceTypes",
                         Filters=[{"Name": "instance-type", "Values": [f"{family}.*"]}])
    same = [InstanceTypeInfo.from_api(i) for i in items]
    fits = [t for t in same if t.name != instance_type and t.gpu_count == primary.gpu_count
            and t.gpu_model == primary.gpu_model and t.vcpus <= primary.vcpus * max_vcpu_ratio]
    return [t.name for t in sorted(fits, key=lambda t: (t.vcpus, t.name))]


def offered_zones(ctx: AwsContext, instance_type: str) -> tuple[str, ...]:
    offers = ctx.paginate("ec2", "describe_instance_type_offerings", "InstanceTypeOfferings",
                          LocationType="availability-zone",
                          Filters=[{"Name": "instance-type", "Values": [instance_type]}])
    return tuple(sorted({o["Location"] for o in offers}))


def spot_price(ctx: AwsContext, instance_types: list[str], zones: list[str], now: datetime) -> PriceFact:
    """The current spot price of each type in each zone; the plan budgets with the highest."""
    try:
        history = list(ctx.paginate("ec2", "describe_spot_price_history", "SpotPriceHistory",
                                    InstanceTypes=instance_types, ProductDescriptions=[SPOT_PRODUCT],
                                    StartTime=now))
    except AwsError as e:
        return PriceFact.unknown("spot", f"DescribeSpotPriceHistory failed ({e.message})")
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for item in history:
        if not item.get("ProductDescription", "").startswith(SPOT_PRODUCT):
            continue
        key = (item["InstanceType"], item["AvailabilityZone"])
        if zones and key[1] not in zones:
            continue
        if key not in latest or item["Timestamp"] > latest[key]["Timestamp"]:
            latest[key] = item
    if not latest:
        return PriceFact.unknown("spot", "no spot price history for these types and zones")
    per_zone = tuple(sorted((t, z, float(i["SpotPrice"])) for (t, z), i in latest.items()))
    top = max(latest.values(), key=lambda i: float(i["SpotPrice"]))
    newest = max(i["Timestamp"] for i in latest.values())
    return PriceFact(float(top["SpotPrice"]), "spot", "EC2 spot price history", iso_utc(newest),
                     zone=top["AvailabilityZone"], per_zone=per_zone)


def on_demand_price(ctx: AwsContext, instance_type: str) -> PriceFact:
    """Linux, shared tenancy, no pre-installed software, from the AWS Price List API."""
    filters = {"ServiceCode": "AmazonEC2"}
    terms = {"instanceType": instance_type, "regionCode": ctx.region, "operatingSystem": "Linux",
             "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used",
             "marketoption": "OnDemand"}
    try:
        response = ctx.call("pricing", "get_products", ServiceCode=filters["ServiceCode"], MaxResults=10,
                            Filters=[{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in terms.items()])
    except AwsError as e:
        return PriceFact.unknown("on-demand", f"Price List API failed ({e.message})")
    for raw in response.get("PriceList", []):
        product = json.loads(raw) if isinstance(raw, str) else raw
        for term in (product.get("terms", {}).get("OnDemand") or {}).values():
            for dimension in (term.get("priceDimensions") or {}).values():
                usd = dimension.get("pricePerUnit", {}).get("USD")
                if usd is not None and dimension.get("unit", "Hrs").startswith("Hr") and float(usd) > 0:
                    as_of = product.get("publicationDate") or term.get("effectiveDate")
                    return PriceFact(float(usd), "on-demand", "AWS Price List API",
                                     str(as_of)[:10] if as_of else None)
    return PriceFact.unknown("on-demand", f"the Price List API has no Linux on-demand price for "
                                          f"{instance_type} in {ctx.region}")


def vcpu_quota(ctx: AwsContext, instance_type: str, market: str) -> QuotaFact:
    ref = quota_for(instance_type, market)
    if ref is None:
        return QuotaFact.unknown(market, None, f"no known quota code for {instance_type}'s family")
    for method, source in (("get_service_quota", "applied"), ("get_aws_default_service_quota", "default")):
        try:
            quota = ctx.call("service-quotas", method, ServiceCode="ec2", QuotaCode=ref.code)["Quota"]
            return QuotaFact(market, ref.code, ref.name, float(quota["Value"]), source)
        except AccessDeniedError as e:
            return QuotaFact.unknown(market, ref, f"{e.action} denied")
        except AwsError as e:
            if getattr(e, "code", None) == "NoSuchResourceException" and source == "applied":
                continue  # no applied value: the default is what holds
            return QuotaFact.unknown(market, ref, e.message)
    return QuotaFact.unknown(market, ref, "Service Quotas has no value for it")


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def _os_rank(os_name: str) -> tuple[int, tuple[int, ...]]:
    # prefer the newest Ubuntu, then Amazon Linux: same PyTorch, a deterministic choice
    return (1 if os_name.startswith("ubuntu") else 0, _version_key(os_name))


def resolve_ami(ctx: AwsContext, ami: str, arch: str) -> AmiFact:
    """``auto``: the newest PyTorch Deep Learning AMI for ``arch``; else the given id, checked."""
    if ami != "auto":
        return _describe_ami(ctx, ami, "given")
    root = DLAMI_ROOT.format(arch=arch)
    candidates: list[tuple[tuple[int, ...], tuple[int, tuple[int, ...]], str, str]] = []
    for param in ctx.paginate("ssm", "get_parameters_by_path", "Parameters", Path=root, Recursive=True):
        rest = param["Name"][len(root):]
        ami_type, _, tail = rest.partition("/")
        match = _DLAMI_TYPE.match(ami_type)
        if match and tail == "latest/ami-id":
            candidates.append((_version_key(match.group(1)), _os_rank(match.group(2)), param["Name"],
                               param["Value"]))
    if not candidates:
        raise AmiNotFoundError(f"No PyTorch Deep Learning AMI found under {root} in {ctx.region}.",
                               "Pass --ami ami-... (an AMI with CUDA PyTorch) for this region.")
    candidates.sort()
    *_, parameter, image_id = candidates[-1]
    return _describe_ami(ctx, image_id, f"auto: newest of {len(candidates)} PyTorch DLAMIs ({parameter})")


def _describe_ami(ctx: AwsContext, image_id: str, source: str) -> AmiFact:
    try:
        images = ctx.call("ec2", "describe_images", ImageIds=[image_id])["Images"]
    except (AmiNotFoundError, AwsRequestError) as e:
        raise AmiNotFoundError(f"AMI {image_id} is not available in {ctx.region}.") from e
    if not images:
        raise AmiNotFoundError(f"AMI {image_id} is not available in {ctx.region}.")
    image = images[0]
    return AmiFact(image_id, image.get("Name") or image_id, image.get("Architecture", "x86_64"),
                   image.get("RootDeviceName") or "/dev/sda1", source)


def default_network(ctx: AwsContext, project: str) -> NetworkFact:
    vpcs = ctx.call("ec2", "describe_vpcs", Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise SetupMissingError(f"Region {ctx.region} has no default VPC. Create one with: "
                                f"aws ec2 create-default-vpc --region {ctx.region}", ctx.region)
    vpc_id = vpcs[0]["VpcId"]
    subnets = ctx.call("ec2", "describe_subnets", Filters=[
        {"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    groups = ctx.call("ec2", "describe_security_groups", Filters=[
        {"Name": "vpc-id", "Values": [vpc_id]},
        {"Name": "group-name", "Values": [security_group_name(project)]}])["SecurityGroups"]
    return NetworkFact(vpc_id, tuple(sorted((s["AvailabilityZone"], s["SubnetId"]) for s in subnets)),
                       groups[0]["GroupId"] if groups else None)


def instance_profile_arn(ctx: AwsContext, project: str) -> str | None:
    try:
        return ctx.call("iam", "get_instance_profile",
                        InstanceProfileName=instance_profile_name(project))["InstanceProfile"]["Arn"]
    except AwsRequestError as e:
        if e.code == "NoSuchEntity":
            return None
        raise


def missing_launch_permissions(ctx: AwsContext, ami: AmiFact, instance_type: str, subnet_id: str | None,
                               profile_arn: str | None, security_group_id: str | None) -> tuple[str, ...]:
    """Ask EC2 itself (DryRun) whether this identity may launch with the profile; name what's missing."""
    params: dict[str, Any] = {"ImageId": ami.image_id, "InstanceType": instance_type, "MinCount": 1,
                              "MaxCount": 1, "DryRun": True}
    if subnet_id:
        params["SubnetId"] = subnet_id
    if profile_arn:
        params["IamInstanceProfile"] = {"Arn": profile_arn}
    if security_group_id:
        params["SecurityGroupIds"] = [security_group_id]
    try:
        ctx.call("ec2", "run_instances", **params)
    except AccessDeniedError as e:
        return (_decoded_action(ctx, e) or e.action,)
    except AwsError:
        return ()  # DryRunOperation (allowed), or not a permission question: the launch will say
    return ()


def _decoded_action(ctx: AwsContext, error: AccessDeniedError) -> str | None:
    encoded = re.search(r"Encoded authorization failure message: (\S+)", str(error.__cause__ or ""))
    if not encoded:
        return None
    try:
        decoded = ctx.call("sts", "decode_authorization_message", EncodedMessage=encoded.group(1))
        action = json.loads(decoded["DecodedMessage"]).get("context", {}).get("action")
        return str(action) if action else None
    except (AwsError, ValueError):
        return None


# Where `--region auto` looks unless told otherwise: regions with broad GPU offerings.
DEFAULT_AUTO_REGIONS = ("us-east-1", "us-east-2", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-1")
GOOD_PLACEMENT_SCORE = 5  # EC2's spot placement score, 1-10: likely to get capacity from here up


@dataclass(frozen=True)
class RegionOption:
    region: str
    zones: tuple[str, ...]
    price: PriceFact
    placement_score: int | None = None  # spot only; None: not known

    def describe(self) -> str:
        score = f", spot placement score {self.placement_score}/10" if self.placement_score is not None else ""
        return f"{self.region}: {self.price.describe()}{score}"


def rank_regions(ctx: AwsContext, instance_type: str, market: str,
                 regions: tuple[str, ...] = DEFAULT_AUTO_REGIONS, now: datetime | None = None) -> list[RegionOption]:
    """Regions offering the type, cheapest first; for spot, regions where EC2 rates capacity
    likely (placement score >= 5) come before the rest. A region that can't be read is skipped."""
    now = now or utcnow()
    scores: dict[str, int] = {}
    if market == "spot":
        try:
            answer = ctx.call("ec2", "get_spot_placement_scores", InstanceTypes=[instance_type], TargetCapacity=1,
                              SingleAvailabilityZone=False, RegionNames=list(regions))
            scores = {s["Region"]: int(s["Score"]) for s in answer.get("SpotPlacementScores", [])}
        except AwsError:
            scores = {}
    options = []
    for region in regions:
        here = ctx.for_region(region)
        try:
            zones = offered_zones(here, instance_type)
        except AwsError:
            continue
        if not zones:
            continue
        price = spot_price(here, [instance_type], list(zones), now) if market == "spot" else on_demand_price(here, instance_type)
        options.append(RegionOption(region, zones, price, scores.get(region)))

    def key(option: RegionOption) -> tuple[bool, bool, float]:
        unlikely = option.placement_score is not None and option.placement_score < GOOD_PLACEMENT_SCORE
        usd = option.price.usd_per_hour
        return (usd is None, unlikely, usd if usd is not None else 0.0)

    return sorted(options, key=key)


def gather_facts(ctx: AwsContext, request: LaunchRequest, *, now: datetime | None = None) -> Facts:
    """All lookups ``plan_launch`` needs, for ``request`` in ``ctx.region``."""
    now = now or utcnow()
    names = [request.instance_type, *[t for t in request.also_instance_types if t != request.instance_type]]
    types = describe_instance_types(ctx, names)
    zones = {name: offered_zones(ctx, name) for name in names}
    if not zones[request.instance_type]:
        raise InstanceTypeNotOfferedError(request.instance_type, ctx.region)
    all_zones = sorted({z for zs in zones.values() for z in zs})
    notes: list[str] = []
    od_price = on_demand_price(ctx, request.instance_type)
    price = spot_price(ctx, names, all_zones, now) if request.market == "spot" else od_price
    quota = vcpu_quota(ctx, request.instance_type, request.market)
    ami = resolve_ami(ctx, request.ami, types[request.instance_type].dlami_arch)
    network = default_network(ctx, request.project)
    profile = instance_profile_arn(ctx, request.project)
    first_subnet = next((s for z, s in network.subnets if z in zones[request.instance_type]), None)
    missing = missing_launch_permissions(ctx, ami, request.instance_type, first_subnet, profile,
                                         network.security_group_id)
    try:
        account = ctx.account_id()
    except AwsError as e:
        account = None
        notes.append(f"account id unknown ({e.message})")
    return Facts(region=ctx.region, now=now, instance_types=tuple(types[n] for n in names),
                 offered_zones=zones, price=price,
                 on_demand_price=od_price if request.market == "spot" else None, quota=quota, ami=ami,
                 network=network, instance_profile_arn=profile, account_id=account,
                 missing_permissions=missing, notes=tuple(notes))
