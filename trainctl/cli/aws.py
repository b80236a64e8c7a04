"""`trainctl aws`: set up once, launch, follow, recover, stop, see costs and clean up on EC2.

Thin commands over `trainctl.backends.aws` (the Backend) and `trainctl.cloud.aws` (the
provider layer): parse, call, print. boto3 is imported by those, inside functions.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

SESSION_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")  # what new_session_id makes
PLAN_HELP = "Print the plan (machine, price, quotas, AMI, storage, code, exact requests) and start nothing."


def _config() -> Any:
    from .. import config

    return config.load()


def _backend(cfg: Any = None) -> Any:
    from ..backends.aws import AwsBackend

    return AwsBackend(cfg=cfg or _config())


def _store(cfg: Any) -> Any:
    from ..session import SessionStore

    return SessionStore(cfg.state_dir)


def _aws_session(cfg: Any, ref: str) -> tuple[Any, dict[str, Any], Any]:
    """(session, record, handle) of a recorded AWS session; a local run is refused."""
    from ..backends.base import Handle
    from ..errors import UsageError

    session = _store(cfg).get(ref)
    data = session.read()
    if data.get("backend") != "aws":
        raise UsageError(f"Session {session.id} ran on {data.get('backend') or 'this machine'}, not on AWS.",
                         f"See it with: trainctl sessions show {session.id}")
    try:
        handle = Handle.from_json(data.get("handle"))
    except ValueError:
        handle = None
    return session, data, handle


def _confirm(question: str, yes: bool, refuse: str, hint: str) -> bool:
    from ..errors import UsageError

    if yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(refuse, hint)
    return click.confirm(question, default=False)


@click.group("aws")
def aws() -> None:
    """Run training on EC2: set up once, launch, follow, recover, stop, costs, leaks."""


# ----------------------------------------------------------------------------------- setup

@aws.command("setup")
@click.option("--region", help="Region of the bucket and the machines (default: [aws] region, or AWS's own).")
@click.option("--bucket", help="S3 bucket for the sessions (made if missing; default: [aws] bucket).")
@click.option("--prefix", default=None, help="Key prefix of the sessions in the bucket (default: trainctl).")
@click.option("--yes", "-y", is_flag=True, help="Make what is missing (without it, only say what would be made).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def setup_cmd(region: str | None, bucket: str | None, prefix: str | None, yes: bool, as_json: bool) -> None:
    """Prepare this project's AWS account once: bucket, machine role, security group, fleet
    roles. Safe to run again: what exists is reported, what is missing is made (with --yes)."""
    from ..backends.aws import project_name
    from ..cloud.aws.setup import setup
    from ..config import save_table
    from ..errors import UsageError

    cfg = _config()
    backend = _backend(cfg)
    bucket = bucket or backend.settings.bucket
    if not bucket:
        raise UsageError("No bucket is named for the sessions.",
                         "Pass one, e.g.: trainctl aws setup --bucket my-project-trainctl --yes")
    ctx = backend.context(region)
    report = setup(ctx, bucket=bucket, project=project_name(cfg), prefix=prefix or backend.settings.prefix, yes=yes)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.render_text(), nl=False)
    if yes:
        wanted = {"region": ctx.region, "bucket": bucket, "prefix": report.prefix}
        saved, differs = save_table(cfg, "aws", wanted)
        if saved and not as_json:
            click.echo(f"Saved [aws] region, bucket and prefix in {saved}.")
        for key, have in differs.items():
            click.secho(f"note: [aws] {key} in trainctl.toml is {have!r}; this setup used {wanted[key]!r}. "
                        f"Set {key} = \"{wanted[key]}\" to launch with it.", err=True, fg="yellow")


# ----------------------------------------------------------------------------------- launch

def _launch_options(f: Any) -> Any:
    for option in reversed([
        click.option("--spot", is_flag=True, help="Spot machines through an EC2 Fleet that AWS keeps at one machine."),
        click.option("--spot-fallback", type=click.IntRange(min=0), default=None, metavar="N",
                     help="After N spot interruptions, continue on on-demand."),
        click.option("--region", default=None, help="Region, or 'auto' for the cheapest one with capacity."),
        click.option("--ami", default=None, help="auto (newest PyTorch Deep Learning AMI) or an AMI id."),
        click.option("--disk-gb", type=click.IntRange(min=8), default=None, help="Root volume size (default 100)."),
        click.option("--max-hours", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Absolute deadline: AWS and the machine end everything after this many hours (default 24)."),
        click.option("--dry-run", is_flag=True, help=PLAN_HELP),
        click.option("--yes", "-y", is_flag=True, help="Start without asking (the plan is still printed)."),
        click.option("--detach", "-d", is_flag=True, help="Return once the machine is asked for; follow later."),
        click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON."),
    ]):
        f = option(f)
    return f


@aws.command("launch", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("script", type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--instance-type", "-t", required=True, help="EC2 instance type, e.g. g5.xlarge.")
@_launch_options
@click.option("--name", help="A name for the session.")
@click.option("--resume", "resume", metavar="auto|PATH", help="Start from a local checkpoint (uploaded, verified).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=None,
              help="Restarts on the machine after a crash, from the newest checkpoint.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None, help="Processes through torchrun.")
@click.option("--nodes", type=int, default=None, metavar="N",
              help="Machines of one job through torchrun, node 0 the head: one cluster placement group, one zone.")
@click.option("--efa", is_flag=True, help="With --nodes: an EFA interface on each machine (types with EFA only).")
@click.option("--secret", "secrets", multiple=True, metavar="NAME",
              help="Forward this environment variable to the script through SSM SecureString (repeat).")
def launch_cmd(script: Path, args: tuple[str, ...], instance_type: str, spot: bool, spot_fallback: int | None,
               region: str | None, ami: str | None, disk_gb: int | None, max_hours: float | None, dry_run: bool,
               yes: bool, detach: bool, as_json: bool, name: str | None, resume: str | None,
               max_restarts: int | None, nproc_per_node: int | None, nodes: int | None, efa: bool,
               secrets: tuple[str, ...]) -> None:
    """Run SCRIPT [ARGS]... on an EC2 machine as a recorded session.

    The plan is printed first: the machine, its price with its source and date, the projected
    cost, quotas, AMI, storage, the code that goes, and the exact requests. Then the machine
    starts, and its output and progress follow here until it ends; Ctrl-C detaches, the
    machine goes on.
    """
    import os

    from ..backends.base import RunSpec
    from ..errors import ScriptNotFoundError, UsageError
    from ..redact import redact_args
    from ..resume import split_resume_arg
    from ..session import new_session_id

    if not script.is_file():
        raise ScriptNotFoundError(f"script {script} does not exist.", "Check the path (relative to the current folder).",
                                  path=str(script))
    if spot_fallback is not None and not spot:
        raise UsageError("--spot-fallback applies to spot sessions.", "Add --spot, or drop --spot-fallback.")
    if nodes is not None and nodes < 1:
        raise UsageError(f"--nodes must be 1 or more, not {nodes}.", "e.g. --nodes 2 (one machine: leave it out)")
    if (nodes or 1) > 1 and max_restarts:
        raise UsageError("--max-restarts restarts one machine's part alone; a job over several machines restarts "
                         "whole, on new machines, from the newest checkpoint in the bucket.",
                         "Drop --max-restarts; after a failure or a lost node: trainctl aws resume SESSION")
    if efa and (nodes or 1) < 2:
        raise UsageError("--efa is for jobs over several machines.", "Add --nodes N (N >= 2), or drop --efa.")
    cfg = _config()
    args_list = list(args)
    if resume is None:
        resume, args_list = split_resume_arg(args_list, cfg.resume_flag)
    if redact_args(args_list) != args_list:
        raise UsageError("An argument of the script looks like a secret; it would be stored with the session.",
                         "Read it from the environment in the script and pass --secret NAME instead.")
    missing = [n for n in secrets if not os.environ.get(n)]
    if missing:
        raise UsageError(f"--secret {missing[0]}: {missing[0]} is not set here.", f"Set it first: export {missing[0]}=...")
    bad = next((n for n in secrets if not n.isidentifier()), None)
    if bad:
        raise UsageError(f"--secret {bad!r} is not an environment variable name.", "Example: --secret WANDB_API_KEY")
    resume_path = _local_resume(cfg, script, name, resume)
    session_id = new_session_id()
    store = _store(cfg)
    resources: dict[str, Any] = {"instance_type": instance_type, "spot": spot, "spot_fallback": spot_fallback,
                                 "region": region, "ami": ami, "disk_gb": disk_gb, "max_hours": max_hours,
                                 "attempt": 0, "secrets": list(secrets), "max_restarts": max_restarts,
                                 "nproc_per_node": nproc_per_node, "nodes": nodes or 1, "efa": efa}
    spec = RunSpec(script=script, args=tuple(args_list), resources=resources, resume=resume_path, name=name,
                   session_id=session_id, session_dir=store.sessions_dir / session_id, cwd=Path.cwd())
    backend = _backend(cfg)
    plan = backend.plan(spec)
    aws_plan = plan.details["aws_plan"]
    _print_plan(aws_plan, as_json)
    aws_plan.check()
    if dry_run:
        return
    cost = (f"up to ${aws_plan.projected_cost_usd:.2f}" if aws_plan.projected_cost_usd is not None
            else "an unknown price")
    what = f"these {aws_plan.nodes} machines" if aws_plan.nodes > 1 else "this machine"
    if not _confirm(f"Start {what}, for {cost} over {aws_plan.request.max_hours:g} h?", yes,
                    "Refusing to start a billed machine without confirmation.",
                    "Pass --yes to start it, or --dry-run to see the plan only."):
        click.echo("Nothing was started.")
        return
    if secrets:
        from ..cloud.aws.secrets import put_secrets

        put_secrets(backend.context(plan.details["region"]), plan.details["project"],
                    {n: os.environ[n] for n in secrets})
    session = _create_session(store, spec, plan, cfg, args_list)
    _start(backend, session, plan, attempt=0)
    _after_start(session, detach)


def _local_resume(cfg: Any, script: Path, name: str | None, resume: str | None) -> str | None:
    """A local checkpoint to start from: 'auto' finds the newest valid one of this script."""
    if not resume:
        return None
    from .. import checkpoint
    from .. import resume as resume_mod

    if resume == resume_mod.AUTO:
        found = resume_mod.resolve_auto(cfg.checkpoint_dir, cfg.state_dir, script=str(script.resolve()), name=name)
        for path, why in found.skipped:
            click.echo(f"[trainctl] skipping checkpoint {path}: {why}", err=True)
        if found.path is None:
            click.echo("[trainctl] --resume auto: no valid checkpoint of this script here; starting from scratch.",
                       err=True)
            return None
        return str(found.path)
    checkpoint.require_valid(resume, suggestion="--resume {found}")
    return str(Path(resume).resolve())


def _print_plan(aws_plan: Any, as_json: bool) -> None:
    if as_json:
        click.echo(aws_plan.to_json())
    else:
        click.echo(aws_plan.render_text(), nl=False)


def _create_session(store: Any, spec: Any, plan: Any, cfg: Any, args: list[str]) -> Any:
    from ..redact import redact_args
    from ..session import State

    details = plan.details
    return store.create(
        session_id=spec.session_id, status=State.PENDING.value, name=spec.name, backend="aws",
        script=str(Path(spec.script).resolve()), args=redact_args(args),
        command=redact_args(["trainctl", "aws", "launch", str(spec.script), *args]), cwd=str(Path.cwd()),
        checkpoint_location=plan.checkpoint_location, trainctl_config=cfg.resolved(), attempts=[],
        cloud={"provider": "aws", "region": details["region"], "storage": details["session_uri"],
               "script": details["script"], "machines": []})


def _start(backend: Any, session: Any, plan: Any, *, attempt: int, note: str | None = None) -> Any:
    """Launch and record it; a launch that fails leaves the session failed, with why."""
    from ..backends.aws import record_attempt
    from ..errors import TrainctlError
    from ..session import State

    try:
        handle = backend.launch(plan, attempt)
    except TrainctlError as e:
        session.update(status=State.FAILED.value, ended_at=time.time(), error=f"launch failed: {e.message}")
        session.event("status", status=State.FAILED.value, error=e.message)
        raise
    record_attempt(session, handle, plan, note=note)
    session.event("status", status=State.RUNNING.value, attempt=attempt, instance_ids=handle.ids.get("instance_ids"),
                  fleet_id=handle.ids.get("fleet_id"))
    ids = handle.ids
    nodes = int(ids.get("nodes") or 1)
    if ids.get("fleet_id"):
        what = f"fleet {ids['fleet_id']} (spot, AWS keeps one machine: {', '.join(ids['instance_ids']) or 'starting'})"
    elif nodes > 1:
        how = (f"spot, one fleet of type maintain per node: {', '.join(ids['fleet_ids'])}" if ids.get("fleet_ids")
               else "on-demand")
        what = (f"{nodes} instances " + ", ".join(f"{iid} (node {rank})" for rank, iid in enumerate(ids["instance_ids"]))
                + f" ({how}, {ids.get('zone')}, placement group {ids.get('placement_group')})")
    else:
        what = f"instance {', '.join(ids['instance_ids'])} (on-demand, {ids.get('zone')})"
    price = f"${ids['usd_per_hour']:.4f}/h" if ids.get("usd_per_hour") is not None else "price unknown"
    if nodes > 1 and ids.get("usd_per_hour") is not None:
        price = f"{nodes} x {price} = ${ids['usd_per_hour'] * nodes:.4f}/h"
    click.echo(f"Started session {session.id} on AWS {ids['region']}: {what}, {ids['instance_type']}, {price}; "
               f"ends by {ids.get('deadline')}.")
    for note_line in ids.get("notes") or []:
        click.echo(f"  note: {note_line}")
    return handle


def _after_start(session: Any, detach: bool) -> None:
    sid = session.id
    click.echo(f"  follow   trainctl sessions attach {sid}   (Ctrl-C detaches; the machine goes on)")
    click.echo(f"  status   trainctl aws status {sid}")
    click.echo(f"  stop     trainctl aws stop {sid}     (emergency checkpoint, then the machine ends)")
    click.echo(f"  end now  trainctl aws terminate {sid}")
    if detach:
        return
    from .watch import attach

    raise SystemExit(attach(session, tail_lines=0))


# ----------------------------------------------------------------------------------- resume

@aws.command("resume")
@click.argument("session_ref", metavar="SESSION")
@click.option("--instance-type", "-t", default=None, help="Another instance type (default: the session's).")
@_launch_options
def resume_cmd(session_ref: str, instance_type: str | None, spot: bool, spot_fallback: int | None,
               region: str | None, ami: str | None, disk_gb: int | None, max_hours: float | None, dry_run: bool,
               yes: bool, detach: bool, as_json: bool) -> None:
    """Continue a stopped, preempted or failed AWS session on a new machine, from the newest
    verified checkpoint in its storage (the code it started with). The deadline stays the
    session's unless --max-hours sets a new one."""
    from ..backends.base import RunSpec
    from ..errors import UsageError

    cfg = _config()
    session, data, handle = _aws_session(cfg, session_ref)
    backend = _backend(cfg)
    cloud = data.get("cloud") or {}
    if handle is not None and backend.describe(handle).running:
        raise UsageError(f"Session {session.id} is still running on AWS.",
                         f"Stop it first: trainctl aws stop {session.id}")
    if session.read().get("status") == "completed":
        raise UsageError(f"Session {session.id} completed; there is nothing to resume.",
                         "Start a new session with: trainctl aws launch ...")
    last = (data.get("attempts") or [{}])[-1] if data.get("attempts") else {}
    resources: dict[str, Any] = {
        "instance_type": instance_type or last.get("instance_type") or (handle.ids.get("instance_type") if handle else None),
        "spot": spot, "spot_fallback": spot_fallback, "region": region or cloud.get("region"), "ami": ami,
        "disk_gb": disk_gb, "max_hours": max_hours, "attempt": len(data.get("attempts") or []),
        "deadline": None if max_hours else cloud.get("deadline"), "alternatives": True,
        # a multi-node job resumes with the same world size: as many machines as it started on
        "nodes": (handle.ids.get("nodes") if handle else None) or 1, "efa": bool(handle and handle.ids.get("efa")),
        **((handle.ids.get("engine") or {}) if handle else {})}
    spec = RunSpec(script=Path(cfg.root) / (cloud.get("script") or Path(data.get("script") or "train.py").name),
                   args=tuple(data.get("args") or ()), resources=resources, resume="storage", name=data.get("name"),
                   session_id=session.id, session_dir=session.dir, cwd=Path(cfg.root))
    plan = backend.plan(spec)
    aws_plan = plan.details["aws_plan"]
    _print_plan(aws_plan, as_json)
    aws_plan.check()
    if dry_run:
        return
    if not _confirm(f"Start a machine for session {session.id}?", yes,
                    "Refusing to start a billed machine without confirmation.",
                    "Pass --yes to start it, or --dry-run to see the plan only."):
        click.echo("Nothing was started.")
        return
    remote = backend.remote(plan.details["session_uri"], plan.details["region"])
    ended = remote.ended()
    if ended is not None:
        from ..storage.remote import ENDED

        remote.store.delete(remote.key(ENDED))  # asked for by the user: the session continues
        session.event("resume", after_end=ended.get("reason"))
        click.echo(f"The session had ended ({ended.get('reason')}); it continues now.")
    session.update(stop_request=None, terminate_request=None)
    _start(backend, session, plan, attempt=plan.details["attempt"], note="aws resume")
    _after_start(session, detach)


