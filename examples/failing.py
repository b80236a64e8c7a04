"""A training script that fails on purpose, to show what trainctl says when a run dies.

    trainctl local examples/failing.py                       # the loss diverges (Inf) after a checkpoint
    trainctl local examples/failing.py --fail missing-data   # FileNotFoundError for --data
    trainctl local examples/failing.py --fail missing-module # ModuleNotFoundError (with the pip name)
    trainctl local examples/failing.py --fail killed         # SIGKILL, as the kernel's OOM killer does

Each ends with trainctl's diagnosis: what happened, the likely cause, the fix, and the command
that resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal

import torch
from torch import nn

import trainctl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fail", choices=["nan", "missing-data", "missing-module", "killed"], default="nan")
    parser.add_argument("--data", default="data/does-not-exist.csv", help="read with --fail missing-data")
    parser.add_argument("--lr", type=float, default=3.0, help="far too high on purpose: the loss diverges")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    run = trainctl.init(config=vars(args), total_steps=args.steps)
    run.track(model=model, optimizer=optimizer)
    meta = run.restore()
    step = meta["step"] if meta else 0

    if args.fail == "missing-data":
        with open(args.data) as f:  # fails: the default path does not exist
            f.read()
    if args.fail == "missing-module":
        # imported by name so pre-flight does not warn about it on every run of this example;
        # a plain `import cv2` is what the diagnosis maps to `pip install opencv-python`
        importlib.import_module("cv2")

    x = torch.randn(256, 8)
    y = x.sum(dim=1, keepdim=True)
    while step < args.steps:
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        value = loss.item()
        print(f"step {step} loss {value:.4g}", flush=True)
        run.log({"loss": value}, step=step)
        if step == 2:
            run.save_checkpoint(step=step, metrics={"loss": value})
            if args.fail == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}; stopping before it spoils the weights")
    run.finish()


if __name__ == "__main__":
    main()
