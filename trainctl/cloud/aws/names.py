"""Names, tags and quota codes: the fixed vocabulary every AWS module agrees on (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

TAG_MANAGED = "trainctl:managed"
TAG_PROJECT = "trainctl:project"
TAG_SESSION = "trainctl:session"
TAG_ATTEMPT = "trainctl:attempt"
TAG_PURPOSE = "trainctl:purpose"
TAG_NODE = "trainctl:node"  # a multi-node session's machine: its node rank (0 is the head)

# SSM SecureString parameters a project's machines may read: /trainctl/<project>/<NAME>
SECRETS_ROOT = "/trainctl"

# Raw user data limit of EC2 (before base64).
USER_DATA_LIMIT_BYTES = 16 * 1024

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9+=,.@_-]+")


def safe_name(text: str, limit: int = 64) -> str:
    """A name IAM, EC2 and S3 all accept: [A-Za-z0-9+=,.@_-], at most ``limit`` characters."""
    cleaned = _NAME_UNSAFE.sub("-", text).strip("-") or "default"
    return cleaned[:limit]


def role_name(project: str) -> str:
    return safe_name(f"trainctl-{project}-machine")


def instance_profile_name(project: str) -> str:
    return role_name(project)


def policy_name() -> str:
    return "trainctl-machine"


def security_group_name(project: str) -> str:
    return safe_name(f"trainctl-{project}", 255)


def launch_template_name(session_id: str, attempt: int) -> str:
    return safe_name(f"trainctl-{session_id}-a{attempt}", 128)


def placement_group_name(session_id: str, attempt: int) -> str:
    return safe_name(f"trainctl-{session_id}-a{attempt}", 255)


def nodes_security_group_name(session_id: str, attempt: int) -> str:
    return safe_name(f"trainctl-{session_id}-a{attempt}-nodes", 255)


def secrets_path(project: str) -> str:
    return f"{SECRETS_ROOT}/{safe_name(project)}/"


def project_tags(project: str, purpose: str | None = None) -> dict[str, str]:
    tags = {TAG_MANAGED: "true", TAG_PROJECT: project}
    if purpose:
        tags[TAG_PURPOSE] = purpose
    return tags


def session_tags(project: str, session_id: str, attempt: int, name: str | None = None) -> dict[str, str]:
    """Tags of every resource a launch creates; ``Name`` is what the EC2 console shows."""
    tags = project_tags(project)
    tags[TAG_SESSION] = session_id
    tags[TAG_ATTEMPT] = str(attempt)
    tags["Name"] = name or f"trainctl {session_id}"
    return tags


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def tag_dict(tags: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in tags or []}


@dataclass(frozen=True)
class QuotaRef:
    """One EC2 vCPU quota: the code Service Quotas knows it by and its console name."""

    code: str
    name: str
    market: str  # on-demand | spot

    def raise_command(self, region: str, vcpus: int) -> str:
        return (f"aws service-quotas request-service-quota-increase --region {region} "
                f"--service-code ec2 --quota-code {self.code} --desired-value {vcpus}")

    def console_url(self, region: str) -> str:
        return (f"https://{region}.console.aws.amazon.com/servicequotas/home/services/ec2/"
                f"quotas/{self.code}")


# family group -> market -> quota. On-demand and spot quotas are separate and counted in vCPUs;
# new accounts often start with 0 for the GPU groups, spot included.
QUOTAS: dict[str, dict[str, QuotaRef]] = {
    "G and VT": {
        "on-demand": QuotaRef("L-DB2E81BA", "Running On-Demand G and VT instances", "on-demand"),
        "spot": QuotaRef("L-3819A6DF", "All G and VT Spot Instance Requests", "spot"),
    },
    "P": {
        "on-demand": QuotaRef("L-417A185B", "Running On-Demand P instances", "on-demand"),
        "spot": QuotaRef("L-7212CCBC", "All P Spot Instance Requests", "spot"),
    },
    "DL": {
        "on-demand": QuotaRef("L-6E869C2A", "Running On-Demand DL instances", "on-demand"),
        "spot": QuotaRef("L-85EED4F7", "All DL Spot Instance Requests", "spot"),
    },
    "Standard": {
        "on-demand": QuotaRef("L-1216C47A", "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances", "on-demand"),
        "spot": QuotaRef("L-34B43A08", "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests", "spot"),
    },
}

_FAMILY = re.compile(r"^([a-z]+)(\d*)")


def quota_group(instance_type: str) -> str | None:
    """'g5.xlarge' -> 'G and VT', 'p4d.24xlarge' -> 'P', 'm5.large' -> 'Standard'; None if unknown."""
    match = _FAMILY.match(instance_type.lower())
    if not match:
        return None
    letters = match.group(1)
    if letters in ("g", "gr", "vt"):
        return "G and VT"
    if letters == "p":
        return "P"
    if letters == "dl":
        return "DL"
    if letters in ("inf", "trn", "hpc", "mac"):  # quotas of their own, not looked up here
        return None
    if letters[0] in "acdhimrtz":
        return "Standard"
    return None


def quota_for(instance_type: str, market: str) -> QuotaRef | None:
    group = quota_group(instance_type)
    return QUOTAS[group][market] if group else None