# ----------------------------------------------------------------------------------- look

@aws.command("list")
@click.option("--region", default=None, help="Region to look in (default: [aws] region).")
@click.option("--all-regions", is_flag=True, help="Every region the account has enabled.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per region, in a list.")
def list_cmd(region: str | None, all_regions: bool, as_json: bool) -> None:
    """Every trainctl machine and fleet, with session, state, type, market, uptime and cost
    so far; what may bill after its session (machines, fleets, volumes, launch templates,
    unfinished uploads) is flagged with the command that ends it."""
    from ..cloud.aws.inventory import list_resources
    from ..errors import UsageError

    if region and all_regions:
        raise UsageError("--region and --all-regions were both given.", "Use one.")
    cfg = _config()
    backend = _backend(cfg)
    records, _problems = _store(cfg).list()
    statuses = {r["id"]: str(r["status"]) for r in records}
    ctx = backend.context(region)
    regions = [ctx.region]
    if all_regions:
        regions = sorted(r["RegionName"] for r in ctx.call("ec2", "describe_regions")["Regions"])
    bucket = backend.settings.bucket
    out = []
    quiet = 0
    for name in regions:
        here = ctx if name == ctx.region else ctx.for_region(name)
        inventory = list_resources(here, session_status=statuses.get, bucket=bucket if name == ctx.region else None,
                                   prefix=backend.settings.prefix)
        if all_regions and not (inventory.machines or inventory.fleets or inventory.leaks):
            quiet += 1
            continue
        out.append(inventory)
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in out], indent=2, default=str))
        return
    for inventory in out:
        click.echo(inventory.render_text(), nl=False)
    if quiet:
        click.echo(f"Nothing of trainctl's in {quiet} other region(s).")


