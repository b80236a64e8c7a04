"""One-time account setup for a project, idempotent: what exists is reported, what's missing made.

Creates (all tagged ``trainctl:*``): the bucket, or checks an existing one is in the region,
with a lifecycle rule that aborts incomplete multipart uploads under the prefix; the machines'
IAM role and instance profile; the EC2 Fleet service-linked roles (spot); a security group
with no inbound rules. Without ``yes`` nothing is created: the report says what would be.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import UsageError
from .context import AwsContext
from .errors import (
    AwsRequestError,
    BucketNotFoundError,
    BucketRegionError,
    BucketTakenError,
    SetupMissingError,
    translate,
)
from .names import (
    TAG_MANAGED,
    TAG_PROJECT,
    instance_profile_name,
    policy_name,
    project_tags,
    role_name,
    safe_name,
    security_group_name,
    tag_list,
)

LIFECYCLE_RULE_ID = "trainctl-abort-incomplete-multipart"
ABORT_AFTER_DAYS = 7
# Spot through EC2 Fleet needs these service-linked roles; AWS makes them on first console use only.
FLEET_SERVICES = ("ec2fleet.amazonaws.com", "spot.amazonaws.com")

EXISTS, WILL_CREATE, CREATED, WILL_UPDATE, UPDATED = "exists", "will create", "created", "will update", "updated"


@dataclass
class SetupItem:
    kind: str
    name: str
    state: str
    detail: str = ""
    resource_id: str | None = None


@dataclass
class SetupReport:
    region: str
    project: str
    bucket: str
    prefix: str
    applied: bool
    items: list[SetupItem] = field(default_factory=list)

    @property
    def changed(self) -> list[SetupItem]:
        return [i for i in self.items if i.state in (CREATED, UPDATED)]

    @property
    def pending(self) -> list[SetupItem]:
        return [i for i in self.items if i.state in (WILL_CREATE, WILL_UPDATE)]

    def item(self, kind: str) -> SetupItem:
        return next(i for i in self.items if i.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"changed": len(self.changed), "pending": len(self.pending)}

    def render_text(self) -> str:
        lines = [f"AWS setup for project '{self.project}' in {self.region} (bucket {self.bucket}, prefix {self.prefix}/)"]
        width = max(len(i.state) for i in self.items)
        for i in self.items:
            detail = f": {i.detail}" if i.detail else ""
            rid = f" [{i.resource_id}]" if i.resource_id and i.resource_id not in i.name else ""
            lines.append(f"  {i.state:<{width}}  {i.kind} {i.name}{rid}{detail}")
        if self.pending:
            lines.append(f"Nothing was created. Run again with --yes to make the {len(self.pending)} "
                         f"change{'s' if len(self.pending) != 1 else ''} above.")
        elif self.changed:
            lines.append(f"Made {len(self.changed)} change{'s' if len(self.changed) != 1 else ''}; "
                         "a new instance profile can take a few seconds before EC2 accepts it.")
        else:
            lines.append("Everything is in place; nothing to do.")
        return "\n".join(lines) + "\n"


def trust_policy() -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def machine_policy(*, partition: str, account_id: str, bucket: str, prefix: str, project: str) -> dict[str, Any]:
    """What a project's machines may do: its bucket prefix, its SSM secrets, end its own fleets.

    IAM can't compare a resource's tag with the tags of the calling instance, so ending fleets
    is scoped to fleets and launch templates tagged with this project (and trainctl-managed);
    the agent only ends the fleet its own instance's ``aws:ec2:fleet-id`` tag names (or its
    session's). A machine may terminate itself only (the instance ARN equals the role
    credentials' ``ec2:SourceInstanceARN``); its boot script powers it off as well.
    """
    params = f"arn:{partition}:ssm:*:{account_id}:parameter/trainctl/{safe_name(project)}"
    owned = {"StringEquals": {f"aws:ResourceTag/{TAG_PROJECT}": project, f"aws:ResourceTag/{TAG_MANAGED}": "true"}}
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "SessionObjects", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts"],
         "Resource": f"arn:{partition}:s3:::{bucket}/{prefix}/*"},
        {"Sid": "ListSessionPrefix", "Effect": "Allow", "Action": "s3:ListBucket",
         "Resource": f"arn:{partition}:s3:::{bucket}",
         "Condition": {"StringLike": {"s3:prefix": [f"{prefix}/*"]}}},
        {"Sid": "ReadProjectSecrets", "Effect": "Allow",
         "Action": ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath"],
         "Resource": [params, f"{params}/*"]},
        {"Sid": "DecryptProjectSecrets", "Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*",
         "Condition": {"StringLike": {"kms:ViaService": "ssm.*.amazonaws.com",
                                      "kms:EncryptionContext:PARAMETER_ARN": f"{params}/*"}}},
        {"Sid": "EndOwnMachine", "Effect": "Allow", "Action": "ec2:TerminateInstances",
         "Resource": f"arn:{partition}:ec2:*:{account_id}:instance/*",
         "Condition": {"StringEquals": {"aws:ARN": "${ec2:SourceInstanceARN}", **owned["StringEquals"]}}},
        # Describe calls take no resource-level permissions: what the machine reads to find its fleet.
        {"Sid": "ReadOwnMachine", "Effect": "Allow",
         "Action": ["ec2:DescribeInstances", "ec2:DescribeFleets", "ec2:DescribeFleetInstances",
                    "ec2:DescribeLaunchTemplates"],
         "Resource": "*"},
        {"Sid": "EndOwnFleet", "Effect": "Allow",
         "Action": ["ec2:DeleteFleets", "ec2:ModifyFleet", "ec2:DeleteLaunchTemplate"],
         "Resource": [f"arn:{partition}:ec2:*:{account_id}:fleet/*",
                      f"arn:{partition}:ec2:*:{account_id}:launch-template/*"],
         "Condition": owned},
        # The SSM agent: a shell without inbound ports (aws ssh), and the stop request (Run Command).
        {"Sid": "SsmAgent", "Effect": "Allow",
         "Action": ["ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel",
                    "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
                    "ssmmessages:OpenDataChannel", "ec2messages:AcknowledgeMessage",
                    "ec2messages:DeleteMessage", "ec2messages:FailMessage", "ec2messages:GetEndpoint",
                    "ec2messages:GetMessages", "ec2messages:SendReply"],
         "Resource": "*"},
    ]}


def lifecycle_rule(prefix: str) -> dict[str, Any]:
    return {"ID": LIFECYCLE_RULE_ID, "Status": "Enabled", "Filter": {"Prefix": f"{prefix}/"},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_AFTER_DAYS}}


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def validate_bucket_name(bucket: str) -> str:
    """S3's naming rules, checked before any request so the error can say which rule."""
    if (not _BUCKET_NAME.match(bucket) or ".." in bucket or re.match(r"^\d+\.\d+\.\d+\.\d+$", bucket)
            or bucket.startswith("xn--") or bucket.endswith("-s3alias")):
        raise UsageError(f"'{bucket}' is not a valid S3 bucket name.",
                         "Use 3-63 lowercase letters, digits, hyphens or dots, starting and ending with a "
                         "letter or digit, e.g. my-project-trainctl.")
    return bucket


