"""torchrun's side of a multi-node job: this node's part as plain data (it travels in
RunSpec.resources), the arguments torchrun gets and what the script's processes get for the
collectives. The launcher (launcher/multinode.py) works the values out; torchrun's c10d
rendezvous does the distributed part.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

_ID = re.compile(r"[^A-Za-z0-9._-]+")
NODE_HEARTBEAT_S = 15.0  # how often each node of a running job says in session.json that it is alive
NODE_SILENT_S = 4 * NODE_HEARTBEAT_S  # a node not heard from for this long may be down


@dataclass(frozen=True)
class NodeSpec:
    """This node's part in a multi-node job, as plain data (it travels in RunSpec.resources)."""

    nnodes: int
    host: str  # the rendezvous endpoint's host (the head)
    port: int
    rdzv_id: str
    node_rank: int | None = None  # a name for this node only: c10d assigns the ranks itself
    source: str = "flags"  # or "slurm"
    local_addr: str | None = None  # this node's own address, passed to torchrun (--local-addr)
    socket_ifname: str | None = None  # the interface that routes to the head
    # "c10d" (c10d assigns the ranks), or "static": node_rank is the group rank, so global rank 0
    # (the one that writes checkpoints) runs on node 0, the head; what AWS nodes use, whose head
    # is the one machine that syncs the session to storage
    rdzv_backend: str = "c10d"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def session_id(self) -> str:
        return session_id_for(self.rdzv_id)

    def to_resources(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_resources(cls, resources: Mapping[str, Any]) -> NodeSpec | None:
        if int(resources.get("nnodes") or 1) <= 1 or not resources.get("rdzv_id"):
            return None
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in resources.items() if k in names})


def session_id_for(rdzv_id: str, now: float | None = None) -> str:
    """The session id every node derives from the rendezvous id on its own: the UTC day (so ids
    still sort by time) and the id itself. Nodes started on different UTC days do not agree."""
    day = time.strftime("%Y%m%d", time.gmtime(now if now is not None else time.time()))
    return f"{day}-job-{_ID.sub('_', rdzv_id)[:48]}"


def torchrun_args(node: NodeSpec, nproc_per_node: int) -> list[str]:
    """torchrun's arguments for this node. `--max-restarts 0`: trainctl restarts the whole job
    (one restart loop, not two). No --node-rank with c10d: it assigns ranks and ignores it; with
    the static rendezvous the node rank is the group rank and the head hosts the store."""
    if node.rdzv_backend == "static":
        args = [f"--nnodes={node.nnodes}", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=static",
                f"--master-addr={node.host}", f"--master-port={node.port}", f"--node-rank={node.node_rank or 0}",
                f"--rdzv-id={node.rdzv_id}", "--max-restarts=0"]
        if node.local_addr:
            args.append(f"--local-addr={node.local_addr}")
        return args
    args = [f"--nnodes={node.nnodes}", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={node.endpoint}", f"--rdzv-id={node.rdzv_id}", "--max-restarts=0"]
    if node.local_addr:
        args.append(f"--local-addr={node.local_addr}")
    return args


def network_env(node: NodeSpec, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the script's processes get for the collectives, never over what the user set."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    if not node.socket_ifname:
        return out
    # "^lo,docker0" (any interface but those) is NCCL's syntax; gloo takes one name
    names = ("NCCL_SOCKET_IFNAME",) if node.socket_ifname.startswith("^") else ("GLOO_SOCKET_IFNAME",
                                                                                "NCCL_SOCKET_IFNAME")
    for name in names:
        if not env.get(name):
            out[name] = node.socket_ifname
    if not env.get("NCCL_DEBUG"):
        out["NCCL_DEBUG"] = "WARN"  # NCCL's own account of a failure, in the output the diagnosis reads
    return out


def node_output_name(node_key: str) -> str:
    """The file in the session folder that holds one node's output."""
    return f"output.{_ID.sub('_', node_key)}.log"


def worker_ranks(torchrun_pid: int) -> dict[str, Any] | None:
    """Where this node's workers stand in the job, read from the environment torchrun gave them
    (GROUP_RANK, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE: c10d assigns them, whatever --node-rank
    said); None until a worker has started (Linux: /proc)."""
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return None
    for name in names:
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            if int(stat.rsplit(b")", 1)[1].split()[1]) != torchrun_pid:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                raw = f.read()
        except (OSError, IndexError, ValueError):
            continue
        env = {}
        for item in raw.split(b"\0"):
            key, eq, value = item.partition(b"=")
            if eq and key in _WORKER_VARIABLES:
                env[key.decode()] = value.decode(errors="replace")
        try:
            rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
            local_world = int(env["LOCAL_WORLD_SIZE"])
            return {"group_rank": int(env["GROUP_RANK"]), "ranks": [rank - local_rank, rank - local_rank + local_world - 1],
                    "world_size": int(env["WORLD_SIZE"]), "master_addr": env.get("MASTER_ADDR")}
        except (KeyError, ValueError):
            continue
    return None


_WORKER_VARIABLES = frozenset({b"RANK", b"LOCAL_RANK", b"LOCAL_WORLD_SIZE", b"GROUP_RANK", b"WORLD_SIZE",
                               b"MASTER_ADDR"})
