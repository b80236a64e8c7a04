"""`trainctl runpod`: launch, follow, recover, stop and pay for training on RunPod pods."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

# How long a stop waits for the pod's agent to record its end: RunPod kills a container ~5 s after
# SIGTERM, so past this nothing more will come.
STOP_GRACE_S = 15.0

# ------------------------------------------------------------------------------ shared parts

def _config() -> Any:
    from ..config import load

    return load()


def _store(cfg: Any) -> Any:
    from ..session import SessionStore

    return SessionStore(cfg.state_dir)


def _err(text: str) -> None:
    try:
        click.echo(text, err=True)
    except OSError:
        pass


def _parse_secrets(values: tuple[str, ...]) -> dict[str, str]:
    from ..errors import UsageError

    out = {}
    for item in values:
        name, eq, secret = item.partition("=")
        if not eq or not name or not secret:
            raise UsageError(f"--secret {item!r} is not NAME=SECRET_NAME.",
                             "Name the variable and the RunPod secret that holds its value, e.g. "
                             "--secret HF_TOKEN=hf_token (create it at console.runpod.io/user/secrets)")
        out[name] = secret
    return out


def _settings(cfg: Any, *, secrets: tuple[str, ...], keep_on_failure: bool) -> Any:
    from ..backends.runpod import PodSettings
    from ..errors import UsageError
    from ..storage.mirror import project_name

    storage = cfg.get("cloud", "storage")
    if not storage:
        raise UsageError("No storage for RunPod sessions: [cloud] storage is not set in trainctl.toml.",
                         'Add [cloud] storage = "s3://bucket/prefix" (AWS S3, or R2, B2, MinIO with '
                         "endpoint_url): the pod's code, checkpoints and logs live there")
    exclude = []
    for folder in (cfg.state_dir, cfg.checkpoint_dir):
        try:
            exclude.append(folder.relative_to(cfg.root).as_posix())
        except ValueError:
            pass
    return PodSettings(
        storage=storage, project=project_name(cfg), endpoint_url=cfg.get("cloud", "endpoint_url") or None,
        region=cfg.get("cloud", "region") or None, checksums=cfg.get("cloud", "checksums"),
        secrets={**cfg.get("runpod", "secrets"), **_parse_secrets(secrets)},
        budget_usd=cfg.get("cloud", "budget_usd") or None,
        provision_timeout_s=float(cfg.get("runpod", "provision_timeout_min")) * 60,
        setup=cfg.get("runpod", "setup"), keep_on_failure=keep_on_failure, bundle_exclude=tuple(exclude))


def _resources(cfg: Any, base: dict[str, Any] | None = None, **flags: Any) -> dict[str, Any]:
    """Flags over the recorded resources (resume) over trainctl.toml's [runpod]."""
    out: dict[str, Any] = {key: cfg.get("runpod", key) for key in (
        "gpu", "gpu_count", "cloud", "interruptible", "image", "container_disk_gb", "volume_gb", "max_hours")}
    out.update({k: v for k, v in (base or {}).items() if v is not None})
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def _check_args(args: list[str]) -> None:
    """Arguments travel in the pod's start command, which RunPod shows: no secrets there."""
    from ..errors import UsageError
    from ..redact import REDACTED, redact_args

    shown = redact_args(args)
    for given, safe in zip(args, shown, strict=True):
        if given != safe and REDACTED in safe:
            name = safe.split("=")[0] if "=" in safe else "the value after " + shown[shown.index(safe) - 1]
            raise UsageError(f"{name} looks like a secret, and the script's arguments reach the pod's "
                             "start command in clear.",
                             "Store it as a RunPod secret and pass it as a variable: --secret "
                             "NAME=SECRET_NAME, then read it from os.environ in the script")


def _confirm(plan: Any, yes: bool) -> None:
    from ..errors import UsageError

    if yes:
        return
    cost = plan.cost_per_hour
    question = f"Launch this pod? It bills ${cost:.3f}/h until it ends." if cost is not None else "Launch this pod?"
    if not sys.stdin.isatty():
        raise UsageError("Refusing to start a paid pod without confirmation.",
                         "Read the plan above, then pass --yes to launch (or --dry-run to see it only)")
    if not click.confirm(question, default=False, err=True):
        raise click.exceptions.Exit(1)