@aws.command("status")
@click.argument("session_ref", metavar="SESSION")
@click.option("--region", default=None, help="For a session not recorded here: its region.")
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
def status_cmd(session_ref: str, region: str | None, as_json: bool) -> None:
    """Where an AWS session stands: its machines (past ones too), fleet, heartbeat, deadline
    and cost so far, from EC2 and the session's storage."""
    from ..cloud.aws.inventory import session_status
    from ..errors import SessionNotFoundError

    cfg = _config()
    backend = _backend(cfg)
    try:
        session, data, handle = _aws_session(cfg, session_ref)
    except SessionNotFoundError:
        if not SESSION_ID.fullmatch(session_ref):
            raise  # not a whole session id: a name or prefix of a session that isn't here
        found = session_status(backend.context(region), session_ref)  # started elsewhere: its tagged machines
        click.echo(json.dumps(found.to_dict(), indent=2, default=str) if as_json else found.render_text(), nl=not as_json)
        return
    if handle is None:
        click.echo(f"Session {session.id} has no machine yet ({data.get('status')}: {data.get('error') or 'not launched'}).")
        return
    description = backend.describe(handle)
    data = session.read()
    if as_json:
        click.echo(json.dumps({"session": session.id, "state": str(description.state), "status": data.get("status"),
                               **description.details}, indent=2, default=str))
        return
    _render_status(session.id, data, description)


