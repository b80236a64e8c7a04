"""The network check of a multi-node job: before the first attempt starts the script, every node
runs a short torchrun job with the job's own rendezvous (the same endpoint, backend and node
count, a rendezvous id of its own; torchrun's own parser and elastic launch) whose one process
per node all-reduces a small tensor (netcheck_worker.py). A network problem then ends the run before it starts, as one error that
names it and the fix, instead of a job that hangs in its rendezvous or its first collective.

`plan` is pure (what `--dry-run` shows); `run` starts the check and waits for it; `failure`
reads what went wrong with the diagnosis every failed run gets (diagnose.py).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..backends.torchrun import NodeSpec, network_env, node_output_name, torchrun_args
from ..errors import NetCheckError

RDZV_SUFFIX = "-netcheck"  # the check's rendezvous id: <job's id>-netcheck, never the job's own
COLLECTIVE_TIMEOUT_S = 60.0  # once the nodes have met, their processes start within seconds of each other
START_MARGIN_S = 60.0  # torchrun's and the worker's imports on a slow machine
EXIT_WAIT_S = 30.0  # after this node's processes all-reduced: torchrun's exit barrier and teardown
# a node that cannot host the rendezvous store waits this long after its check, so that the head's
# check (whose store holds the job's port until its process is gone) has ended before the job's
# torchrun connects there; torchrun's own start-up (~1-3 s) already leaves more, this is margin
SETTLE_S = 1.0
WORKER = Path(__file__).with_name("netcheck_worker.py")
MARK = "trainctl-net-check"  # netcheck_worker.MARK: the key of the worker's report line
OUTPUT_KEEP_BYTES = 256 * 1024


@dataclass(frozen=True)
class NetCheckPlan:
    """The check this node runs: torchrun's command, what its environment gets on top of this
    process's (the interface for the collectives), and its bounds."""

    command: list[str]
    env: dict[str, str]
    nnodes: int
    nproc_per_node: int
    endpoint: str
    rdzv_backend: str
    rdzv_id: str
    timeout_s: float

    @property
    def deadline_s(self) -> float:
        """The longest the check may take before it is stopped, joins and all."""
        return self.timeout_s + COLLECTIVE_TIMEOUT_S + START_MARGIN_S


@dataclass
class NetCheckResult:
    """How this node's check went: its processes' reports, torchrun's exit, the output."""

    ok: bool
    reports: list[dict[str, Any]]
    exit_code: int | None
    timed_out: bool
    wall_s: float  # the check's whole time, torchrun's start-up and exit included
    all_reduced_s: float | None  # from the start until this node's processes had all-reduced
    output: str = field(default="", repr=False)

    def record(self) -> dict[str, Any]:
        """What the session's events log keeps (the output itself is in its own file)."""
        data = asdict(self)
        data.pop("output")
        return data


def plan(node: NodeSpec, *, python: str, timeout_s: float, environ: dict[str, str] | None = None) -> NetCheckPlan:
    """torchrun with the job's rendezvous settings and one process per node: the cheapest job that
    still crosses every node's network. With the static rendezvous the head hosts the store on
    the job's own port, so the check must end before the job starts (it does: it runs first)."""
    check = replace(node, rdzv_id=node.rdzv_id + RDZV_SUFFIX)
    seconds = max(1, math.ceil(timeout_s))
    # static: the head waits `timeout` for every node, the others try to connect as long;
    # c10d: the join, and each store read (a node that comes up before the head), as long
    conf = f"timeout={seconds}" if node.rdzv_backend == "static" else f"join_timeout={seconds},read_timeout={seconds}"
    # torchrun's arguments, read by torchrun's own parser inside the worker (netcheck_worker.py)
    command = [python, str(WORKER), "--timeout-s", f"{COLLECTIVE_TIMEOUT_S:g}", *torchrun_args(check, 1),
               f"--rdzv-conf={conf}"]
    return NetCheckPlan(command=command, env=network_env(node, environ), nnodes=node.nnodes, nproc_per_node=1,
                        endpoint=node.endpoint, rdzv_backend=node.rdzv_backend, rdzv_id=check.rdzv_id,
                        timeout_s=float(seconds))