def _show_plan(plan: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(plan.display(), indent=2, default=str))
    else:
        click.echo(plan.details["text"], err=True)


def _session(cfg: Any, ref: str) -> Any:
    from ..errors import UsageError

    session = _store(cfg).get(ref)
    data = session.read()
    if data.get("backend") != "runpod":
        raise UsageError(f"Session {session.id} ran on {data.get('backend') or 'this machine'}, not RunPod.",
                         f"See it with: trainctl sessions show {session.id}")
    return session


def _handle(session: Any) -> Any:
    from ..errors import UsageError
    from ..launcher.control import recorded_handle

    handle = recorded_handle(session.read())
    if handle is None:
        raise UsageError(f"Session {session.id} has no pod yet (its launch failed).",
                         f"See why: trainctl sessions show {session.id}")
    return handle


def _target(cfg: Any, ref: str) -> tuple[Any, str | None]:
    """(session, None) for a session reference; (None, pod id) for a pod id of no session here."""
    from ..cloud.runpod.api import POD_ID
    from ..errors import SessionNotFoundError

    try:
        return _session(cfg, ref), None
    except SessionNotFoundError:
        if POD_ID.match(ref):
            return None, ref
        raise


class TerminalEvents:
    """The script's output on stdout; trainctl's lines on stderr."""

    def __init__(self) -> None:
        self.shown_running = False

    def message(self, text: str) -> None:
        _err(f"[trainctl] {text}")

    def output(self, chunk: Any) -> None:
        try:
            sys.stdout.buffer.write(chunk.data)
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def state(self, description: Any) -> None:
        pod = description.details.get("pod") or {}
        where = f"pod {description.details.get('pod_id')}"
        if description.state.value == "pending":
            self.message(f"{where} is provisioning (image pull and start; this can take minutes)")
        elif description.state.value == "running":
            gpu = f"{pod.get('gpu_count')} x {pod.get('gpu')}" if pod.get("gpu") else "its GPU"
            self.message(f"{where} runs on {gpu}; output follows (Ctrl-C detaches, the pod keeps running)")
        else:
            self.message(f"{where}: {description.state.value}: {description.details.get('why')}")


def _follow_or_detach(backend: Any, session: Any, handle: Any, *, detach: bool, max_restarts: int,
                      restart: Callable[[int], Any]) -> None:
    from ..cloud.runpod.errors import RunPodError
    from ..launcher.cloud_session import follow

    sid = session.id
    if detach:
        click.echo(f"Started session {sid} on pod {handle.ids['pod_id']}.")
        click.echo(f"  attach   trainctl sessions attach {sid}     (Ctrl-C detaches; the pod keeps running)")
        click.echo(f"  status   trainctl runpod status {sid}")
        click.echo(f"  stop     trainctl runpod stop {sid}         (emergency checkpoint, then terminate)")
        return
    try:
        end = follow(backend, session, handle, TerminalEvents(), max_restarts=max_restarts, restart=restart)
    except KeyboardInterrupt:
        _err(f"\ndetached from session {sid}; its pod keeps running (and billing). Reattach with: "
             f"trainctl sessions attach {sid}; stop it with: trainctl runpod stop {sid}")
        raise SystemExit(0) from None
    except RunPodError as e:  # a new pod could not be started: say how to go on by hand
        from ..errors import TrainctlError

        error = TrainctlError(f"{e.message} (session {sid})",
                              (e.hint + "; then " if e.hint else "") +
                              f"resume by hand, with another GPU if need be: trainctl runpod resume {sid} "
                              "--gpu ...")
        error.exit_code = e.exit_code
        raise error from e
    _show_end(session, end.state, end.description)
    raise SystemExit(end.exit_code)