def _render_status(sid: str, data: dict[str, Any], description: Any) -> None:
    from ..backends.cloud import recorded_cost
    from .render import age

    d = description.details
    cloud = data.get("cloud") or {}
    click.echo(f"session {sid} on AWS {d.get('region')}: {data.get('status')} (machines: {d.get('state')})")
    for m in d.get("machines") or []:
        price = f"${m['usd_per_hour']:.4f}/h" if m.get("usd_per_hour") is not None else "price unknown"
        cost = f"${m['cost_usd']:.2f}" if m.get("cost_usd") is not None else "unknown"
        node = f"  node {m['node']}" if m.get("node") is not None else ""
        click.echo(f"  {m['id']}{node}  {m['state']:<13} {m['type']} {m['market']} {m.get('zone') or '?'}  {price}  {cost}")
    for f in d.get("fleets") or []:
        click.echo(f"  fleet {f['fleet_id']}  {f['state']}  valid until {f.get('valid_until') or '-'}")
    for moved in cloud.get("node_fallbacks") or []:
        click.echo(f"  fallback   {moved.get('note')}")
    beat = d.get("heartbeat")
    if beat:
        rate = f", {beat['rate']:.2f} steps/s" if isinstance(beat.get("rate"), (int, float)) else ""
        click.echo(f"  heartbeat  {age(beat.get('t'))}: step {beat.get('step')}{rate}, machine {beat.get('machine') or '?'}")
    if d.get("ended"):
        click.echo(f"  ended      {d['ended'].get('reason')}")
    click.echo(f"  deadline   {cloud.get('deadline') or '-'}")
    click.echo(f"  storage    {cloud.get('storage') or '-'}")
    cost = recorded_cost(data)
    click.echo(f"  cost       {cost.describe() if cost else d['cost']['describe']}")


