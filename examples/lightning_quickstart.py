"""A Lightning script under trainctl: one callback, and `ckpt_path=cb.resume_path()`.

    python examples/lightning_quickstart.py                  # recorded as a session of its own
    trainctl local --max-restarts 3 examples/lightning_quickstart.py

Small regression model on synthetic data, CPU, deterministic: an interrupted and resumed fit
ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainctl.callbacks import TrainctlCallback


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.05, batch_sleep_s: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        if self.hparams.batch_sleep_s:
            time.sleep(self.hparams.batch_sleep_s)  # stands in for a real model's compute time
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.linspace(-1, 1, 8).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-sleep-s", type=float, default=0.0)
    args = parser.parse_args()

    L.seed_everything(0, workers=True)
    model = Regressor(batch_sleep_s=args.batch_sleep_s)
    cb = TrainctlCallback()
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, deterministic=True,
        log_every_n_steps=5, enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[cb, ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=2, save_last=True)],
    )
    train = DataLoader(data(256, seed=1), batch_size=16, shuffle=True)
    val = DataLoader(data(64, seed=2), batch_size=32)
    trainer.fit(model, train, val, ckpt_path=cb.resume_path())
    print(f"done: epoch={trainer.current_epoch} step={trainer.global_step} "
          f"val_loss={trainer.callback_metrics['val_loss'].item():.4f}")


if __name__ == "__main__":
    main()
