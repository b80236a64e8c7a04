"""`trainctl local`: run a script on this machine as a recorded session, here or in the background."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .. import env as env_mod

LOCAL_EPILOG = "\b\nThe script gets these variables:\n" + env_mod.help_table() + """

\b
Exit codes: the script's own; 75 when it stopped on a preemption signal
after an emergency checkpoint; 130 when trainctl was interrupted or the run
was stopped (trainctl sessions stop); 2 when a pre-flight check failed."""


@click.command("local", epilog=LOCAL_EPILOG,
               context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("script", type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--name", help="A name for this run (used by --resume auto and in listings).")
@click.option("--resume", "resume", metavar="auto|PATH",
              help="Resume from a checkpoint; 'auto' picks this script's (or --name's) newest valid one, "
                   "preferring one whose settings match this run's, and says what differs.")
@click.option("--max-restarts", type=int, default=None,
              help="Restart after a preemption or crash, resuming from the newest valid checkpoint.")
@click.option("--restart-on", default=None, metavar="STATUSES",
              help="Which endings restart: preempted,failed (default from trainctl.toml).")
@click.option("--restart-delay", type=float, default=None, metavar="SECONDS",
              help="Seconds to wait before a restart.")
@click.option("--grace-period", type=float, default=None, metavar="SECONDS",
              help="Seconds between forwarding a stop signal and SIGKILL (default 30).")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1,
              help="Processes to start through torchrun (torch.distributed.run).")
@click.option("--nnodes", type=int, default=None,
              help="Machines in the job; start trainctl local on each (under SLURM, read from its variables).")
@click.option("--node-rank", type=int, default=None,
              help="This machine's number, 0 to nnodes-1 (a label: torchrun's c10d rendezvous assigns the ranks).")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="Where the machines meet: one of them (the head) and a free port, the same on every machine.")
@click.option("--rdzv-id", default=None, metavar="ID",
              help="The job's id, the same on every machine; it names the one session they share "
                   "(default: from the endpoint; under SLURM the job id).")
@click.option("--gpus", type=click.IntRange(min=0), default=None, help="GPUs the script needs (checked before start).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or status lines.")
@click.option("--no-preflight", is_flag=True,
              help="Skip the pre-flight checks (not the network check of several machines: --no-net-check).")
@click.option("--no-net-check", is_flag=True,
              help="Several machines: skip the all-reduce across them that runs before the script "
                   "(on every machine or none; trainctl.toml: net_check = false).")
@click.option("--net-check-timeout", type=float, default=None, metavar="SECONDS",
              help="Several machines: how long that check waits for every machine to join "
                   "(default 600, net_check_timeout_s).")
@click.option("--detach", "-d", is_flag=True,
              help="Run in the background and return at once; follow with trainctl sessions attach ID.")
@click.option("--dry-run", is_flag=True,
              help="Print what would run (command, environment, where output and checkpoints go); start nothing.")
@click.option("--sync", "sync_uri", metavar="URI", default=None,
              help="Also mirror the session to storage (s3://bucket/prefix or a folder) while it runs: "
                   "checkpoints once verified, then latest.json; events and output.")
@click.option("--force", is_flag=True,
              help="Resume even from a checkpoint another script wrote (refused otherwise).")
def local_cmd(script: Path, args: tuple[str, ...], name: str | None, resume: str | None,
              max_restarts: int | None, restart_on: str | None, restart_delay: float | None,
              grace_period: float | None, nproc_per_node: int, nnodes: int | None, node_rank: int | None,
              rdzv_endpoint: str | None, rdzv_id: str | None, gpus: int | None, quiet: bool,
              no_preflight: bool, no_net_check: bool, net_check_timeout: float | None, detach: bool, dry_run: bool,
              sync_uri: str | None, force: bool) -> None:
    """Run SCRIPT [ARGS]... here as a recorded session.

    The script runs as it would with `python SCRIPT ARGS`, with TRAIN_OPS_* variables telling it
    where its session, checkpoints and TensorBoard logs go.
    """
    from ..backends.base import RunSpec
    from ..config import load
    from ..errors import ScriptNotFoundError
    from ..launcher.supervisor import restart_policy
    from ..resume import split_resume_arg
    from .watch import run_here, show_plan, start_in_background

    if not script.exists():
        raise ScriptNotFoundError(f"script {script} does not exist.",
                                  "Check the path (relative to the current folder).", path=str(script))
    if script.is_dir():
        raise ScriptNotFoundError(f"{script} is a directory, not a script.",
                                  f"Name the file to run, e.g. trainctl local {script / 'train.py'}",
                                  path=str(script))
    cfg = load()
    if sync_uri is not None:
        from ..storage.uri import parse_uri

        parse_uri(sync_uri)  # a bad URI fails before anything starts
    args_list = list(args)
    if resume is None:
        resume, args_list = split_resume_arg(args_list, cfg.resume_flag)
    restart = restart_policy(cfg, max_restarts=max_restarts, restart_on=restart_on,
                             restart_delay_s=restart_delay, grace_period_s=grace_period)
    resources: dict[str, Any] = {"nproc_per_node": nproc_per_node}
    from ..launcher import multinode

    node = multinode.resolve(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
    if node is not None:
        resources.update(multinode.with_network(node).to_resources())
    if gpus is not None:
        resources["gpus"] = gpus
    spec = RunSpec(script=script, args=tuple(args_list), resources=resources, resume=resume, name=name)
    net_check = {"net_check": False if no_net_check else None, "net_check_timeout_s": net_check_timeout}
    if dry_run:
        show_plan(spec, restart, cfg, force=force, **net_check)
        return
    if detach:
        start_in_background(spec, restart, cfg, preflight=not no_preflight, force=force, sync_uri=sync_uri,
                            **net_check)
        return
    _supervisor, result = run_here(spec, restart, cfg, quiet=quiet, preflight=not no_preflight, sync_uri=sync_uri,
                                   force=force, **net_check)
    sys.exit(result.exit_code)