@aws.command("ssh")
@click.argument("session_ref", metavar="SESSION|INSTANCE-ID")
@click.option("--region", default=None, help="For an instance id or a session not recorded here.")
@click.option("--print-command", is_flag=True, help="Print the command instead of running it.")
def ssh_cmd(session_ref: str, region: str | None, print_command: bool) -> None:
    """A shell on the session's running machine through SSM Session Manager (no inbound port);
    needs the AWS CLI and its Session Manager plugin."""
    import os
    import shlex
    import shutil

    from ..cloud.aws.inventory import shell_command
    from ..errors import TrainctlError

    cfg = _config()
    backend = _backend(cfg)
    target, region = _target(cfg, session_ref, region)
    command = shell_command(backend.context(region), target)
    if print_command:
        click.echo(shlex.join(command))
        return
    if shutil.which("aws") is None:
        raise TrainctlError("The AWS CLI is not installed here.",
                            "Install it and the Session Manager plugin: https://docs.aws.amazon.com/systems-manager/"
                            "latest/userguide/session-manager-working-with-install-plugin.html")
    os.execvp(command[0], command)


def _target(cfg: Any, ref: str, region: str | None) -> tuple[str, str | None]:
    """(session id or instance id, its region) for a SESSION|INSTANCE-ID argument."""
    from ..errors import SessionNotFoundError

    if ref.startswith("i-"):
        return ref, region
    try:
        session, data, handle = _aws_session(cfg, ref)
    except SessionNotFoundError:
        return ref, region  # a session started elsewhere: its id, as tagged
    return session.id, region or (data.get("cloud") or {}).get("region") or (handle.ids.get("region") if handle else None)


