"""A tiny DDP script (gloo, CPU) for the torchrun tests: every rank trains, rank 0 writes."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import trainctl

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--checkpoint-every", type=int, default=5)
parser.add_argument("--resume", default=None)
parser.add_argument("--step-delay", type=float, default=0.0)
args = parser.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
run = trainctl.init(config=vars(args), total_steps=args.steps)
run.track(model=model.module, optimizer=opt)
meta = run.restore()
start = meta["step"] if meta else 0
with open(f"rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "start": start, "is_main": run.is_main,
               "session": os.environ.get("TRAIN_OPS_SESSION_ID")}, f)
Path(f"pid{rank}").write_text(str(os.getpid()))
for step in range(start + 1, args.steps + 1):
    # ranks agree on a preemption before the step's collectives, so all stop on the same step
    flag = torch.tensor([1.0 if run.should_stop else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        run.request_stop()
        run.checkpoint_if_requested()
    g = torch.Generator().manual_seed(step * 10 + rank)
    x = torch.randn(16, 8, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    run.log({"loss": loss.item()}, step=step)
    if step % args.checkpoint_every == 0:
        run.save_checkpoint(step=step, metrics={"loss": loss.item()})
    dist.barrier()
    if args.step_delay:
        import time

        time.sleep(args.step_delay)
run.finish()
# every rank leaves the group together: gloo aborted a rank ("terminate called without an active
# exception") whose peer was still finishing when it tore its group down
dist.barrier()
dist.destroy_process_group()
