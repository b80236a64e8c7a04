"""Reading foreign checkpoints' metadata without loading tensors or running their code."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from trainctl import checkpoint as ckpt
from trainctl import checkpoint_reader as reader
from trainctl.errors import CorruptCheckpointError, UntrustedCheckpointError

from .conftest import clean_env, run_cli


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_files(folder: Path, marker: Path) -> list[Path]:
    zipped = folder / "evil.pt"
    torch.save({"epoch": 1, "model": {"w": torch.zeros(2)}, "x": Payload(marker)}, zipped)
    legacy = folder / "evil_legacy.pt"
    torch.save({"x": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    raw = folder / "evil_raw.ckpt"
    raw.write_bytes(pickle.dumps({"x": Payload(marker)}))
    # a trainctl-looking checkpoint with a manifest that hides a payload
    disguised = folder / "disguised.pt"
    torch.save({"x": Payload(marker), "trainctl": {"format_version": 1, "step": 5}}, disguised)
    return [zipped, legacy, raw, disguised]


def test_malicious_pickle_never_runs_through_api_or_cli(tmp_path):
    project = tmp_path
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    folder = project / "checkpoints"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    files = malicious_files(folder, marker)

    for path in files:
        ckpt.inspect(path, contents=True)
        ckpt.verify(path)
        with pytest.raises((UntrustedCheckpointError, CorruptCheckpointError)):
            ckpt.load(path)
    ckpt.scan(folder)
    ckpt.newest_valid(folder)
    for args in (["checkpoint", "list"], ["checkpoint", "list", "--json"], ["checkpoint", "verify"],
                 ["checkpoint", "cleanup", "--keep-last-n", "1", "--yes"],
                 *[["checkpoint", "info", str(p)] for p in files],
                 *[["checkpoint", "info", "--json", str(p)] for p in files]):
        r = run_cli(args, project, env=clean_env())
        assert "Traceback" not in r.stderr, (args, r.stderr)
    assert not marker.exists()

    info = ckpt.inspect(files[0])
    system = f"{os.system.__module__}.system"
    assert info.kind == "dict" and info.summary["untrusted_globals"] == [system]
    with pytest.raises(UntrustedCheckpointError, match=system):
        ckpt.load(files[0])


def test_state_dict_summary_counts_without_reading_tensors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5)).to(torch.float16)
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    info = ckpt.inspect(path)
    assert (info.kind, info.status) == ("state_dict", "foreign")
    assert info.summary["tensors"] == 4
    assert info.summary["parameters"] == 10 * 20 + 20 + 20 * 5 + 5
    assert info.summary["dtypes"] == {"float16": 4}
    assert info.summary["tensor_bytes"] == 2 * (10 * 20 + 20 + 20 * 5 + 5)


def test_legacy_torch_file(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"epoch": 4, "step": 40, "state_dict": {"w": torch.zeros(3, 3, dtype=torch.float64)}},
               path, _use_new_zipfile_serialization=False)
    info = ckpt.inspect(path)
    assert (info.kind, info.epoch, info.step) == ("dict", 4, 40)
    assert info.summary["torch_format"] == "legacy"
    assert info.summary["tensors"] == 1 and info.summary["tensor_bytes"] == 72


def test_nanogpt_style_dict(tmp_path):
    model_args = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 32, "bias": False, "vocab_size": 65}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"wte.weight": torch.zeros(65, 16)}, "optimizer": {"state": {}, "param_groups": []},
                "model_args": model_args, "iter_num": 2000, "best_val_loss": torch.tensor(1.4697),
                "config": {"learning_rate": 1e-3, "dataset": "shakespeare_char"}}, path)
    info = ckpt.inspect(path)
    assert (info.kind, info.status, info.step) == ("dict", "foreign", 2000)
    assert info.metrics["best_val_loss"] == pytest.approx(1.4697, rel=1e-4)
    assert info.summary["model_args"] == model_args
    assert info.summary["config"]["dataset"] == "shakespeare_char"
    assert info.summary["style"] == "nanogpt"
    assert info.summary["parameters"] == 65 * 16 and info.summary["other_tensors"] == 1  # best_val_loss


def test_plain_dict_with_namespace_args(tmp_path):
    path = tmp_path / "model_best.pth.tar"
    args = argparse.Namespace(lr=0.1, arch="resnet18", epochs=90)
    torch.save({"epoch": 12, "arch": "resnet18", "state_dict": {"fc.weight": torch.zeros(4, 4)},
                "best_acc1": 71.5, "args": args}, path.with_suffix(".tar"))
    info = ckpt.inspect(path.with_suffix(".tar"))
    assert (info.kind, info.epoch) == ("dict", 12)
    assert info.metrics == {"best_acc1": 71.5}
    assert info.summary["args"] == {"lr": 0.1, "arch": "resnet18", "epochs": 90}
    assert info.summary["untrusted_globals"] == ["argparse.Namespace"]


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict) -> None:
    header: dict = {"__metadata__": metadata}
    body = b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_safetensors_header(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": ("F32", [2, 3], b"\0" * 24), "b": ("BF16", [3], b"\0" * 6)}, {"format": "pt"})
    info = ckpt.inspect(path)
    assert (info.kind, info.status) == ("safetensors", "foreign")
    assert info.summary["tensors"] == 2 and info.summary["parameters"] == 9
    assert info.summary["dtypes"] == {"float32": 1, "bfloat16": 1}
    assert info.meta == {"format": "pt"}
    path.write_bytes(path.read_bytes()[:-10])
    truncated = ckpt.inspect(path)
    assert truncated.status == "corrupt" and "truncated" in truncated.error


def test_huggingface_trainer_folder(tmp_path):
    folder = tmp_path / "out" / "checkpoint-500"
    folder.mkdir(parents=True)
    state = {"global_step": 500, "epoch": 1.5, "best_metric": 0.42,
             "best_model_checkpoint": "out/checkpoint-500",
             "log_history": [{"loss": 0.9, "step": 100, "epoch": 0.3},
                             {"eval_loss": 0.5, "eval_accuracy": 0.8, "step": 250, "epoch": 0.75},
                             {"loss": 0.4, "step": 500, "epoch": 1.5}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    write_safetensors(folder / "model.safetensors", {"w": ("F32", [4], b"\0" * 16)}, {})
    (folder / "optimizer.pt").write_bytes(b"x" * 10)
    [info] = ckpt.scan(tmp_path)
    assert info.path == folder
    assert (info.kind, info.status, info.step, info.epoch) == ("huggingface", "foreign", 500, 1.5)
    assert info.metrics["best_metric"] == 0.42 and info.metrics["loss"] == 0.4
    assert info.metrics["eval_accuracy"] == 0.8
    assert info.summary["tensors"] == 1 and info.summary["log_history_tail"][-1]["step"] == 500
    assert ckpt.verify(folder).ok


def test_lightning_checkpoint_from_a_real_trainer(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self, lr: float = 0.05, hidden: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, _idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="train_loss", mode="min", save_top_k=1,
                               filename="best")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(Tiny(), loader)

    info = ckpt.inspect(tmp_path / "best.ckpt")
    assert (info.kind, info.status) == ("lightning", "foreign")
    assert (info.epoch, info.step) == (1, 4)
    assert info.summary["lightning_version"] == L.__version__
    assert info.summary["hyper_parameters"] == {"lr": 0.05, "hidden": 3}
    [mc] = info.summary["model_checkpoints"]
    assert mc["monitor"] == "train_loss" and mc["mode"] == "min"
    assert mc["best_model_score"] == pytest.approx(float(callback.best_model_score), rel=1e-5)
    assert info.metrics == {"best_train_loss": mc["best_model_score"]}
    assert info.summary["tensors"] >= 2


def test_unreadable_files_say_what_they_are(tmp_path):
    cases = {
        "empty.pt": (b"", "empty"),
        "text.pt": (b"hello, this is a README\n", "text file"),
        "random.pt": (bytes(range(256)) * 4, "not a checkpoint"),
        "truncated.pt": (None, "truncated"),
        "photo.pt": (None, "without data.pkl"),
    }
    buf = tmp_path / "full.pt"
    torch.save({"w": torch.zeros(1000)}, buf)
    data = buf.read_bytes()
    buf.unlink()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    import zipfile

    with zipfile.ZipFile(tmp_path / "photo.pt", "w") as z:
        z.writestr("image.png", b"\x89PNG")
    for name, (content, fragment) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        info = ckpt.inspect(tmp_path / name)
        assert info.status == "corrupt", name
        assert fragment in info.error, (name, info.error)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert ckpt.inspect(tmp_path / "list.pt").status == "corrupt"


def test_unpickler_turns_every_unknown_global_into_an_inert_placeholder():
    import io

    data = pickle.dumps({"cmd": Payload(Path("/nonexistent/never"))}, protocol=2)
    obj, unpickler = reader._safe_load_pickle(io.BytesIO(data))
    assert isinstance(obj["cmd"], reader.Opaque)
    assert obj["cmd"].args[0] == "touch /nonexistent/never"
    assert unpickler.refused == {f"{os.system.__module__}.system"}


def test_bytes_with_a_brace_at_offset_8_are_not_taken_for_safetensors(tmp_path):
    # random bytes hit this one time in 256: the first 8 bytes then give a header length no file holds
    path = tmp_path / "random.pt"
    path.write_bytes(b"\x00\x11\x22\x33\x44\x55\x66\x77{" + bytes(range(256)) * 8)
    assert reader.sniff(path) == "binary"
    info = ckpt.inspect(path)
    assert info.status == "corrupt" and "not a checkpoint" in info.error
    real = tmp_path / "weights.bin"
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    real.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    assert reader.sniff(real) == "safetensors"