# ----------------------------------------------------------------------------------- end

@aws.command("stop")
@click.argument("session_ref", metavar="SESSION")
@click.option("--grace-period", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="How long the agent gets for the emergency checkpoint and the last sync (default 150).")
@click.option("--now", is_flag=True, help="Terminate at once, without the emergency checkpoint.")
def stop_cmd(session_ref: str, grace_period: float | None, now: bool) -> None:
    """Stop an AWS session like a preemption: no replacement machine, SIGTERM to the agent (the
    script writes its emergency checkpoint, the agent uploads it), then the machine ends. The
    session can be continued with trainctl aws resume."""
    from ..backends.aws import STOP_GRACE_S
    from ..launcher.control import stop

    cfg = _config()
    session, _data, _handle = _aws_session(cfg, session_ref)
    if not now:
        click.echo(f"Stopping session {session.id}: no replacement, SIGTERM to the agent, waiting for its "
                   "emergency checkpoint and last sync...", err=True)
    result = stop(session, now=now, grace_period_s=STOP_GRACE_S if grace_period is None else grace_period)
    if not result.was_running:
        click.echo(f"Session {session.id} is not running ({result.status}); nothing to stop.")
        return
    latest = _latest_in_storage(cfg, result.data)
    click.echo(f"Session {session.id} {result.status}; "
               + (f"newest checkpoint in storage: {latest}." if latest else "no checkpoint in storage."))
    click.echo(f"  resume   trainctl aws resume {session.id}")


