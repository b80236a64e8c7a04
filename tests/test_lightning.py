"""The Lightning callback (issue 6): real Trainer on CPU, real launcher, real files."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trainctl import checkpoint
from trainctl.errors import EXIT_PREEMPTED, CheckpointNotFoundError, CorruptCheckpointError
from trainctl.session import Session, SessionStore

from .conftest import EXAMPLES, clean_env, run_cli

pytest.importorskip("lightning")

QUICKSTART = str(EXAMPLES / "lightning_quickstart.py")
STEPS_PER_EPOCH = 16  # 256 samples, batch 16


def sessions(project: Path) -> list[Session]:
    store = SessionStore(project / ".trainctl")
    return [Session(store.sessions_dir / i) for i in store.ids()]


def only_session(project: Path) -> Session:
    found = sessions(project)
    assert len(found) == 1, [s.id for s in found]
    return found[0]


def run_script(project: Path, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, script, *args], cwd=project, capture_output=True, text=True,
                          timeout=timeout, env=clean_env())


def events(session: Session, kind: str) -> list[dict]:
    return list(session.iter_events((kind,)))


def lightning_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), f"{name} differs"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def write_script(project: Path, name: str, body: str) -> str:
    path = project / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# --------------------------------------------------------------------------- imports

def test_importing_callbacks_does_not_import_lightning():
    code = "import sys, trainctl, trainctl.callbacks; print('lightning' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------- plain python

@pytest.mark.slow
def test_plain_python_metrics_checkpoints_info_verify(project):
    """Without the launcher: a session of its own, metrics, registered checkpoints."""
    result = run_script(project, QUICKSTART, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    session = only_session(project)
    data = session.read()
    assert data["status"] == "completed"
    assert data["config"]["hparams"]["lr"] == 0.05
    assert data["config"]["trainer"]["max_epochs"] == 2
    assert data["totals"] == {"steps": 2 * STEPS_PER_EPOCH, "epochs": 2}

    metrics = [e for e in session.metrics() if e.get("source") == "run"]
    step_values = [(e["step"], e["epoch"]) for e in metrics if "train_loss_step" in e["values"]]
    # log_every_n_steps=5: batch-end values at global steps 5, 10, ... only
    assert [s for s, _ in step_values] == [5, 10, 15, 20, 25, 30]
    assert [ep for _, ep in step_values] == [0, 0, 0, 1, 1, 1]
    val = [(e["step"], e["epoch"]) for e in metrics if "val_loss" in e["values"]]
    assert val == [(16, 0), (32, 1)]  # no sanity-check values
    assert [e["step"] for e in metrics if "train_loss_epoch" in e["values"]] == [16, 32]

    ckpt_dir = project / "checkpoints" / session.id
    last = ckpt_dir / "last.ckpt"
    recorded = {e["path"] for e in events(session, "checkpoint")}
    assert str(last) in recorded
    for path in recorded:
        if not Path(path).exists():
            continue  # removed by ModelCheckpoint's save_top_k, manifest with it
        assert checkpoint.verify(path).status == "valid"
    assert not [p for p in ckpt_dir.glob("*.json") if not p.with_suffix("").exists()], "orphan manifests"

    state = lightning_state(last)  # Lightning's own format plus the trainctl entry, weights_only
    meta = state["trainctl"]
    assert meta["session_id"] == session.id and meta["step"] == 32 and meta["epoch"] == 1
    assert meta["monitor"] == [{"metric": "val_loss", "mode": "min"}]
    assert isinstance(meta["rng"]["torch"], torch.Tensor)

    verify = run_cli(["checkpoint", "verify", str(last)], project)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    info = run_cli(["checkpoint", "info", "--json", str(last)], project)
    assert info.returncode == 0, info.stderr
    shown = json.loads(info.stdout)
    assert (shown["epoch"], shown["step"], shown["status"]) == (1, 32, "valid")
    assert shown["metrics"]["val_loss"] == pytest.approx(state["callbacks"][next(
        k for k in state["callbacks"] if k.startswith("ModelCheckpoint"))]["current_score"].item())
    text = run_cli(["checkpoint", "info", str(last)], project).stdout
    assert "epoch:    1" in text and "step:     32" in text and "val_loss=" in text


# --------------------------------------------------------------------------- kill -9 and restarts

def _launch(project: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainctl", "local", "--no-preflight", *args]
    return subprocess.Popen(cmd, cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_script(project: Path, attempt: int, min_checkpoints: int, proc: subprocess.Popen,
                     timeout_s: float = 90) -> tuple[Session, int]:
    """The session and the script's pid once `attempt` runs and has written enough checkpoints."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for session in sessions(project):
            try:
                runtime = session.read().get("runtime") or {}
                n = len(events(session, "checkpoint"))
            except (OSError, ValueError):
                continue
            if runtime.get("attempt") == attempt and runtime.get("pid") and n >= min_checkpoints:
                return session, runtime["pid"]
        time.sleep(0.05)
    out = proc.stdout.read() if proc.poll() is not None else ""
    raise AssertionError(f"attempt {attempt} never reached {min_checkpoints} checkpoints: {out[-3000:]}")