def _show_end(session: Any, state: Any, description: Any) -> None:
    from .render import metrics_line

    data = session.read()
    cost = data.get("cost_usd")
    line = f"session {session.id} {state.value}" + (f": {data.get('end_reason')}" if data.get("end_reason") else "")
    _err(line + (f"; cost ${cost:.2f}" if isinstance(cost, (int, float)) else ""))
    summary = data.get("summary") or {}
    if summary.get("last"):
        _err(f"  metrics     {metrics_line(summary)}")
    if summary.get("last_checkpoint"):
        _err(f"  checkpoint  {summary['last_checkpoint']}")
    if description.details.get("hint"):
        _err(f"  hint        {description.details['hint']}")
    if state.value in ("preempted", "stopped", "killed", "failed"):
        _err(f"  resume      trainctl runpod resume {session.id}")


# ------------------------------------------------------------------------------ commands

@click.group("runpod")
def runpod() -> None:
    """Run training on RunPod pods: plan, launch, follow, recover, stop and pay.

    A pod session lives in object storage ([cloud] storage in trainctl.toml): the pod's agent
    uploads verified checkpoints, events and output there, and ends its pod when training ends.
    The RunPod API key comes from RUNPOD_API_KEY or ~/.runpod/config.toml.
    """


def _pod_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--gpu", default=None, metavar="TYPE", help='GPU type, e.g. "NVIDIA RTX A4000" (see: trainctl runpod gpus).'),
        click.option("--gpu-count", type=click.IntRange(1, 16), default=None, help="GPUs on the pod."),
        click.option("--cloud", type=click.Choice(["secure", "community"]), default=None, help="RunPod's cloud."),
        click.option("--interruptible/--on-demand", default=None,
                     help="Interruptible (spot): cheaper, stopped when outbid; resumed from storage."),
        click.option("--image", default=None, help="Container image (default: RunPod's PyTorch image)."),
        click.option("--container-disk-gb", type=int, default=None, help="Container disk (image, code, local checkpoints)."),
        click.option("--volume-gb", type=int, default=None, help="Pod volume at /workspace (billed while the pod exists)."),
        click.option("--network-volume", "network_volume_id", default=None, metavar="ID",
                     help="Attach a network volume (pins the pod to its datacenter)."),
        click.option("--max-hours", type=float, default=None,
                     help="The pod ends by now + this even if trainctl is gone (default 24)."),
        click.option("--max-restarts", type=click.IntRange(min=0), default=None,
                     help="While attached: replace an interrupted pod with a new one this many times."),
        click.option("--secret", "secrets", multiple=True, metavar="NAME=SECRET",
                     help="A variable the pod gets from a RunPod secret (repeat)."),
        click.option("--keep-on-failure", is_flag=True, help="Keep a failed pod until the deadline, for debugging."),
        click.option("--dry-run", is_flag=True, help="Print the plan and stop: nothing is created or billed."),
        click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON."),
        click.option("--yes", "-y", is_flag=True, help="Launch without asking."),
        click.option("--detach", "-d", is_flag=True, help="Return once the pod is created."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _backend(settings: Any) -> Any:
    from ..backends.runpod import RunPodBackend

    return RunPodBackend(settings=settings)


@runpod.command("launch", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("script", type=click.Path(path_type=Path))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--name", default=None, help="A name for this run (in listings and the pod's name).")
@_pod_options
def launch_cmd(script: Path, args: tuple[str, ...], name: str | None, gpu: str | None, gpu_count: int | None,
               cloud: str | None, interruptible: bool | None, image: str | None, container_disk_gb: int | None,
               volume_gb: int | None, network_volume_id: str | None, max_hours: float | None,
               max_restarts: int | None, secrets: tuple[str, ...], keep_on_failure: bool, dry_run: bool,
               as_json: bool, yes: bool, detach: bool) -> None:
    """Run SCRIPT [ARGS]... on a new RunPod pod, as a recorded session.

    The plan is printed first (GPU, price read from RunPod, projected cost, image, storage, code
    bundle); --dry-run stops there. Then the code goes to storage, the pod starts, and its
    output follows here until training ends (Ctrl-C detaches; the pod keeps running).
    """
    from ..backends.base import RunSpec
    from ..errors import ScriptNotFoundError
    from ..launcher.cloud_session import create_session, launch_attempt
    from ..session import new_session_id

    if not script.is_file():
        raise ScriptNotFoundError(f"script {script} does not exist." if not script.exists() else
                                  f"{script} is not a file.", "Check the path (relative to the current folder).",
                                  path=str(script))
    _check_args(list(args))
    cfg = _config()
    settings = _settings(cfg, secrets=secrets, keep_on_failure=keep_on_failure)
    restarts = cfg.get("restart", "max_restarts") if max_restarts is None else max_restarts
    resources = _resources(cfg, gpu=gpu, gpu_count=gpu_count, cloud=cloud, interruptible=interruptible,
                           image=image, container_disk_gb=container_disk_gb, volume_gb=volume_gb,
                           network_volume_id=network_volume_id, max_hours=max_hours)
    session_id = new_session_id()
    spec = RunSpec(script=script, args=tuple(args), resources={**resources, "attempt": 0}, name=name,
                   session_id=session_id, session_dir=cfg.state_dir / "sessions" / session_id,
                   cwd=cfg.root)
    backend = _backend(settings)
    plan = backend.plan(spec)
    _show_plan(plan, as_json)
    if dry_run:
        return
    _confirm(plan, yes)
    session = create_session(_store(cfg), spec, plan, config=cfg.resolved(), max_restarts=restarts,
                             grace_period_s=STOP_GRACE_S,
                             command=["trainctl", "runpod", "launch", str(script), *args])
    _err(f"[trainctl] session {session.id}: uploading the code to {plan.details['storage']}/code/, then "
         "creating the pod")
    handle = launch_attempt(backend, session, plan, 0)
    _err(f"[trainctl] pod {handle.ids['pod_id']} created ({plan.details['pod']['pod_name']})")
    _follow_or_detach(backend, session, handle, detach=detach, max_restarts=restarts,
                      restart=_restarter(backend, session, spec))


def _restarter(backend: Any, session: Any, spec: Any) -> Callable[[int], Any]:
    """Launch attempt n of the session: same code, resources and deadline, fresh prices."""
    from ..launcher.cloud_session import launch_attempt

    def restart(attempt: int) -> Any:
        data = session.read()
        resume = _latest_line(backend, session)
        resources = {**spec.resources, "attempt": attempt, "spent_usd": data.get("cost_usd") or 0.0,
                     "deadline_utc": data.get("deadline_utc")}
        plan = backend.plan(replace(spec, resources=resources, resume=resume))
        _err(f"[trainctl] attempt {attempt}: {plan.details['pod']['pod_name']}, "
             f"${plan.cost_per_hour:.3f}/h, resuming from {resume or 'the start (no checkpoint in storage yet)'}")
        return launch_attempt(backend, session, plan, attempt, resume=resume)

    return restart


def _latest_line(backend: Any, session: Any) -> str | None:
    data = session.read()
    handle = _handle(session)
    latest = backend.remote(handle.ids).latest_checkpoint()
    if not latest:
        return None
    step = f" (step {latest['step']})" if latest.get("step") is not None else ""
    return f"{data.get('storage')}/{latest.get('checkpoint')}{step}"


@runpod.command("resume")
@click.argument("session_ref", metavar="SESSION")
@_pod_options
def resume_cmd(session_ref: str, gpu: str | None, gpu_count: int | None, cloud: str | None,
               interruptible: bool | None, image: str | None, container_disk_gb: int | None,
               volume_gb: int | None, network_volume_id: str | None, max_hours: float | None,
               max_restarts: int | None, secrets: tuple[str, ...], keep_on_failure: bool, dry_run: bool,
               as_json: bool, yes: bool, detach: bool) -> None:
    """Continue an interrupted or stopped pod session on a new pod, from the newest checkpoint
    in storage. Another GPU type, count or cloud may be chosen; the session's deadline holds
    unless --max-hours gives a new one."""
    from ..backends.base import RunSpec
    from ..errors import UsageError
    from ..launcher.cloud_session import launch_attempt

    cfg = _config()
    session = _session(cfg, session_ref)
    data = session.read()
    handle = _handle(session)
    settings = _settings(cfg, secrets=secrets, keep_on_failure=keep_on_failure)
    if data.get("storage") and data["storage"] != settings.session_uri(session.id):
        settings = replace(settings, storage=data["storage"].rsplit("/", 2)[0],
                           project=data["storage"].rsplit("/", 2)[1])
    backend = _backend(settings)
    now = backend.describe(handle)
    if now.running:
        raise UsageError(f"Session {session.id} is still {now.state.value} on pod {handle.ids['pod_id']}.",
                         f"Follow it: trainctl sessions attach {session.id}; or stop it first: "
                         f"trainctl runpod stop {session.id}")
    remote = backend.remote(handle.ids)
    ended = remote.ended()
    if ended:
        status = ended.get("status") or "ended"
        raise UsageError(f"Session {session.id} {'completed' if status == 'completed' else 'ended for good'} "
                         f"on its pod ({ended.get('reason')}); nothing restarts it.",
                         "Start a new session: trainctl runpod launch SCRIPT ...")
    record = remote.store.get_json("code/bundle.json")
    attempt = max([int(a.get("attempt", 0)) for a in data.get("attempts") or [] if isinstance(a, dict)] + [0]) + 1
    base = dict(data.get("resources") or {})
    restarts = cfg.get("restart", "max_restarts") if max_restarts is None else max_restarts
    resources = _resources(cfg, base, gpu=gpu, gpu_count=gpu_count, cloud=cloud, interruptible=interruptible,
                           image=image, container_disk_gb=container_disk_gb, volume_gb=volume_gb,
                           network_volume_id=network_volume_id, max_hours=max_hours)
    resources.update(attempt=attempt, spent_usd=data.get("cost_usd") or 0.0, bundle=record.get("summary"),
                     deadline_utc=None if max_hours is not None else data.get("deadline_utc"))
    resume = _latest_line(backend, session)
    spec = RunSpec(script=Path(data["script"]), args=tuple(data.get("args") or ()), resources=resources,
                   name=data.get("name"), resume=resume, session_id=session.id, session_dir=session.dir,
                   cwd=Path(data.get("cwd") or cfg.root))
    plan = backend.plan(spec)
    _show_plan(plan, as_json)
    if dry_run:
        return
    _confirm(plan, yes)
    backend.release(handle)  # a stopped pod bills its volume; restarting it risks zero GPUs
    session.update(resources={k: v for k, v in resources.items() if k not in ("bundle", "attempt", "spent_usd")},
                   deadline_utc=plan.details["deadline_utc"], status="pending")
    session.event("restart", attempt=attempt, reason="trainctl runpod resume", resume=resume)
    new = launch_attempt(backend, session, plan, attempt, resume=resume)
    _err(f"[trainctl] pod {new.ids['pod_id']} created for attempt {attempt} of session {session.id}")
    _follow_or_detach(backend, session, new, detach=detach, max_restarts=restarts,
                      restart=_restarter(backend, session, spec))


@runpod.command("gpus")
@click.option("--gpu-count", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Prices and stock for this many GPUs on one pod.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
def gpus_cmd(gpu_count: int, as_json: bool) -> None:
    """GPU types with memory, secure and community prices (on-demand and interruptible) and stock."""
    from ..cloud.runpod.api import RunPodClient
    from ..cloud.runpod.catalog import gpu_table, read_offers, render_gpu_table

    offers, read_at = read_offers(RunPodClient.from_environment(), gpu_count)
    if as_json:
        click.echo(json.dumps(gpu_table(offers), indent=2))
        return
    click.echo(render_gpu_table(offers, read_at, gpu_count))


def _session_view(cfg: Any) -> Callable[[str], Any]:
    from ..cloud.runpod.pods import SessionView
    from ..errors import SessionNotFoundError
    from ..launcher.control import recorded_handle
    from ..session import effective_status

    store = _store(cfg)

    def view(session_id: str) -> Any:
        try:
            data = store.get(session_id).read()
        except SessionNotFoundError:
            return None
        if data.get("id") != session_id:
            return None
        handle = recorded_handle(data)
        return SessionView(status=effective_status(data).value,
                           pod_id=handle.ids.get("pod_id") if handle else None)

    return view


@runpod.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
def list_cmd(as_json: bool) -> None:
    """trainctl's pods on the account: session, state, GPU, uptime, cost so far. Pods whose session
    ended, moved on or is unknown here are flagged as possible leaks, with the command to end them."""
    from ..cloud.runpod import pods
    from ..cloud.runpod.api import RunPodClient

    found = pods.list_pods(RunPodClient.from_environment(), _session_view(_config()))
    if as_json:
        click.echo(json.dumps([p.to_json() for p in found], indent=2))
        return
    click.echo(pods.render_pod_table(found))


@runpod.command("status")
@click.argument("ref", metavar="SESSION|POD")
@click.option("--json", "as_json", is_flag=True, help="As JSON, for scripts.")
def status_cmd(ref: str, as_json: bool) -> None:
    """Where a pod session stands: the pod, progress, newest checkpoint, cost so far, deadline."""
    from ..cloud.runpod import pods
    from ..formatting import format_duration

    cfg = _config()
    session, pod_id = _target(cfg, ref)
    backend = _backend(None)
    if session is None:
        assert pod_id is not None
        from ..cloud.runpod.errors import PodNotFoundError

        raw = backend.client.get_pod(pod_id)
        if raw is None:
            raise PodNotFoundError(pod_id)
        info = pods.pod_info(raw)
        view = _session_view(cfg)(info.session_id) if info.session_id else None
        info = pods.pod_info(raw, pods.leak_reason(info, view))
        if as_json:
            click.echo(json.dumps(info.to_json(), indent=2))
            return
        click.echo(pods.render_pod_table([info]))
        return
    handle = _handle(session)
    described = backend.describe(handle)
    data = session.read()
    latest = backend.remote(handle.ids).latest_checkpoint()
    if as_json:
        click.echo(json.dumps({"session": session.id, "status": data.get("status"),
                               "state": described.state.value, "attempt": handle.attempt,
                               "details": described.details, "latest_checkpoint": latest,
                               "cost_usd": data.get("cost_usd"), "deadline_utc": data.get("deadline_utc")},
                              indent=2, default=str))
        return
    pod = described.details.get("pod") or {}
    launched = handle.ids.get("pod") or {}
    rows = [("session", f"{session.id}" + (f" ({data['name']})" if data.get("name") else "")),
            ("status", f"{data.get('status')}: {described.details.get('why')}"),
            ("pod", f"{handle.ids['pod_id']} (attempt {handle.attempt}): "
                    f"{launched.get('gpu_count')} x {launched.get('gpu')}, {launched.get('cloud')} "
                    f"{launched.get('market')}, ${launched.get('price_hr_usd', 0):.3f}/h"
                    + (f", {pod.get('state')}" if pod else ", gone"))]
    if pod.get("uptime_s"):
        rows.append(("uptime", format_duration(pod["uptime_s"])))
    cost = data.get("cost_usd")
    if isinstance(cost, (int, float)):
        rows.append(("cost so far", f"${cost:.2f} (all attempts)"))
    beat = described.details.get("heartbeat")
    if isinstance(beat, dict) and beat.get("t"):
        rate = f" at {beat['rate']:.3g} steps/s" if isinstance(beat.get("rate"), (int, float)) else ""
        rows.append(("progress", f"step {beat.get('step')}{rate} (heartbeat {format_duration(time.time() - beat['t'])} ago)"))
    if latest:
        rows.append(("checkpoint", f"{latest.get('checkpoint')} (step {latest.get('step')})"))
    if data.get("deadline_utc"):
        rows.append(("deadline", f"{data['deadline_utc']} (the pod ends by then)"))
    if pod.get("ssh_host") and pod.get("ssh_port"):
        rows.append(("ssh", f"ssh root@{pod['ssh_host']} -p {pod['ssh_port']}"))
    rows.append(("storage", str(data.get("storage"))))
    for key, value in rows:
        click.echo(f"{key:<12} {value}")
    if described.details.get("hint"):
        click.echo(f"{'hint':<12} {described.details['hint']}")


@runpod.command("stop")
@click.argument("session_ref", metavar="SESSION")
@click.option("--keep-volume", is_flag=True, help="Leave the stopped pod (and its billed volume) for later.")
@click.option("--now", is_flag=True, help="Terminate at once, without the emergency checkpoint.")
def stop_cmd(session_ref: str, keep_volume: bool, now: bool) -> None:
    """Stop a pod session: the pod's agent gets SIGTERM and writes an emergency checkpoint to
    storage, then the pod is terminated (unless --keep-volume). Resume it with `runpod resume`."""
    from ..launcher.control import stop

    cfg = _config()
    session = _session(cfg, session_ref)
    handle = _handle(session)
    if not now:
        _err(f"Stopping session {session.id}: SIGTERM to pod {handle.ids['pod_id']}, waiting for its "
             "emergency checkpoint...")
    result = stop(session, now=now, grace_period_s=None if not now else 0.0, release=not keep_volume)
    if not result.was_running:
        click.echo(f"Session {session.id} is not running ({result.status}); nothing to stop.")
        return
    pod = handle.ids["pod_id"]
    click.echo(f"Session {session.id} {result.status}; pod {pod} " +
               (f"stopped: its volume keeps billing until: trainctl runpod terminate {pod}" if keep_volume
                else "terminated: nothing of it bills any more."))
    click.echo(f"resume     trainctl runpod resume {session.id}")


@runpod.command("terminate")
@click.argument("refs", nargs=-1, required=True, metavar="SESSION|POD...")
def terminate_cmd(refs: tuple[str, ...]) -> None:
    """End pods now, for good (no emergency checkpoint): a session's current pod, or pods by id
    (as `runpod list` shows leaks). Safe to repeat."""
    from ..cloud.runpod import pods
    from ..launcher.cloud_session import terminate

    cfg = _config()
    backend = _backend(None)
    for ref in refs:
        session, pod_id = _target(cfg, ref)
        if session is None:
            assert pod_id is not None
            click.echo(pods.terminate_pod(backend.client, pod_id).message)
            continue
        handle = _handle(session)
        was_running = terminate(backend, session, handle)
        click.echo(f"pod {handle.ids['pod_id']} of session {session.id} terminated" +
                   ("; the session ended killed" if was_running else f" (the session had ended: "
                                                                     f"{session.read().get('status')})"))


@runpod.command("ssh")
@click.argument("ref", metavar="SESSION|POD")
@click.option("--print", "print_only", is_flag=True, help="Print the ssh command instead of running it.")
def ssh_cmd(ref: str, print_only: bool) -> None:
    """Open a shell on the session's pod (its public SSH endpoint; RunPod adds your account's
    SSH public keys to its PyTorch images)."""
    import os
    import shlex
    import shutil

    from ..cloud.runpod import pods
    from ..errors import UsageError

    cfg = _config()
    session, pod_id = _target(cfg, ref)
    if session is not None:
        pod_id = _handle(session).ids["pod_id"]
    assert pod_id is not None
    info = pods.pod_status(_backend(None).client, pod_id)
    command = pods.ssh_command(info)
    if command is None:
        raise UsageError(f"Pod {pod_id} has no SSH endpoint ({info.state}).",
                         "A pod has one once it runs, with a public IP: see trainctl runpod status "
                         f"{ref}; images without sshd have none")
    if print_only or not sys.stdin.isatty() or shutil.which("ssh") is None:
        click.echo(command)
        return
    argv = shlex.split(command)
    os.execvp(argv[0], argv)
