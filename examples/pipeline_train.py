"""Pretraining and fine-tuning for examples/pipeline.toml: the `plain` template
(trainctl init --template plain) with a --step-delay for demos.

    trainctl pipeline run examples/pipeline.toml

A first run trains from scratch; with --init-from it starts from another run's weights (a fresh
optimizer and schedule). Synthetic data, CPU, a few seconds.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch import nn

import trainctl


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps in all")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50, help="validate and checkpoint every N steps")
    parser.add_argument("--init-from", default=None,
                        help="start from another run's checkpoint (weights only), e.g. a pretraining run's best")
    # trainctl passes the checkpoint to continue from as --resume PATH (trainctl.toml: resume_flag);
    # run.restore() below reads it, so the script never opens it itself
    parser.add_argument("--resume", default=None, help="checkpoint to resume from (set by trainctl)")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step (demos, tests)")
    return parser.parse_args()


def seed_everything(seed: int) -> None:
    """Same seed, same run: Python, torch (CPU and CUDA) and deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train inputs, train targets, validation inputs, validation targets).

    >>> PLUG YOUR DATA IN HERE <<<  This synthetic regression task only makes the script run at
    once; return your own tensors (or build a Dataset and change `batch_for` to index it).
    """
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2048, 16, generator=g)
    targets = (inputs @ torch.randn(16, 1, generator=g)).squeeze(1).sin()
    return inputs[256:], targets[256:], inputs[:256], targets[:256]


def batch_for(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of `step`, drawn from a generator seeded by the step: a resumed run draws
    exactly the batches the interrupted one would have (no data-loader state to save)."""
    return torch.randint(n, (batch_size,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


def main() -> None:
    args = parse_args()
    seed_everything(args.seed)
    train_x, train_y, val_x, val_y = load_data(args.seed)

    model = nn.Sequential(nn.Linear(train_x.shape[1], args.hidden), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(args.hidden, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    # Joins the session `trainctl local` created (or records one of its own under plain python).
    # The config is kept with the session and every checkpoint: `trainctl sessions compare` shows it.
    run = trainctl.init(config=vars(args), total_steps=args.steps)
    # What a checkpoint holds: each object's state_dict(), plus RNG states and metadata.
    run.track(model=model, optimizer=optimizer, scheduler=scheduler)

    step = 0
    meta = run.restore()  # loads the resume checkpoint into the tracked objects; None on a fresh start
    if meta:
        step = meta["step"]
        print(f"resumed from {run.resume_path()} at step {step}")
    elif args.init_from:
        # weights only: a new run (fresh optimizer and schedule) starting from another's model
        state = torch.load(args.init_from, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        print(f"initialised from {args.init_from}")

    while step < args.steps:
        model.train()
        batch = batch_for(step, len(train_x), args.batch_size, args.seed)
        loss = nn.functional.mse_loss(model(train_x[batch]).squeeze(1), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        # Buffered, no disk I/O here. Also a safe point: after SIGTERM (a spot instance's notice,
        # `trainctl sessions stop`) the emergency checkpoint of the tracked state is written here
        # and the script exits 75, which `--max-restarts` continues from.
        run.log({"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=step)
        if args.step_delay:
            time.sleep(args.step_delay)

        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                val_loss = nn.functional.mse_loss(model(val_x).squeeze(1), val_y).item()
            run.log({"val_loss": val_loss}, step=step)
            print(f"step {step}/{args.steps} loss {loss.item():.4f} val_loss {val_loss:.4f}", flush=True)
            # periodic checkpoint: atomic, with a manifest and digest; its metrics let
            # `trainctl checkpoint list` and pipelines pick the best one
            run.save_checkpoint(step=step, metrics={"loss": loss.item(), "val_loss": val_loss})

    run.finish()


if __name__ == "__main__":
    main()