@pytest.mark.slow
def test_kill9_and_restarts_end_like_an_uninterrupted_fit(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    done = run_script(reference, QUICKSTART, "--epochs", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    expected = lightning_state(reference / "checkpoints" / only_session(reference).id / "last.ckpt")

    project = tmp_path / "chaos"
    project.mkdir()
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    proc = _launch(project, "--max-restarts", "3", "--restart-delay", "0", QUICKSTART,
                   "--epochs", "3", "--batch-sleep-s", "0.03")
    try:
        # two epochs' checkpoints (epoch file + last.ckpt each) are on disk before each kill
        for attempt, need in ((0, 2), (1, 4)):
            _, pid = _wait_for_script(project, attempt, need, proc)
            time.sleep(0.15)  # into the next epoch
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    session = only_session(project)
    assert session.read()["status"] == "completed"
    restarts = events(session, "restart")
    assert len(restarts) == 2 and all(r["resume"] for r in restarts)
    assert len(events(session, "supersede")) == 2
    got = lightning_state(project / "checkpoints" / session.id / "last.ckpt")
    assert_same_weights(got, expected)
    # one value per step and metric in the metric log, whatever the kills cut off
    seen = collections.Counter((e["step"], k) for e in session.metrics() if e.get("source") == "run"
                               for k in e["values"])
    assert seen and max(seen.values()) == 1, [k for k, n in seen.items() if n > 1]


@pytest.mark.slow
def test_sigterm_writes_emergency_checkpoint_and_restart_continues(project):
    proc = _launch(project, "--max-restarts", "1", "--restart-delay", "0", QUICKSTART,
                   "--epochs", "3", "--batch-sleep-s", "0.03")
    try:
        _, pid = _wait_for_script(project, 0, 2, proc)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    session = only_session(project)
    data = session.read()
    first = data["attempts"][0]
    assert first["exit_code"] == EXIT_PREEMPTED and first["status"] == "preempted"
    ran = [e for e in events(session, "status") if e.get("source") == "run" and e["attempt"] == 0]
    assert ran[-1]["status"] == "preempted" and ran[-1]["signal"] == "SIGTERM"
    emergency = [e for e in events(session, "checkpoint") if "emergency" in Path(e["path"]).name]
    assert len(emergency) == 1 and emergency[0]["epoch"] == 1
    path = emergency[0]["path"]
    assert checkpoint.verify(path).status == "valid"
    assert events(session, "restart")[0]["resume"] == path
    # same end point; the weights match an uninterrupted fit only when resuming at an epoch
    # boundary (the test above) or with a resumable dataloader: Lightning restarts a plain
    # DataLoader's epoch from its first batch
    last = lightning_state(project / "checkpoints" / session.id / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 3 * STEPS_PER_EPOCH)
    assert data["status"] == "completed"


# --------------------------------------------------------------------------- resume_path

@pytest.mark.parametrize("damage, error, fragment", [
    ("missing", CheckpointNotFoundError, "does not exist"),
    ("truncate", CorruptCheckpointError, "failed verification"),
])
def test_resume_path_refuses_bad_checkpoints(project, monkeypatch, damage, error, fragment):
    from trainctl.callbacks import TrainctlCallback

    good = project / "checkpoints" / "s" / "good.ckpt"
    checkpoint.save(good, {"w": torch.zeros(3)}, {"step": 1})
    bad = project / "checkpoints" / "s" / "bad.ckpt"
    checkpoint.save(bad, {"w": torch.zeros(1000)}, {"step": 2})
    if damage == "missing":
        bad.unlink()
    else:
        with open(bad, "r+b") as f:
            f.truncate(bad.stat().st_size // 2)
    before = sorted(p.name for p in (project / "checkpoints" / "s").iterdir())
    monkeypatch.chdir(project)
    monkeypatch.setenv("TRAIN_OPS_RESUME", str(bad))
    with pytest.raises(error) as info:
        TrainctlCallback().resume_path()
    assert fragment in info.value.message
    if damage == "truncate":
        assert "good.ckpt" in info.value.hint
    assert sorted(p.name for p in (project / "checkpoints" / "s").iterdir()) == before
    assert not (project / ".trainctl").exists()  # asking for the path records nothing


def test_resume_path_none_without_request(project, monkeypatch):
    from trainctl.callbacks import TrainctlCallback

    monkeypatch.chdir(project)
    monkeypatch.delenv("TRAIN_OPS_RESUME", raising=False)
    assert TrainctlCallback().resume_path() is None


# --------------------------------------------------------------------------- DDP and the logger

DDP_SCRIPT = """
    import lightning as L, torch
    from torch.utils.data import DataLoader, TensorDataset
    from lightning.pytorch.callbacks import ModelCheckpoint
    from trainctl.callbacks import TrainctlCallback

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
        def training_step(self, batch, i):
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("train_loss", loss, sync_dist=True)
            return loss
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if __name__ == "__main__":
        L.seed_everything(0)
        data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
        cb = TrainctlCallback()
        trainer = L.Trainer(max_epochs=2, strategy="ddp", accelerator="cpu", devices=2, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2,
                            callbacks=[cb, ModelCheckpoint(save_last=True)])
        trainer.fit(M(), DataLoader(data, batch_size=8), ckpt_path=cb.resume_path())
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_once_from_rank0(project):
    script = write_script(project, "ddp_fit.py", DDP_SCRIPT)
    result = run_script(project, script, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    session = only_session(project)  # rank 1 joined nothing and created nothing
    running = [e for e in events(session, "status") if e.get("source") == "run"]
    assert [e["status"] for e in running] == ["running", "completed"]
    assert session.read()["runtime"]["world_size"] == 2
    ckpts = events(session, "checkpoint")
    assert len(ckpts) == len({(e["path"], e["step"]) for e in ckpts}) == 4  # epoch file + last, twice
    seen = collections.Counter((e["step"], k) for e in session.metrics() for k in e["values"])
    assert seen and max(seen.values()) == 1
    assert checkpoint.verify(project / "checkpoints" / session.id / "last.ckpt").status == "valid"


LOGGER_SCRIPT = """
    import lightning as L, torch
    from torch.utils.data import DataLoader, TensorDataset
    from trainctl.callbacks import TrainctlCallback, TrainctlLogger

    class M(L.LightningModule):
        def __init__(self, lr=0.1):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(4, 1)
        def training_step(self, batch, i):
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    L.seed_everything(0)
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = L.Trainer(max_epochs=2, logger=TrainctlLogger(), callbacks=[TrainctlCallback()],
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        enable_checkpointing=False)
    trainer.fit(M(), DataLoader(data, batch_size=8))
"""


def test_logger_and_callback_together_log_once(project):
    script = write_script(project, "with_logger.py", LOGGER_SCRIPT)
    result = run_script(project, script)
    assert result.returncode == 0, result.stderr[-3000:]
    session = only_session(project)
    metrics = [e for e in session.metrics() if e.get("source") == "run"]
    seen = collections.Counter((e["step"], k) for e in metrics for k in e["values"])
    assert sum(1 for (_, k) in seen if k == "train_loss_step") == 8
    assert sum(1 for (_, k) in seen if k == "train_loss_epoch") == 2
    assert max(seen.values()) == 1
    assert session.read()["config"]["hparams"]["lr"] == 0.1


LAST_CKPT_WRITER = """
import os, sys, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
import trainctl
from trainctl.callbacks.lightning import TrainctlCallback, _RegisteringCheckpointIO
folder, point = sys.argv[1], sys.argv[2]
callback = TrainctlCallback()
callback.run = trainctl.init(tensorboard=False)
io = _RegisteringCheckpointIO(TorchCheckpointIO(), callback)
def save(step):
    io.save_checkpoint({"state_dict": {"w": torch.full((1000,), float(step))}, "global_step": step, "epoch": 0},
                       os.path.join(folder, "last.ckpt"))
save(1)
os.environ["TRAINCTL_CRASH_AT"] = point
save(2)
print("not killed", flush=True)
"""


@pytest.mark.parametrize("point", ["manifest-transition:written", "checkpoint:data-replaced", "checkpoint:dir-synced",
                                   "manifest:written"])
def test_overwriting_last_ckpt_survives_a_kill_at_every_step(project, point):
    """ModelCheckpoint rewrites last.ckpt in place: the manifest was dropped before the swap and
    written after it, so a kill in between left last.ckpt unverified and a restart began at step 0."""
    (project / "writer.py").write_text(LAST_CKPT_WRITER)
    folder = project / "ckpts"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "writer.py", str(folder), point], cwd=project, capture_output=True,
                          text=True, env=clean_env(), timeout=180)
    assert proc.returncode == -signal.SIGKILL, (point, proc.stdout, proc.stderr[-2000:])
    found, skipped = checkpoint.newest_valid(folder)
    assert found == folder / "last.ckpt", (point, skipped)
    info = checkpoint.inspect(found)
    state = torch.load(found, weights_only=True)
    assert info.step in (1, 2) and state["global_step"] == info.step
    assert torch.equal(state["state_dict"]["w"], torch.full((1000,), float(info.step)))
