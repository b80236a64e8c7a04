"""`checkpoint info` counts a model's parameters from its state dict, and shows optimizer state and
other tensors apart (issue 12 #7: nn.Linear(10, 1) was reported with 6340 parameters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainctl import checkpoint as ckpt

from .conftest import run_cli


def stepped(model: torch.nn.Module) -> torch.optim.Optimizer:
    """An Adam optimizer after one step: it holds two moments and a step count per parameter."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, next(model.parameters()).shape[-1])).sum().backward()
    opt.step()
    return opt


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def info_json(project: Path, path: Path) -> dict:
    r = run_cli(["checkpoint", "info", "--json", str(path)], project)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["summary"]


def test_a_trainctl_checkpoint_counts_the_model_not_the_optimizer_or_rng(project):
    model = torch.nn.Linear(10, 1)
    opt = stepped(model)
    path = project / "checkpoints" / "run.pt"
    ckpt.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict()},
              {"step": 1, "rng": ckpt.capture_rng()})
    summary = info_json(project, path)
    assert summary["parameters"] == 11
    assert summary["parameters_in"] == ["model"]
    assert (summary["optimizer_tensors"], summary["optimizer_elements"]) == (6, 2 * 11 + 2)
    assert summary["other_tensors"] >= 1  # the RNG states
    assert summary["tensors"] == 2 + 6 + summary["other_tensors"]
    r = run_cli(["checkpoint", "info", str(path)], project)
    assert "parameters: 11" in r.stdout and 'parameters_in: ["model"]' in r.stdout


def test_a_bare_state_dict_counts_its_top_level(project):
    model = torch.nn.Linear(10, 1)
    path = project / "weights.pth"
    torch.save(model.state_dict(), path)
    summary = info_json(project, path)
    assert (summary["parameters"], summary["parameters_in"]) == (11, ["top-level"])
    assert summary["optimizer_tensors"] == 0 and summary["other_tensors"] == 0


def test_buffers_are_not_parameters_and_tied_weights_count_once(project):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied
    path = project / "tied.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    summary = info_json(project, path)
    assert summary["parameters"] == n_params(model)  # model.parameters() yields a tied one once
    assert summary["buffers"] == 4 + 4 + 1  # running_mean, running_var, num_batches_tracked


def test_a_nanogpt_style_dict(project):
    model = torch.nn.Sequential(torch.nn.Embedding(65, 16), torch.nn.Linear(16, 65, bias=False))
    path = project / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                "iter_num": 100, "best_val_loss": torch.tensor(1.5), "model_args": {"n_embd": 16}}, path)
    summary = info_json(project, path)
    assert (summary["parameters"], summary["parameters_in"]) == (n_params(model), ["model"])
    assert summary["other_tensors"] == 1  # best_val_loss


@pytest.fixture(scope="module")
def lightning_checkpoint(tmp_path_factory) -> tuple[Path, int]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

        def training_step(self, batch, _idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    folder = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 8), torch.randn(16, 1))
    model = Net()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=folder, filename="last")])
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return folder / "last.ckpt", n_params(model)


def test_a_lightning_checkpoint_counts_its_state_dict(project, lightning_checkpoint):
    path, expected = lightning_checkpoint
    summary = info_json(project, path)
    assert expected == 8 * 32 + 32 + 32 + 1
    assert (summary["parameters"], summary["parameters_in"]) == (expected, ["state_dict"])
    # Adam's two moments and step for each of the 4 parameter tensors, from optimizer_states
    assert (summary["optimizer_tensors"], summary["optimizer_elements"]) == (12, 2 * expected + 4)
