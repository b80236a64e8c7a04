"""`trainctl agent`: what a rented machine's boot script starts (internal; hidden from --help)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("agent", hidden=True, context_settings={"ignore_unknown_options": True,
                                                       "allow_interspersed_args": False,
                                                       "show_default": True})
@click.argument("script", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--storage", envvar="TRAINCTL_STORAGE_URI", required=True, metavar="URI",
              help="Where the project's sessions live (s3://bucket/prefix or a folder).")
@click.option("--project", envvar="TRAINCTL_PROJECT", required=True, help="The project's name in storage.")
@click.option("--session", "session_id", envvar="TRAINCTL_SESSION_ID", required=True, help="The session's id.")
@click.option("--endpoint-url", envvar="TRAINCTL_ENDPOINT_URL", default=None, help="S3-compatible endpoint.")
@click.option("--region", envvar="TRAINCTL_REGION", default=None)
@click.option("--checksums", envvar="TRAINCTL_CHECKSUMS", default="when_supported",
              type=click.Choice(["when_supported", "when_required"]))
@click.option("--machine-dir", envvar="TRAINCTL_MACHINE_DIR", type=click.Path(path_type=Path), default=".",
              help="The agent's working folder on the machine.")
@click.option("--machine-id", envvar="TRAINCTL_MACHINE_ID", default=None, help="Instance or pod id, for records.")
@click.option("--deadline", envvar=["TRAINCTL_DEADLINE", "TRAINCTL_DEADLINE_UTC"], default=None, metavar="UTC",
              help="Absolute end (2026-05-01T12:00:00Z): the run stops with a checkpoint and the machine ends.")
@click.option("--deadline-margin", type=float, default=120.0, metavar="SECONDS",
              help="Stop the training this long before the deadline, to checkpoint and sync.")
@click.option("--attempt", envvar="TRAINCTL_ATTEMPT", type=int, default=0)
@click.option("--backend", envvar="TRAINCTL_BACKEND", default="local")
@click.option("--watch", type=click.Choice(["auto", "aws", "signal", "none"]), default="auto",
              help="Preemption notices: aws = IMDS spot and rebalance notices and signals.")
@click.option("--watch-interval", type=float, default=5.0, metavar="SECONDS")
@click.option("--signal-grace", type=float, default=5.0, metavar="SECONDS",
              help="Time left after a SIGTERM (RunPod: about 5 s).")
@click.option("--end", "end", envvar="TRAINCTL_END_HOOK", default="none",
              help="How the machine ends: none, poweroff, command, or module:Class.")
@click.option("--end-command", envvar="TRAINCTL_END_COMMAND", default=None, help="Shell command for --end command.")
@click.option("--keep-on-failure", is_flag=True, help="Keep a failed machine until the deadline, for debugging.")
@click.option("--max-failed-boots", type=click.IntRange(min=1), default=3)
@click.option("--setup", type=click.Choice(["auto", "venv", "direct", "none"]), default="auto",
              help="Where requirements go: an overlay venv on the image's torch, the image's interpreter, nowhere.")
@click.option("--python", default=None, help="The interpreter with the image's torch (found when not given).")
@click.option("--pip-arg", "pip_args", multiple=True, help="An extra pip argument (repeat).")
@click.option("--allow-torch-replace", is_flag=True, help="Let requirements replace the image's torch.")
@click.option("--sync-interval", type=float, default=10.0, metavar="SECONDS")
@click.option("--heartbeat-interval", type=float, default=30.0, metavar="SECONDS")
@click.option("--lease-ttl", type=float, default=120.0, metavar="SECONDS")
@click.option("--lease-wait", type=float, default=150.0, metavar="SECONDS")
@click.option("--secret", "secrets", multiple=True, metavar="NAME", help="A variable forwarded to the script (repeat).")
@click.option("--secret-store", envvar="TRAINCTL_SECRET_STORE", default=None, metavar="SPEC")
@click.option("--grace-period", type=float, default=30.0, metavar="SECONDS")
@click.option("--max-restarts", type=int, default=None)
@click.option("--restart-on", default=None)
@click.option("--name", default=None)
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None)
@click.option("--no-preflight", is_flag=True)
@click.option("--nnodes", envvar="TRAINCTL_NNODES", type=click.IntRange(min=1), default=1,
              help="Machines of one job (the boot script sets it).")
@click.option("--node-rank", envvar="TRAINCTL_NODE_RANK", type=click.IntRange(min=0), default=0,
              help="This machine's node: 0 is the head, which publishes its address in storage.")
@click.option("--rdzv-port", type=click.IntRange(1, 65535), default=29400, help="The head's rendezvous port.")
@click.option("--head-wait", type=float, default=900.0, metavar="SECONDS",
              help="How long a node waits for the head's address before it gives up.")
@click.option("--node-replacement", envvar="TRAINCTL_NODE_REPLACEMENT", type=click.Choice(["none", "fleet"]),
              default="none", help="fleet: the platform replaces a lost node; the job waits for it and resumes.")
@click.option("--replace-wait", type=float, default=1800.0, metavar="SECONDS",
              help="With --node-replacement fleet: how long the job waits for a lost node's replacement.")
def agent_cmd(script: str | None, args: tuple[str, ...], storage: str, project: str, session_id: str,
              endpoint_url: str | None, region: str | None, checksums: str, machine_dir: Path,
              machine_id: str | None, deadline: str | None, deadline_margin: float, attempt: int, backend: str,
              watch: str, watch_interval: float, signal_grace: float, end: str, end_command: str | None,
              keep_on_failure: bool, max_failed_boots: int, setup: str, python: str | None,
              pip_args: tuple[str, ...], allow_torch_replace: bool, sync_interval: float,
              heartbeat_interval: float, lease_ttl: float, lease_wait: float, secrets: tuple[str, ...],
              secret_store: str | None, grace_period: float, max_restarts: int | None, restart_on: str | None,
              name: str | None, nproc_per_node: int | None, no_preflight: bool, nnodes: int, node_rank: int,
              rdzv_port: int, head_wait: float, node_replacement: str, replace_wait: float) -> None:
    """Run one session on this machine: fetch the code, set up, train, sync, end the machine."""
    import os

    from ..agent.agent import Agent, AgentSettings, parse_deadline

    forwarded = [*secrets, *(n.strip() for n in os.environ.get("TRAINCTL_FORWARD_VARS", "").split(",") if n.strip())]
    if secret_store is None and os.environ.get("TRAINCTL_SSM_PATH"):
        secret_store = "ssm:" + os.environ["TRAINCTL_SSM_PATH"]
    if node_rank >= nnodes:
        from ..errors import UsageError

        raise UsageError(f"--node-rank {node_rank} is out of range for --nnodes {nnodes} (0 to {nnodes - 1}).",
                         "The boot script sets both; launch again with trainctl aws launch --nodes N.")
    if nnodes > 1:
        # a node's engine restarting alone would resume its ranks from its own (empty) checkpoint
        # folder while rank 0 resumes from the head's: a multi-node job restarts whole, on new
        # machines, through trainctl aws resume (every node fetches the same checkpoint)
        max_restarts = 0
    engine = {"name": name, "nproc_per_node": nproc_per_node, "max_restarts": max_restarts,
              "restart_on": restart_on, "preflight": not no_preflight}
    settings = AgentSettings(
        storage=storage, project=project, session_id=session_id, machine_dir=machine_dir, script=script,
        args=list(args), endpoint_url=endpoint_url or None, region=region or None, checksums=checksums,
        deadline_t=parse_deadline(deadline), deadline_margin_s=deadline_margin, attempt=attempt, backend=backend,
        machine_id=machine_id, watch=("aws" if backend == "aws" else "signal") if watch == "auto" else watch,
        watch_interval_s=watch_interval, signal_grace_s=signal_grace, end=end if end != "none" or not end_command
        else "command", end_command=end_command, keep_on_failure=keep_on_failure,
        max_failed_boots=max_failed_boots, setup=setup, python=python, pip_args=list(pip_args),
        allow_torch_replace=allow_torch_replace, sync_interval_s=sync_interval, heartbeat_s=heartbeat_interval,
        lease_ttl_s=lease_ttl, lease_wait_s=lease_wait, secrets=list(dict.fromkeys(forwarded)),
        secret_store=secret_store, grace_period_s=grace_period, engine=engine, nnodes=nnodes, node_rank=node_rank,
        rdzv_port=rdzv_port, head_wait_s=head_wait, node_replacement=node_replacement, replace_wait_s=replace_wait)
    sys.exit(Agent(settings).run())
