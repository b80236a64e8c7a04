"""`aws setup` against moto's server: idempotent, tagged, least privilege, honest about the bucket."""

from __future__ import annotations

import json

import pytest

from tests.aws_fixtures import REGION
from tests.servers import MotoServer
from trainctl.cloud.aws.errors import BucketRegionError
from trainctl.cloud.aws.setup import LIFECYCLE_RULE_ID, machine_policy, setup


def test_setup_without_yes_creates_nothing_and_says_what_it_would(moto: MotoServer):
    report = setup(moto.context(), bucket="demo-bucket", project="demo")
    assert [i.state for i in report.items] == ["will create"] * len(report.items)
    assert {i.kind for i in report.items} == {"bucket", "lifecycle rule", "IAM role", "role policy",
                                              "instance profile", "service-linked role", "security group"}
    assert "Run again with --yes" in report.render_text()
    assert moto.client("s3").list_buckets()["Buckets"] == []
    assert moto.client("iam").list_roles()["Roles"] == []


def test_setup_twice_creates_everything_once_tagged_then_nothing(moto: MotoServer):
    first = setup(moto.context(), bucket="demo-bucket", project="demo", yes=True)
    assert not first.pending and len(first.changed) == len(first.items) == 8
    second = setup(moto.context(), bucket="demo-bucket", project="demo", yes=True)
    assert second.changed == [] and second.pending == []
    assert {i.state for i in second.items} == {"exists"}
    assert "nothing to do" in second.render_text()

    s3, iam, ec2 = moto.client("s3"), moto.client("iam"), moto.client("ec2")
    tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket="demo-bucket")["TagSet"]}
    assert tags["trainctl:project"] == "demo" and tags["trainctl:managed"] == "true"
    block = s3.get_public_access_block(Bucket="demo-bucket")["PublicAccessBlockConfiguration"]
    assert all(block.values())
    (rule,) = s3.get_bucket_lifecycle_configuration(Bucket="demo-bucket")["Rules"]
    assert rule["ID"] == LIFECYCLE_RULE_ID and rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 7

    role = iam.get_role(RoleName="trainctl-demo-machine")["Role"]
    assert {t["Key"] for t in role["Tags"]} >= {"trainctl:project", "trainctl:managed"}
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    profile = iam.get_instance_profile(InstanceProfileName="trainctl-demo-machine")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == ["trainctl-demo-machine"]
    assert {t["Key"] for t in profile["Tags"]} >= {"trainctl:project"}
    linked = {r["Path"] for r in iam.list_roles(PathPrefix="/aws-service-role/")["Roles"]}
    assert linked == {"/aws-service-role/ec2fleet.amazonaws.com/", "/aws-service-role/spot.amazonaws.com/"}
    (group,) = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["trainctl-demo"]}])["SecurityGroups"]
    assert group["IpPermissions"] == []  # no inbound rule: the agent only talks out
    assert {t["Key"] for t in group["Tags"]} >= {"trainctl:project", "trainctl:managed"}


def test_machine_policy_allows_only_the_prefix_the_project_secrets_and_own_fleets(moto: MotoServer):
    setup(moto.context(), bucket="demo-bucket", project="demo", prefix="runs", yes=True)
    doc = moto.client("iam").get_role_policy(RoleName="trainctl-demo-machine", PolicyName="trainctl-machine")["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    assert doc == machine_policy(partition="aws", account_id="123456789012", bucket="demo-bucket",
                                 prefix="runs", project="demo")
    by_sid = {s["Sid"]: s for s in doc["Statement"]}
    assert by_sid["SessionObjects"]["Resource"] == "arn:aws:s3:::demo-bucket/runs/*"
    assert by_sid["ListSessionPrefix"]["Condition"] == {"StringLike": {"s3:prefix": ["runs/*"]}}
    assert by_sid["ReadProjectSecrets"]["Resource"] == [
        "arn:aws:ssm:*:123456789012:parameter/trainctl/demo", "arn:aws:ssm:*:123456789012:parameter/trainctl/demo/*"]
    assert by_sid["EndOwnFleet"]["Condition"]["StringEquals"]["aws:ResourceTag/trainctl:project"] == "demo"
    actions = {a for s in doc["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert not any(a.endswith("*") for a in actions)
    assert "ec2:RunInstances" not in actions
    # a machine ends itself, never another: the instance must be the caller's own
    (terminate,) = [s for s in doc["Statement"] if "ec2:TerminateInstances" in s["Action"]]
    assert terminate["Condition"]["StringEquals"]["aws:ARN"] == "${ec2:SourceInstanceARN}"
    assert terminate["Condition"]["StringEquals"]["aws:ResourceTag/trainctl:project"] == "demo"


def test_a_changed_bucket_updates_the_policy_and_says_so(moto: MotoServer):
    setup(moto.context(), bucket="demo-bucket", project="demo", yes=True)
    report = setup(moto.context(), bucket="other-bucket", project="demo", yes=True)
    assert report.item("role policy").state == "updated"
    assert report.item("bucket").state == "created"
    assert report.item("IAM role").state == "exists"


def test_existing_bucket_keeps_its_own_lifecycle_rules(moto: MotoServer):
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="mine")
    own = {"ID": "expire-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 30}}
    s3.put_bucket_lifecycle_configuration(Bucket="mine", LifecycleConfiguration={"Rules": [own]})
    report = setup(moto.context(), bucket="mine", project="demo", yes=True)
    assert report.item("bucket").state == "exists"
    assert report.item("lifecycle rule").state == "created"
    ids = [r["ID"] for r in s3.get_bucket_lifecycle_configuration(Bucket="mine")["Rules"]]
    assert ids == ["expire-logs", LIFECYCLE_RULE_ID]


def test_bucket_in_another_region_is_refused_with_the_fix(moto: MotoServer):
    moto.client("s3", "eu-west-1").create_bucket(Bucket="far-away",
                                                 CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    with pytest.raises(BucketRegionError) as caught:
        setup(moto.context(REGION), bucket="far-away", project="demo", yes=True)
    assert str(caught.value) == "Bucket 'far-away' is in eu-west-1, not us-east-1."
    assert "--region eu-west-1" in caught.value.hint
    assert moto.client("iam").list_roles()["Roles"] == []  # refused before creating anything


def test_setup_in_another_region_creates_the_bucket_there(moto: MotoServer):
    report = setup(moto.context("eu-west-1"), bucket="eu-bucket", project="demo", yes=True)
    assert report.item("bucket").state == "created"
    assert moto.client("s3", "eu-west-1").get_bucket_location(Bucket="eu-bucket")["LocationConstraint"] == "eu-west-1"
