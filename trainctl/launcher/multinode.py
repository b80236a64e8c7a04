"""One job over several machines: what `trainctl local --nnodes N` (or SLURM's variables) asks for,
checked and turned into plain data the local backend passes to torchrun's c10d rendezvous.

torchrun does the distributed part (rendezvous, ranks, worker start); this module only decides
what each node passes to it: the endpoint, the rendezvous id (which is also the session id every
node joins), this node's own address and the network interface the collectives use.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import asdict

from ..backends.torchrun import NodeSpec
from ..errors import UsageError

DEFAULT_PORT = 29400  # torchrun's own default for the c10d rendezvous
SLURM_VARIABLES = ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST")
AVOID_INTERFACES = ("lo", "docker0")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")


def parse_endpoint(value: str, *, flag: str = "--rdzv-endpoint") -> tuple[str, int]:
    """HOST:PORT (PORT optional: torchrun's 29400), or [IPv6]:PORT."""
    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[:end + 1], text[end + 1:]
        if end < 0 or (rest and not rest.startswith(":")):
            host = ""
        port_text = rest[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not host or not _HOST.match(host):
        raise UsageError(f"{flag} '{value}' is not HOST:PORT.",
                         f"Give the head node's address and a free port, e.g. {flag} 10.0.0.1:29400")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UsageError(f"{flag} '{value}': port '{port_text}' is not a number from 1 to 65535.",
                             f"e.g. {flag} {host}:29400")
        return host.strip("[]"), int(port_text)
    return host.strip("[]"), DEFAULT_PORT


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list ('gpu[01-03,07],cpu5', 'a[1-2]-ib[0-1]') as host names.

    Raises UsageError for anything it cannot read: a wrong first host would send every node to
    a rendezvous nobody hosts, so there is no guessing and no fallback to this machine."""
    hosts: list[str] = []
    for part in _split_top(text.strip(), text):
        hosts.extend(_expand_one(part, text))
    if not hosts:
        raise _bad_hostlist(text)
    return hosts


def _bad_hostlist(text: str) -> UsageError:
    return UsageError(f"cannot read SLURM_JOB_NODELIST '{text}' as a host list.",
                      "Pass the head node yourself: --rdzv-endpoint HOST:PORT "
                      "(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1 names it).")


def _split_top(text: str, whole: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise _bad_hostlist(whole)
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise _bad_hostlist(whole)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise _bad_hostlist(whole)
    parts.append(current)
    if any(not p.strip() for p in parts):
        raise _bad_hostlist(whole)
    return [p.strip() for p in parts]


def _expand_one(part: str, whole: str, *, tail: bool = False) -> list[str]:
    start = part.find("[")
    if start < 0:
        if "]" in part or (not tail and not _HOST.match(part)):
            raise _bad_hostlist(whole)
        return [part]
    end = part.index("]", start)
    prefix, body, rest = part[:start], part[start + 1:end], part[end + 1:]
    values: list[str] = []
    for item in body.split(","):
        lo, dash, hi = item.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise _bad_hostlist(whole)
        if not dash:
            values.append(lo)
            continue
        if int(hi) < int(lo) or int(hi) - int(lo) > 100000:
            raise _bad_hostlist(whole)
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    tails = _expand_one(rest, whole, tail=True) if rest else [""]
    hosts = [prefix + v + t for v in values for t in tails]
    if not tail and any(not _HOST.match(h) for h in hosts):
        raise _bad_hostlist(whole)
    return hosts


def resolve(*, nnodes: int | None, node_rank: int | None, rdzv_endpoint: str | None, rdzv_id: str | None,
            environ: Mapping[str, str] | None = None) -> NodeSpec | None:
    """This node's part from the flags, else from SLURM's variables; None for a one-node run.
    Bad or contradicting input is a UsageError naming the value and the fix."""
    env = os.environ if environ is None else environ
    given = any(v is not None for v in (nnodes, node_rank, rdzv_endpoint, rdzv_id))
    if not given and all(env.get(name) for name in SLURM_VARIABLES[:3]) and _int(env, "SLURM_NNODES") != 1:
        return _from_slurm(env)
    if not given:
        return None
    if nnodes is None:
        named = "--node-rank" if node_rank is not None else "--rdzv-endpoint" if rdzv_endpoint else "--rdzv-id"
        raise UsageError(f"{named} needs --nnodes: how many machines take part.",
                         "e.g. trainctl local --nnodes 2 --node-rank 0 --rdzv-endpoint HEAD:29400 "
                         "--nproc-per-node 8 train.py")
    if nnodes < 1:
        raise UsageError(f"--nnodes must be 1 or more, not {nnodes}.", "e.g. --nnodes 2")
    if nnodes == 1:
        if rdzv_endpoint is not None or node_rank not in (None, 0) or rdzv_id is not None:
            raise UsageError("--nnodes 1 runs on this machine alone: --rdzv-endpoint, --rdzv-id and "
                             "--node-rank are for several machines.",
                             "Leave them out (trainctl local --nproc-per-node G train.py), or give --nnodes N "
                             "with N > 1.")
        return None
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise UsageError(f"--node-rank {node_rank} is out of range for --nnodes {nnodes} "
                         f"(0 to {nnodes - 1}).", f"Number the machines 0 to {nnodes - 1}.")
    if not rdzv_endpoint:
        raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT: where the nodes meet.",
                         "Give every node the same address of one of them (the head), "
                         "e.g. --rdzv-endpoint 10.0.0.1:29400")
    host, port = parse_endpoint(rdzv_endpoint)
    return NodeSpec(nnodes=nnodes, host=host, port=port, rdzv_id=_check_id(rdzv_id or f"{host}-{port}"),
                    node_rank=node_rank)


def _check_id(value: str) -> str:
    if not value.strip() or len(value) > 128:
        raise UsageError(f"--rdzv-id '{value}' must be 1 to 128 characters.", "e.g. --rdzv-id exp42")
    return value


def _int(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def _from_slurm(env: Mapping[str, str]) -> NodeSpec:
    nnodes, node_id = _int(env, "SLURM_NNODES"), _int(env, "SLURM_NODEID")
    if nnodes is None or node_id is None or nnodes < 1 or not 0 <= node_id < nnodes:
        raise UsageError(f"SLURM_NNODES={env.get('SLURM_NNODES')!r} and SLURM_NODEID={env.get('SLURM_NODEID')!r} "
                         "do not describe a node of a job.",
                         "Run under srun inside an allocation, or pass --nnodes/--rdzv-endpoint yourself.")
    tasks = _int(env, "SLURM_NTASKS")
    if tasks is not None and tasks != nnodes:
        raise UsageError(f"srun started {tasks} tasks on {nnodes} nodes: trainctl local starts the processes of "
                         "a node itself (--nproc-per-node), so it needs one task per node.",
                         "srun --ntasks-per-node=1 trainctl local --nproc-per-node G train.py")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if not nodelist:
        raise UsageError("SLURM_JOB_NODELIST is not set: the head node is unknown.",
                         "Run under srun, or pass --rdzv-endpoint HOST:PORT.")
    hosts = expand_hostlist(nodelist)
    port_text = env.get("MASTER_PORT") or ""
    port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else DEFAULT_PORT
    return NodeSpec(nnodes=nnodes, host=hosts[0], port=port, rdzv_id=_check_id(env["SLURM_JOB_ID"]),
                    node_rank=node_id, source="slurm")


# ---------------------------------------------------------------- this node's network
def with_network(node: NodeSpec, environ: Mapping[str, str] | None = None) -> NodeSpec:
    """The node with its own address (the one that routes to the head) and, unless the user set
    GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME, the interface that holds it. Loopback only when the
    head itself is on loopback (every node on this machine, as in a test)."""
    env = os.environ if environ is None else environ
    address = _route_source(node.host, node.port)
    ifname = None
    if not (env.get("GLOO_SOCKET_IFNAME") and env.get("NCCL_SOCKET_IFNAME")):
        ifname = _interface_of(address)
        if ifname in AVOID_INTERFACES and not is_loopback(address):
            ifname = None
        if ifname is None:
            ifname = "^" + ",".join(AVOID_INTERFACES) if not is_loopback(address) else "lo"
    return NodeSpec(**{**asdict(node), "local_addr": address, "socket_ifname": ifname})


def is_loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _route_source(host: str, port: int) -> str:
    """This machine's address on the route to `host` (a UDP connect sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"cannot resolve the rendezvous host '{host}' ({e}).",
                         "Use the head node's IP address in --rdzv-endpoint, or fix the name in DNS or /etc/hosts.") from e
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(address)
            return str(s.getsockname()[0])
        except OSError as e:
            raise UsageError(f"no route from this machine to the rendezvous host '{host}' ({e.strerror}).",
                             "Check the address in --rdzv-endpoint and this machine's network (ip route get ADDRESS).") from e


def _interface_of(address: str) -> str | None:
    """The interface holding IPv4 `address` (Linux); None where that cannot be told."""
    try:
        import fcntl
        import struct
    except ImportError:
        return None
    if is_loopback(address):
        return "lo"
    try:
        wanted = socket.inet_aton(address)
    except OSError:
        return None
    for _index, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
        if raw[20:24] == wanted:
            return name
    return None
