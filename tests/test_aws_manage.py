"""Stop, shell, secrets and `--region auto` against moto's server."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from tests.aws_fixtures import Account, error_answer, http_response, pricing_hook, spot_price_hook
from trainctl.cloud.aws.facts import equivalent_instance_types, gather_facts, rank_regions
from trainctl.cloud.aws.inventory import shell_command
from trainctl.cloud.aws.launch import launch, stop_session
from trainctl.cloud.aws.plan import LaunchRequest, plan_launch
from trainctl.cloud.aws.secrets import put_secrets, secret_names
from trainctl.errors import NotFoundError, UsageError

NOW = datetime(2026, 11, 30, 7, 0, tzinfo=timezone.utc)


def start(ctx: Any, session: str, **changes: Any) -> Any:
    req = LaunchRequest(session_id=session, project="demo", instance_type="g5.xlarge", max_hours=3,
                        agent_command=("trainctl", "agent"), **changes)
    return launch(ctx, plan_launch(req, gather_facts(ctx, req, now=NOW)))


def test_stop_deletes_the_fleet_first_then_signals_the_agent(account: Account, sid: str):
    ctx = account.context()
    result = start(ctx, sid, market="spot")
    dry = stop_session(ctx, sid, dry_run=True)
    assert [a.result for a in dry.actions] == ["would delete (active); its machine left to power itself off",
                                               "would ask the agent to stop"]
    assert 'kill -TERM "$(cat /opt/trainctl/agent.pid)"' in dry.actions[1].command
    report = stop_session(ctx, sid)
    fleet, instance = report.actions
    assert fleet.result == "deleted (was active); its machine left to power itself off"
    assert instance.resource_id == result.instance_ids[0]
    assert instance.result.startswith("asked to stop: emergency checkpoint, final sync, then it powers off (SSM command ")
    ec2 = account.moto.client("ec2")
    assert ec2.describe_fleets(FleetIds=[result.fleet_id])["Fleets"][0]["FleetState"] == "deleted_running"
    command_id = instance.result.rsplit(" ", 1)[1].rstrip(")")
    sent = account.moto.client("ssm").list_commands(CommandId=command_id)["Commands"][0]
    assert sent["DocumentName"] == "AWS-RunShellScript"
    assert sent["Parameters"]["commands"] == ['kill -TERM "$(cat /opt/trainctl/agent.pid)"']
    assert sent["InstanceIds"] == result.instance_ids


def test_stop_says_when_ssm_cannot_reach_the_agent(account: Account, sid: str):
    ctx = account.context({"before-call.ssm.SendCommand": lambda **_: error_answer(
        "InvalidInstanceId", "Instances not in a valid state for account")})
    result = start(ctx, sid)
    (action,) = stop_session(ctx, result.instance_ids[0]).actions
    assert "could not reach its agent through SSM" in action.result
    assert f"trainctl aws terminate {result.instance_ids[0]}" in action.result


def test_shell_opens_through_ssm_on_the_newest_running_machine(account: Account, sid: str):
    ctx = account.context()
    result = start(ctx, sid)
    assert shell_command(ctx, sid) == ["aws", "ssm", "start-session", "--target", result.instance_ids[0],
                                       "--region", "us-east-1"]
    with pytest.raises(NotFoundError, match=f"Session {sid}-none has no running machine"):
        shell_command(ctx, f"{sid}-none")


def test_secrets_go_to_ssm_securestring_under_the_project_path(account: Account, sid: str):
    ctx = account.context()
    written = put_secrets(ctx, sid, {"WANDB_API_KEY": "wandb-secret-value", "HF_TOKEN": "hf_x"})
    assert written == [f"/trainctl/{sid}/WANDB_API_KEY", f"/trainctl/{sid}/HF_TOKEN"]
    ssm = account.moto.client("ssm")
    param = ssm.get_parameter(Name=written[0], WithDecryption=False)["Parameter"]
    assert param["Type"] == "SecureString" and param["Value"] != "wandb-secret-value"
    assert ssm.get_parameter(Name=written[0], WithDecryption=True)["Parameter"]["Value"] == "wandb-secret-value"
    assert secret_names(ctx, sid) == ["HF_TOKEN", "WANDB_API_KEY"]
    put_secrets(ctx, sid, {"HF_TOKEN": "hf_y"})  # overwriting is how a secret is rotated
    assert ssm.get_parameter(Name=written[1], WithDecryption=True)["Parameter"]["Value"] == "hf_y"
    with pytest.raises(UsageError, match="not an environment variable name"):
        put_secrets(ctx, sid, {"BAD-NAME": "x"})


def test_region_auto_ranks_by_price_and_spot_capacity(account: Account):
    when = datetime(2026, 11, 30, 6, 0, tzinfo=timezone.utc)
    scores = {"us-east-1": 3, "us-west-2": 9, "eu-west-1": 7}
    hooks = {
        "before-call.ec2.GetSpotPlacementScores": lambda **_: (http_response(), {"SpotPlacementScores": [
            {"Region": r, "Score": s} for r, s in scores.items()]}),
        "before-call.ec2.DescribeSpotPriceHistory": spot_price_hook(
            {("g5.xlarge", "us-east-1a"): 0.30, ("g5.xlarge", "us-west-2a"): 0.45, ("g5.xlarge", "eu-west-1a"): 0.40},
            when),
        "before-call.pricing.GetProducts": pricing_hook({("g5.xlarge", "us-east-1"): 1.006,
                                                         ("g5.xlarge", "us-west-2"): 1.006,
                                                         ("g5.xlarge", "eu-west-1"): 1.123}),
    }
    ctx = account.context(hooks)
    regions = ("us-east-1", "us-west-2", "eu-west-1")
    spot = rank_regions(ctx, "g5.xlarge", "spot", regions, now=when)
    # us-east-1 is cheapest but EC2 rates its spot capacity unlikely (3/10): it goes last
    assert [(o.region, o.price.usd_per_hour, o.placement_score) for o in spot] == [
        ("eu-west-1", 0.40, 7), ("us-west-2", 0.45, 9), ("us-east-1", 0.30, 3)]
    assert spot[0].describe().startswith("eu-west-1: $0.4000/h spot in eu-west-1a")
    on_demand = rank_regions(ctx, "g5.xlarge", "on-demand", regions, now=when)
    assert [o.region for o in on_demand][-1] == "eu-west-1" and on_demand[0].price.usd_per_hour == 1.006


def test_fleet_alternatives_have_the_same_gpus_and_at_most_twice_the_vcpus(account: Account):
    ctx = account.context()
    assert equivalent_instance_types(ctx, "g5.xlarge") == ["g5.2xlarge"]  # 1 x A10G, 8 vCPUs <= 2 x 4
    assert equivalent_instance_types(ctx, "g5.xlarge", max_vcpu_ratio=4) == ["g5.2xlarge", "g5.4xlarge"]
    assert "g5.12xlarge" not in equivalent_instance_types(ctx, "g5.xlarge", max_vcpu_ratio=100)  # 4 GPUs
