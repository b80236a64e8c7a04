"""The network check's job, run on every node of a multi-node job before the script starts
(launcher/netcheck.py): `python netcheck_worker.py [--timeout-s S] TORCHRUN_ARGS...`.

torchrun's own argument parser and elastic launch (torch.distributed.run) do the rendezvous,
exactly as for the job; the worker is a function started by fork, so it shares the launcher's
imported torch instead of starting a second interpreter that imports it again (seconds a node).
Each process joins the process group, all-reduces one small tensor, checks the sum and prints
what it saw as one JSON line.

Self-contained on purpose (the standard library and torch only, run by path): the interpreter
that runs the job may be the image's, where trainctl itself is not importable.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

MARK = "trainctl-net-check"  # the key that tells the worker's line from anything else torchrun prints
WRONG_SUM = 3  # the exit code when the all-reduce gave a wrong sum


def all_reduce(timeout_s: float) -> int:
    """One process of the check: init, all-reduce ones, compare with the world size, report."""
    import datetime

    import torch
    import torch.distributed as dist

    started = time.monotonic()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # the job's collectives run over NCCL on GPUs: so does the check (CUDA is first touched here,
    # after the fork, never in the launcher)
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # the interface the launcher chose (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME) is read by torch itself
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    joined = time.monotonic()
    value = torch.ones(1, device=device)
    dist.all_reduce(value)
    total = float(value.item())
    done = time.monotonic()
    ifname = os.environ.get("NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME")
    report = {MARK: "ok" if total == world_size else "wrong_sum", "rank": rank, "world_size": world_size,
              "group_rank": int(os.environ.get("GROUP_RANK", "0")), "local_rank": local_rank,
              "host": socket.gethostname(), "backend": backend, "sum": total, "ifname": ifname,
              "master_addr": os.environ.get("MASTER_ADDR"), "init_s": round(joined - started, 3),
              "all_reduce_s": round(done - joined, 3)}
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()
    return 0 if total == world_size else WRONG_SUM


def main(argv: list[str]) -> int:
    timeout_s = 60.0
    if "--timeout-s" in argv:
        at = argv.index("--timeout-s")
        timeout_s = float(argv[at + 1])
        argv = argv[:at] + argv[at + 2:]
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args([*argv, "--start-method=fork", "netcheck"])
    if args.master_port is None:
        args.master_port = 29500  # as torchrun's run() does before config_from_args
    config, _cmd, _cmd_args = config_from_args(args)
    results = elastic_launch(config, entrypoint=all_reduce)(timeout_s)
    return WRONG_SUM if any(code != 0 for code in results.values()) else 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # the rendezvous is shut down and the workers are gone: skipping torch's interpreter teardown
    # (~1 s) frees the job's port sooner
    os._exit(code)
