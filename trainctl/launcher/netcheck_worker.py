"""The network check's worker: started by torchrun on every node of a multi-node job before the
script runs (launcher/netcheck.py), it joins the process group, all-reduces one small tensor,
checks the sum and prints what this rank saw as one JSON line.

Self-contained on purpose (the standard library and torch only, run by path): the interpreter
that runs the job may be the image's, where trainctl itself is not importable.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

MARK = "trainctl-net-check"  # the key that tells this worker's line from anything else torchrun prints


def main(argv: list[str]) -> int:
    timeout_s = float(argv[argv.index("--timeout-s") + 1]) if "--timeout-s" in argv else 60.0
    started = time.monotonic()
    import datetime

    import torch
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
              "all_reduce_s": round(done - joined, 3), "elapsed_s": round(done - started, 3)}
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()
    return 0 if total == world_size else 3


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # torch's interpreter teardown costs ~1 s here: nothing is left to clean up

