"""Quickstart: a plain PyTorch script under trainctl.

    trainctl local examples/quickstart.py --epochs 3

Synthetic data, seeded and deterministic: each step draws its batch from a generator seeded by
the step number, so a run resumed from any checkpoint continues exactly as if it had never
stopped (the checkpoint carries model, optimizer and RNG state).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import trainctl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="also checkpoint every N steps (0: once per epoch)")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step (demos)")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    data_gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(4096, 32, generator=data_gen)
    targets = (inputs @ torch.randn(32, 1, generator=data_gen)).squeeze(1).sin()
    val_x, val_y = inputs[:512], targets[:512]

    model = nn.Sequential(nn.Linear(32, args.hidden), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(args.hidden, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    total_steps = args.epochs * args.steps_per_epoch

    run = trainctl.init(config=vars(args), total_steps=total_steps, total_epochs=args.epochs)
    run.track(model=model, optimizer=optimizer)
    step = 0
    meta = run.restore()  # None on a fresh start
    if meta:
        step = meta["step"]
        print(f"resumed from {run.resume_path()} at epoch {meta['epoch']}, step {step}")

    while step < total_steps:
        epoch = step // args.steps_per_epoch + 1  # counted from 1, as printed
        model.train()
        batch = torch.randint(len(inputs), (args.batch_size,),
                              generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step))
        loss = nn.functional.mse_loss(model(inputs[batch]).squeeze(1), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        run.log({"loss": loss.item()}, step=step, epoch=epoch)
        if args.step_delay:
            import time

            time.sleep(args.step_delay)
        end_of_epoch = step % args.steps_per_epoch == 0
        if end_of_epoch or (args.checkpoint_every and step % args.checkpoint_every == 0):
            model.eval()
            with torch.no_grad():
                val_loss = nn.functional.mse_loss(model(val_x).squeeze(1), val_y).item()
            run.log({"val_loss": val_loss}, step=step, epoch=epoch)
            if end_of_epoch:
                print(f"epoch {epoch}/{args.epochs} step {step}/{total_steps} "
                      f"loss {loss.item():.4f} val_loss {val_loss:.4f}")
            run.save_checkpoint(epoch=epoch, step=step, metrics={"loss": loss.item(), "val_loss": val_loss})
    run.finish()


if __name__ == "__main__":
    main()