def check_bucket(ctx: AwsContext, bucket: str) -> str:
    """The bucket's region if it exists in ``ctx.region``; else a typed error with the fix."""
    region = bucket_region(ctx, validate_bucket_name(bucket))
    if region is None:
        raise BucketNotFoundError(bucket)
    if region != ctx.region:
        raise BucketRegionError(bucket, region, ctx.region)
    return region


def bucket_region(ctx: AwsContext, bucket: str) -> str | None:
    """The bucket's region, or None when it doesn't exist. Refuses one owned by another account."""
    s3 = ctx.client("s3")
    try:
        response = s3.head_bucket(Bucket=bucket)
    except Exception as e:
        error = translate(e, service="s3", operation="HeadBucket", region=ctx.region, bucket=bucket)
        if isinstance(error, BucketNotFoundError):
            return None
        raise error from e
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    return response.get("BucketRegion") or headers.get("x-amz-bucket-region") or "us-east-1"


def _setup_bucket(ctx: AwsContext, report: SetupReport, yes: bool) -> None:
    bucket, project = report.bucket, report.project
    region = bucket_region(ctx, bucket)
    if region is not None and region != ctx.region:
        raise BucketRegionError(bucket, region, ctx.region)
    if region is None:
        state = WILL_CREATE
        if yes:
            params: dict[str, Any] = {"Bucket": bucket}
            if ctx.region != "us-east-1":
                params["CreateBucketConfiguration"] = {"LocationConstraint": ctx.region}
            try:
                ctx.call("s3", "create_bucket", error_context={"bucket": bucket}, **params)
            except AwsRequestError as e:
                if e.code == "BucketAlreadyExists":
                    raise BucketTakenError(bucket) from e
                if e.code != "BucketAlreadyOwnedByYou":
                    raise
            ctx.call("s3", "put_public_access_block", Bucket=bucket, PublicAccessBlockConfiguration={
                "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True})
            ctx.call("s3", "put_bucket_tagging", Bucket=bucket,
                     Tagging={"TagSet": tag_list(project_tags(project, "session-storage"))})
            state = CREATED
        report.items.append(SetupItem("bucket", bucket, state, f"in {ctx.region}, private, tagged"))
    else:
        report.items.append(SetupItem("bucket", bucket, EXISTS, f"in {region}"))

    rules: list[dict[str, Any]] = []
    if region is not None:
        try:
            rules = ctx.call("s3", "get_bucket_lifecycle_configuration", Bucket=bucket,
                             error_context={"bucket": bucket}).get("Rules", [])
        except AwsRequestError as e:
            if e.code != "NoSuchLifecycleConfiguration":
                raise
    detail = f"abort incomplete multipart uploads under {report.prefix}/ after {ABORT_AFTER_DAYS} days"
    if any(r.get("ID") == LIFECYCLE_RULE_ID for r in rules):
        report.items.append(SetupItem("lifecycle rule", LIFECYCLE_RULE_ID, EXISTS, detail))
        return
    state = WILL_CREATE
    if yes:
        # The bucket's other rules are kept: a put replaces the whole configuration.
        ctx.call("s3", "put_bucket_lifecycle_configuration", Bucket=bucket,
                 LifecycleConfiguration={"Rules": [*rules, lifecycle_rule(report.prefix)]})
        state = CREATED
    report.items.append(SetupItem("lifecycle rule", LIFECYCLE_RULE_ID, state, detail))


def _get_or_none(ctx: AwsContext, service: str, method: str, **params: Any) -> dict[str, Any] | None:
    try:
        return ctx.call(service, method, **params)
    except AwsRequestError as e:
        if e.code in ("NoSuchEntity", "NoSuchEntityException"):
            return None
        raise


def _policy_doc(value: Any) -> Any:
    if isinstance(value, str):
        from urllib.parse import unquote

        return json.loads(unquote(value))
    return value


def _setup_iam(ctx: AwsContext, report: SetupReport, yes: bool) -> None:
    project = report.project
    name = role_name(project)
    tags = tag_list(project_tags(project, "machine-role"))
    role = _get_or_none(ctx, "iam", "get_role", RoleName=name)
    state = EXISTS
    if role is None:
        state = WILL_CREATE
        if yes:
            ctx.call("iam", "create_role", RoleName=name, AssumeRolePolicyDocument=json.dumps(trust_policy()),
                     Description=f"trainctl machines of project {project}", Tags=tags)
            state = CREATED
    report.items.append(SetupItem("IAM role", name, state, "assumed by EC2 machines of this project"))

    account = ctx.account_id()
    wanted = machine_policy(partition=ctx.partition(), account_id=account, bucket=report.bucket,
                            prefix=report.prefix, project=project)
    current = None if role is None else _get_or_none(ctx, "iam", "get_role_policy", RoleName=name,
                                                     PolicyName=policy_name())
    detail = f"s3://{report.bucket}/{report.prefix}/ only, SSM /trainctl/{safe_name(project)}/*, end own fleets"
    if current is not None and _policy_doc(current["PolicyDocument"]) == wanted:
        state = EXISTS
    else:
        state = WILL_CREATE if current is None else WILL_UPDATE
        if yes:
            ctx.call("iam", "put_role_policy", RoleName=name, PolicyName=policy_name(),
                     PolicyDocument=json.dumps(wanted))
            state = CREATED if current is None else UPDATED
    report.items.append(SetupItem("role policy", policy_name(), state, detail))

    profile_name = instance_profile_name(project)
    profile = _get_or_none(ctx, "iam", "get_instance_profile", InstanceProfileName=profile_name)
    if profile is None:
        state = WILL_CREATE
        if yes:
            profile = ctx.call("iam", "create_instance_profile", InstanceProfileName=profile_name, Tags=tags)
            ctx.call("iam", "add_role_to_instance_profile", InstanceProfileName=profile_name, RoleName=name)
            state = CREATED
    else:
        roles = [r["RoleName"] for r in profile["InstanceProfile"].get("Roles", [])]
        state = EXISTS
        if name not in roles:
            state = WILL_UPDATE
            if yes:
                ctx.call("iam", "add_role_to_instance_profile", InstanceProfileName=profile_name, RoleName=name)
                state = UPDATED
    arn = profile["InstanceProfile"]["Arn"] if profile else None
    report.items.append(SetupItem("instance profile", profile_name, state, f"carries role {name}", arn))


def _setup_service_linked_roles(ctx: AwsContext, report: SetupReport, yes: bool) -> None:
    for service in FLEET_SERVICES:
        roles = list(ctx.paginate("iam", "list_roles", "Roles", PathPrefix=f"/aws-service-role/{service}/"))
        if roles:
            report.items.append(SetupItem("service-linked role", roles[0]["RoleName"], EXISTS, f"for {service}"))
            continue
        state, name = WILL_CREATE, f"for {service}"
        if yes:
            try:
                name = ctx.call("iam", "create_service_linked_role", AWSServiceName=service)["Role"]["RoleName"]
                state = CREATED
            except AwsRequestError as e:
                if "has been taken" not in str(e):
                    raise
                state = EXISTS
        report.items.append(SetupItem("service-linked role", name, state, f"for {service} (spot fleets)"))


def _setup_security_group(ctx: AwsContext, report: SetupReport, yes: bool) -> None:
    name = security_group_name(report.project)
    vpcs = ctx.call("ec2", "describe_vpcs", Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise SetupMissingError(f"Region {ctx.region} has no default VPC. Create one with: "
                                f"aws ec2 create-default-vpc --region {ctx.region}", ctx.region)
    vpc_id = vpcs[0]["VpcId"]
    groups = ctx.call("ec2", "describe_security_groups", Filters=[
        {"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    if groups:
        inbound = groups[0].get("IpPermissions") or []
        detail = (f"{len(inbound)} inbound rule(s) were added by hand; trainctl needs none" if inbound
                  else "no inbound rules")
        report.items.append(SetupItem("security group", name, EXISTS, detail, groups[0]["GroupId"]))
        return
    state, group_id = WILL_CREATE, None
    if yes:
        group_id = ctx.call("ec2", "create_security_group", GroupName=name, VpcId=vpc_id,
                            Description="trainctl machines: no inbound rules; the agent only talks out",
                            TagSpecifications=[{"ResourceType": "security-group",
                                                "Tags": tag_list(project_tags(report.project, "machines"))}])["GroupId"]
        state = CREATED
    report.items.append(SetupItem("security group", name, state, f"in {vpc_id}, no inbound rules", group_id))


def setup(ctx: AwsContext, *, bucket: str, project: str, prefix: str = "trainctl", yes: bool = False,
          fleets: bool = True) -> SetupReport:
    """Inspect (and with ``yes``, create) what a project needs in ``ctx.region``; safe to rerun."""
    validate_bucket_name(bucket)
    report = SetupReport(region=ctx.region, project=project, bucket=bucket, prefix=prefix.strip("/"), applied=yes)
    _setup_bucket(ctx, report, yes)
    _setup_iam(ctx, report, yes)
    if fleets:
        _setup_service_linked_roles(ctx, report, yes)
    _setup_security_group(ctx, report, yes)
    return report