def may_host_store(node: NodeSpec) -> bool:
    """Whether this node's torchrun may host the rendezvous store on the job's port: the head of
    a static rendezvous; for c10d, a node whose address (or loopback) is the endpoint's host."""
    if node.rdzv_backend == "static":
        return not node.node_rank
    from .multinode import is_loopback

    return node.host in {node.local_addr, "localhost", socket.gethostname(), socket.getfqdn()} \
        or is_loopback(node.host)


def ended_at_net_check(data: dict[str, Any]) -> bool:
    """A multi-node session (session.json's data) that ended when its network check failed,
    before any attempt: the same command, rendezvous id and all, may run again."""
    nodes = [n for n in (data.get("nodes") or {}).values() if isinstance(n, dict)]
    return data.get("status") in ("failed", "killed") and not any(n.get("attempts") for n in nodes) \
        and any((n.get("net_check") or {}).get("ok") is False for n in nodes)


def output_name(node_key: str) -> str:
    """The file in the session folder that keeps one node's check output."""
    return "net-check." + node_output_name(node_key).removeprefix("output.")


def run(check: NetCheckPlan, *, output_path: Path | None = None, environ: dict[str, str] | None = None) -> NetCheckResult:
    """Run the check here and wait for it (at most `check.deadline_s`); torchrun and its worker
    are stopped on the way out, whatever ends the wait (an interrupt included)."""
    from ..children import die_with_parent, reap_group

    env = {**(os.environ if environ is None else environ), **check.env, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun prints a warning about it otherwise
    started = time.monotonic()
    try:
        proc = subprocess.Popen(check.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=die_with_parent())
    except OSError as e:  # the job's interpreter is missing or can't run: said like any other failure
        return NetCheckResult(ok=False, reports=[], exit_code=None, timed_out=False, wall_s=0.0, all_reduced_s=None,
                              output=f"cannot start {check.command[0]}: {e.strerror or e}\n")
    chunks: list[bytes] = []
    reports: list[dict[str, Any]] = []
    reported_at: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        size = 0
        for line in proc.stdout:
            report = _report(line)
            if report is not None:
                reports.append(report)
                reported_at.append(time.monotonic())
            chunks.append(line)
            size += len(line)
            while size > OUTPUT_KEEP_BYTES and len(chunks) > 1:
                size -= len(chunks.pop(0))

    reader = threading.Thread(target=read, daemon=True, name="trainctl-net-check")
    reader.start()
    timed_out = False
    try:
        deadline = started + check.deadline_s
        while proc.poll() is None:
            now = time.monotonic()
            if len(reports) >= check.nproc_per_node:
                # this node's part is done; its torchrun waits in an exit barrier for the others
                deadline = min(deadline, reported_at[check.nproc_per_node - 1] + EXIT_WAIT_S)
            if now >= deadline:
                timed_out = len(reports) < check.nproc_per_node
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            reap_group(proc.pid)
            proc.wait()
        reader.join(timeout=5.0)
    ended = time.monotonic()
    output = b"".join(chunks).decode("utf-8", "replace")
    if output_path is not None:
        try:
            output_path.write_text(output, encoding="utf-8")
        except OSError:
            pass  # the output is also in the failure's message and the events log
    ok = len(reports) >= check.nproc_per_node and all(r.get(MARK) == "ok" for r in reports)
    all_reduced = reported_at[check.nproc_per_node - 1] - started if len(reported_at) >= check.nproc_per_node else None
    return NetCheckResult(ok=ok, reports=reports, exit_code=proc.returncode, timed_out=timed_out,
                          wall_s=round(ended - started, 3),
                          all_reduced_s=round(all_reduced, 3) if all_reduced is not None else None, output=output)


def _report(line: bytes) -> dict[str, Any] | None:
    if MARK.encode() not in line:
        return None
    text = line.decode("utf-8", "replace")
    start = text.find("{")
    try:
        report = json.loads(text[start:]) if start >= 0 else None
    except ValueError:
        return None
    return report if isinstance(report, dict) and MARK in report else None


def summary(result: NetCheckResult, check: NetCheckPlan) -> str:
    """The one line a passed check shows."""
    backend = next((str(r.get("backend")) for r in result.reports if r.get("backend")), "?")
    processes = "process" if check.nproc_per_node == 1 else "processes"
    return (f"pre-flight: {check.nnodes} nodes x {check.nproc_per_node} {processes} all-reduced over {backend} "
            f"in {result.wall_s:.1f} s")


def failure(result: NetCheckResult, check: NetCheckPlan) -> tuple[NetCheckError, dict[str, Any]]:
    """The error a failed check ends the run with, and the diagnosis the session records: the
    rendezvous and collective rules every failed run is read with, with what this check knows
    (how long it waited, where, what a connection to the head gets now)."""
    from .diagnose import Diagnosis, diagnose

    where = f"{check.endpoint} (rendezvous id {check.rdzv_id}, {check.rdzv_backend})"
    wrong = next((r for r in result.reports if r.get(MARK) == "wrong_sum"), None)
    found: Diagnosis | None
    if wrong is not None:
        found = Diagnosis(
            "net_check_wrong_sum", f"the all-reduce across {check.nnodes} nodes gave {wrong.get('sum')}, "
            f"not {wrong.get('world_size')} ({wrong.get('backend')})",
            "the collectives return wrong results: a broken NCCL/gloo install or mismatched versions across the nodes.",
            "check torch and NCCL versions on every node (python -m torch.utils.collect_env); rerun with NCCL_DEBUG=INFO.")
    elif result.timed_out:
        found = Diagnosis(
            "net_check_timeout", f"the check did not finish within {check.deadline_s:g} s at {where}",
            "the nodes met but the all-reduce never completed: its connections are dropped (a firewall or a "
            "security group that lets the rendezvous port through but not the others), or a node hangs.",
            _network_fix())
    else:
        found = diagnose(result.output, exit_code=result.exit_code)
        if found is None:
            last = next((line.strip() for line in reversed(result.output.splitlines()) if line.strip()), "")
            found = Diagnosis("net_check_failed", f"torchrun ended with exit code {result.exit_code}"
                              + (f": {last[:200]}" if last else ""), "see the check's output.",
                              "fix what its output shows, or skip the check with --no-net-check (on every node).")
    what = found.what
    if found.kind == "rendezvous_timeout":
        what += f": waited {check.timeout_s:g} s for {check.nnodes} nodes at {where}"
    elif found.kind == "rendezvous_unreachable":
        host, _, port = check.endpoint.rpartition(":")
        what += f" within {check.timeout_s:g} s" + _probe(host.strip("[]"), int(port))
    elif found.kind.startswith("distributed"):
        what = f"the nodes met at {check.endpoint}, but {what}"
    hint = found.fix
    if found.kind == "rendezvous_timeout":
        hint += (f" The check waits {check.timeout_s:g} s (--net-check-timeout, net_check_timeout_s); every node "
                 "runs it, so give --no-net-check on every node or none.")
    message = f"network check failed: {what}."
    diagnosis = {"kind": found.kind, "what": message, "cause": found.cause, "fix": hint, "command": None}
    return NetCheckError(message, hint, kind=found.kind), diagnosis


def _network_fix() -> str:
    from .diagnose import NETWORK_FIX

    return NETWORK_FIX[0].upper() + NETWORK_FIX[1:] + "."


def _probe(host: str, port: int, timeout_s: float = 3.0) -> str:
    """What one TCP connection to the head gets now, said in a few words ('' when it connects:
    the head came up since)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return ""
    except ConnectionRefusedError:
        return f": connection refused (nothing listens on port {port} there)"
    except TimeoutError:
        return f": no answer in {timeout_s:g} s (the traffic is dropped on the way)"
    except OSError as e:
        return f": {e.strerror or e}" if (e.strerror or str(e)) else ""