def _latest_in_storage(cfg: Any, data: dict[str, Any]) -> str | None:
    cloud = data.get("cloud") or {}
    if not cloud.get("storage"):
        return None
    latest = _backend(cfg).remote(cloud["storage"], cloud.get("region")).latest_checkpoint()
    return f"{latest['file']} (step {latest.get('step')})" if latest else None


@aws.command("terminate")
@click.argument("target", metavar="SESSION|INSTANCE-ID")
@click.option("--region", default=None, help="For an instance id or a session not recorded here.")
@click.option("--dry-run", is_flag=True, help="Say what would end; end nothing.")
@click.option("--yes", "-y", is_flag=True, help="End without asking.")
def terminate_cmd(target: str, region: str | None, dry_run: bool, yes: bool) -> None:
    """End a session's machines now, without a checkpoint: its fleet (so AWS starts no
    replacement), its machines and launch templates. Safe to repeat."""
    from ..cloud.aws.launch import terminate

    cfg = _config()
    backend = _backend(cfg)
    resolved, region = _target(cfg, target, region)
    ctx = backend.context(region)
    preview = terminate(ctx, resolved, dry_run=True)
    idle = not preview.actions or all(a.result.startswith(("already", "not found")) for a in preview.actions)
    if dry_run or idle or not yes:
        click.echo(preview.render_text(), nl=False)
    if dry_run or idle:
        if idle:
            _refresh(cfg, backend, resolved)
        return
    if not _confirm(f"End these now (no emergency checkpoint) for {resolved}?", yes,
                    f"Refusing to terminate {resolved} without confirmation.",
                    f"Pass --yes, or stop it with a checkpoint: trainctl aws stop {resolved}"):
        click.echo("Nothing was ended.")
        return
    _mark_terminated(cfg, resolved)
    report = terminate(ctx, resolved)
    click.echo(report.render_text(), nl=False)
    _refresh(cfg, backend, resolved)


def _mark_terminated(cfg: Any, target: str) -> None:
    from ..errors import SessionNotFoundError

    if target.startswith("i-"):
        return
    try:
        session, _data, _handle = _aws_session(cfg, target)
    except SessionNotFoundError:
        return
    session.update(terminate_request={"t": time.time()})


def _refresh(cfg: Any, backend: Any, target: str) -> None:
    """The local record of a terminated session, brought up to date."""
    from ..errors import SessionNotFoundError

    if target.startswith("i-"):
        return
    try:
        _session, _data, handle = _aws_session(cfg, target)
    except SessionNotFoundError:
        return
    if handle is not None:
        backend.describe(handle)
