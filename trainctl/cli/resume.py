"""`trainctl checkpoint resume CKPT SCRIPT [ARGS]...`: a new session that continues a checkpoint."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


def _where(epoch: object, step: object) -> str:
    parts = []
    if epoch is not None:
        parts.append(f"epoch {epoch}")
    if step is not None:
        parts.append(f"step {step}")
    return ", ".join(parts) or "an unknown point"


@click.command("resume", context_settings={"ignore_unknown_options": True,
                                          "allow_interspersed_args": False})
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("script", type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--name", help="A name for the new session.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=None,
              help="Restart after a preemption or crash, from the newest valid checkpoint.")
@click.option("--restart-on", default=None, metavar="STATUSES",
              help="Which endings restart: preempted,failed (default from trainctl.toml).")
@click.option("--restart-delay", type=float, default=None, metavar="SECONDS")
@click.option("--grace-period", type=float, default=None, metavar="SECONDS")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1)
@click.option("--gpus", type=click.IntRange(min=0), default=None, help="GPUs the script needs (checked before start).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or status lines.")
@click.option("--no-preflight", is_flag=True, help="Skip the pre-flight checks.")
@click.option("--force", is_flag=True, help="Resume even if another script wrote CKPT (refused otherwise).")
def resume(ckpt: Path, script: Path, args: tuple[str, ...], name: str | None,
           max_restarts: int | None, restart_on: str | None, restart_delay: float | None,
           grace_period: float | None, nproc_per_node: int, gpus: int | None, quiet: bool,
           no_preflight: bool, force: bool) -> None:
    """Run SCRIPT [ARGS]... as a new session resuming from CKPT.

    The checkpoint is verified first; the script gets `--resume CKPT` (the flag is `resume_flag`
    in trainctl.toml) and TRAIN_OPS_RESUME. The new session's parent is the one that wrote CKPT.
    """
    from .. import checkpoint as ckpt_mod
    from .. import config as config_mod
    from ..backends.base import RunSpec
    from ..errors import ScriptNotFoundError
    from ..launcher.supervisor import restart_policy
    from .watch import run_here

    if not script.is_file():
        raise ScriptNotFoundError(f"script {script} does not exist or is not a file.",
                                  "Name the training script to run, e.g. trainctl checkpoint resume CKPT train.py",
                                  path=str(script))
    command = shlex.join([str(script), *args]).replace("{", "{{").replace("}", "}}")
    ckpt_mod.require_valid(ckpt, suggestion="trainctl checkpoint resume {found} " + command)
    info = ckpt_mod.inspect(ckpt)

    cfg = config_mod.load()
    restart = restart_policy(cfg, max_restarts=max_restarts, restart_on=restart_on,
                             restart_delay_s=restart_delay, grace_period_s=grace_period)
    resources: dict[str, int] = {"nproc_per_node": nproc_per_node}
    if gpus is not None:
        resources["gpus"] = gpus
    spec = RunSpec(script=script, args=tuple(args), resources=resources, resume=str(ckpt), name=name)
    # where CKPT comes from, what differs from this run, and another script's refused: said by the engine
    _supervisor, result = run_here(spec, restart, cfg, quiet=quiet, preflight=not no_preflight,
                                   parent=info.session_id, resume_verified=True, force=force)
    metrics = result.session.metrics()
    last = metrics[-1] if metrics else {}
    reached = _where(last.get("epoch"), last.get("step")) if last else "no new step"
    click.echo(f"  resumed      from {_where(info.epoch, info.step)} of {ckpt}, reached {reached}"
               + (f" (parent session {info.session_id})" if info.session_id else ""), err=True)
    sys.exit(result.exit_code)
