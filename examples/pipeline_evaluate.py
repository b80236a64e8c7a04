"""Evaluation for examples/pipeline.toml: the validation loss of a checkpoint written by
examples/pipeline_train.py, recorded as this session's metric.

    python examples/pipeline_evaluate.py --checkpoint checkpoints/<session>/ckpt-step00000040.pt
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import trainctl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run = trainctl.init(config=vars(args))
    g = torch.Generator().manual_seed(args.seed)  # the validation split pipeline_train.py holds out
    inputs = torch.randn(2048, 16, generator=g)
    targets = (inputs @ torch.randn(16, 1, generator=g)).squeeze(1).sin()
    val_x, val_y = inputs[:256], targets[:256]
    model = nn.Sequential(nn.Linear(16, args.hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(args.hidden, 1))
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        val_loss = nn.functional.mse_loss(model(val_x).squeeze(1), val_y).item()
    run.log({"val_loss": val_loss}, step=0)
    print(f"evaluated {args.checkpoint}: val_loss {val_loss:.4f}")
    run.finish()


if __name__ == "__main__":
    main()
