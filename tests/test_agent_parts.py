"""The agent's parts on their own: the environment on the image's torch, the preemption watch
against a fake IMDSv2, leases, the sync loop over a folder store, secrets, end hooks, deadlines."""

from __future__ import annotations

import os
import queue
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from trainctl import checkpoint
from trainctl.agent.agent import parse_deadline
from trainctl.agent.ending import CommandEnd, EndFailedError, NoEnd, open_end_hook
from trainctl.agent.environment import (
    constraints_text,
    find_interpreter,
    make_overlay_venv,
    parse_requirement,
    read_requirements,
    torch_replacements,
)
from trainctl.agent.lease import Lease, LeaseLostError
from trainctl.agent.preemption import INTERRUPTION, REBALANCE, ImdsWatch, SignalWatch
from trainctl.agent.secrets import (
    EnvSecretStore,
    FolderSecretStore,
    SecretNotFoundError,
    open_secret_store,
    resolve_secrets,
)
from trainctl.agent.sync import SyncLoop
from trainctl.errors import UsageError
from trainctl.session import SessionStore
from trainctl.storage import LocalStore
from trainctl.storage.remote import RemoteSession

# --- the environment ------------------------------------------------------------------------------

IMAGE = {"torch": "2.7.1+cu128", "torchvision": "0.22.1+cu128", "triton": "3.3.1", "nvidia-cudnn-cu12": "9.5.1.17"}


@pytest.mark.parametrize("line, replaces", [
    ("torch", False),                      # no version: the image's stands
    ("torch>=2.4", False),
    ("torch==2.7.1", False),               # a local label (+cu128) still satisfies ==2.7.1
    ("torch~=2.7", False),
    ("torch==2.4.0", True),
    ("torch<2.5", True),
    ("torchvision==0.19.0", True),
    ("triton>=3.4", True),
    ("nvidia-cudnn-cu12==9.1.0.70", True),
    ("Torch_Vision>=0.20 ; python_version>'3.8'", False),
    ("torchaudio==2.4.0", False),          # not in the image: pip fits it to the pinned torch
    ("numpy==1.26.4", False),
])
def test_which_requirements_would_replace_the_image_torch(line, replaces):
    found = torch_replacements([parse_requirement(line, "requirements.txt:1")], IMAGE)
    assert bool(found) is replaces
    if replaces:
        assert found[0].message.startswith("requirements.txt:1: ") and "would replace the image's" in found[0].message


def test_the_plan_names_every_torch_pin_when_the_image_is_unknown():
    reqs = [parse_requirement(t, f"requirements.txt:{i}") for i, t in enumerate(["torch==2.4.0", "numpy", "torch"], 1)]
    [found] = torch_replacements(reqs, None)
    assert found.satisfied is None and "the image's version must satisfy '==2.4.0'" in found.message


def test_constraints_pin_the_torch_family_only():
    text = constraints_text({**IMAGE})
    assert text.splitlines()[1:] == ["nvidia-cudnn-cu12==9.5.1.17", "torch==2.7.1+cu128",
                                     "torchvision==0.22.1+cu128", "triton==3.3.1"]
    assert "torch==" not in constraints_text(IMAGE, allow=["torch"]).replace("torchvision==", "")


def test_requirements_follow_includes_and_fall_back_to_pyproject(tmp_path):
    (tmp_path / "base.txt").write_text("numpy>=1.24  # arrays\n")
    (tmp_path / "requirements.txt").write_text("# deps\n-r base.txt\n--extra-index-url https://x\ntorch==2.4.0\n"
                                               "git+https://github.com/a/b\n")
    args, reqs = read_requirements(tmp_path)
    assert args == ["-r", str(tmp_path / "requirements.txt")]
    assert [(r.source, r.name, r.specifier) for r in reqs] == [("base.txt:1", "numpy", ">=1.24"),
                                                                ("requirements.txt:4", "torch", "==2.4.0")]
    other = tmp_path / "py"
    other.mkdir()
    (other / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["trainctl", "einops>=0.7"]\n')
    args, reqs = read_requirements(other)
    assert args == ["einops>=0.7"] and [r.name for r in reqs] == ["einops"]


def test_find_interpreter_picks_the_first_python_that_imports_torch(tmp_path):
    bare = tmp_path / "bare"
    bare.write_text("#!/bin/sh\nexit 0\n")
    bare.chmod(0o755)
    found = find_interpreter(candidates=[str(tmp_path / "missing"), str(bare), sys.executable])
    assert found.path == sys.executable and found.torch == torch.__version__
    assert found.pinned()["torch"] == torch.__version__
    with pytest.raises(UsageError, match=r"cannot import torch|does not run"):
        find_interpreter(str(bare))
    with pytest.raises(UsageError, match="No Python with torch"):
        find_interpreter(candidates=[str(bare)])


def test_overlay_venv_sees_the_image_torch_where_system_site_packages_would_not(tmp_path):
    image = find_interpreter(sys.executable)
    python = make_overlay_venv(image, tmp_path / "venv")
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    seen = subprocess.run([python, "-c", "import sys, torch; print(torch.__version__, sys.prefix)"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.split() == [torch.__version__, str(tmp_path / "venv")]


# --- preemption notices -----------------------------------------------------------------------------

def test_imds_watch_turns_each_notice_into_one_event(imds):
    watch = ImdsWatch(imds.endpoint, interval_s=0.05)
    assert watch.poll() == []
    notice = imds.set_spot_action("terminate", in_s=120)
    [found] = watch.poll()
    assert (found.kind, found.action, found.source) == (INTERRUPTION, "terminate", "aws-imds")
    assert found.deadline_t == time.mktime(time.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert watch.poll() == []  # the same notice once
    imds.set_rebalance()
    assert [(n.kind, n.deadline_t) for n in watch.poll()] == [(REBALANCE, None)]
    imds.tokens.clear()  # tokens lost (a restarted IMDS): the watch takes a new one
    imds.set_spot_action("stop", in_s=60)
    assert [n.action for n in watch.poll()] == ["stop"]
    assert [m for m, path, _ in imds.log if path == "/latest/api/token"] == ["PUT", "PUT"]


def test_imds_watch_keeps_polling_through_errors(imds):
    watch = ImdsWatch("http://127.0.0.1:9", interval_s=0.01, timeout_s=0.2)  # nothing listens there
    notices: queue.SimpleQueue = queue.SimpleQueue()
    watch.start(notices)
    try:
        deadline = time.monotonic() + 30
        while watch.errors < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watch.errors >= 3 and notices.empty()
        watch.endpoint = imds.endpoint
        imds.set_spot_action()
        assert notices.get(timeout=30).kind == INTERRUPTION
    finally:
        watch.stop()


def test_signal_watch_makes_sigterm_a_notice_with_its_grace():
    watch = SignalWatch(grace_s=5.0, signals=(signal.SIGUSR1,))
    notices: queue.SimpleQueue = queue.SimpleQueue()
    watch.start(notices)
    try:
        before = time.time()
        os.kill(os.getpid(), signal.SIGUSR1)
        found = notices.get(timeout=10)
    finally:
        watch.stop()
    assert (found.kind, found.action) == (INTERRUPTION, "SIGUSR1")
    assert before + 5.0 <= found.deadline_t <= time.time() + 5.0


# --- leases ------------------------------------------------------------------------------------------

def test_one_lease_holder_at_a_time_and_a_clean_handover(tmp_path):
    remote = RemoteSession(LocalStore(tmp_path / "store"))
    first = Lease(remote, ttl_s=60, machine="a")
    assert first.acquire() == 0
    first.beat(step=1)
    with pytest.raises(LeaseLostError, match="written by another machine"):
        Lease(remote, ttl_s=60, machine="b").acquire(wait_s=0)
    first.release(step=2)
    second = Lease(remote, ttl_s=60, machine="b")
    assert second.acquire() == 1
    assert not first.check() and first.lost and second.check()


def test_a_silent_holder_is_taken_over_after_the_ttl(tmp_path):
    remote = RemoteSession(LocalStore(tmp_path / "store"))
    now = [1000.0]
    Lease(remote, ttl_s=30, clock=lambda: now[0], machine="gone").acquire()
    remote.heartbeat(attempt=0, term=0)  # written at the real time: far in the "past" below
    now[0] = time.time() + 31
    assert Lease(remote, ttl_s=30, clock=lambda: now[0], machine="next").acquire() == 1


def test_racing_newcomers_get_one_lease(tmp_path):
    remote = RemoteSession(LocalStore(tmp_path / "store"))
    won, lost = [], []

    def race(i: int) -> None:
        try:
            won.append(Lease(remote, ttl_s=60, machine=i).acquire(wait_s=0))
        except LeaseLostError:
            lost.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won == [0] and len(lost) == 5


# --- the sync loop ----------------------------------------------------------------------------------

def _session_with_checkpoints(tmp_path: Path, steps: list[int]):
    session = SessionStore(tmp_path / "state").create(status="running")
    paths = []
    for step in steps:
        path = tmp_path / "ckpts" / f"ckpt-step{step:08d}.pt"
        manifest = checkpoint.save(path, {"w": torch.full((4,), float(step))},
                                   {"step": step, "epoch": 1, "metrics": {"loss": 1.0 / step}})
        session.event("checkpoint", path=str(path), step=step, bytes=manifest["bytes"], digest=manifest["digest"])
        paths.append(path)
    return session, paths


def test_sync_uploads_the_newest_verified_checkpoint_and_keeps_retention_off_latest(tmp_path):
    session, _ = _session_with_checkpoints(tmp_path, [10, 20, 30])
    remote = RemoteSession(LocalStore(tmp_path / "bucket"))
    loop = SyncLoop(remote, interval_s=0.05, retention={"keep_last_n": 1, "keep_best_k": 0, "metric": "val_loss",
                                                        "mode": "min", "max_total_bytes": 0})
    loop.attach(session.dir)
    loop.sync_logs()
    assert loop.upload_pending()
    assert [name for name, _ in loop.skipped] == ["ckpt-step00000010.pt", "ckpt-step00000020.pt"]  # superseded
    assert remote.latest_checkpoint()["file"] == "ckpt-step00000030.pt"
    # a newer one arrives; retention keeps one in the bucket, never the one latest.json names
    path = tmp_path / "ckpts" / "ckpt-step00000040.pt"
    manifest = checkpoint.save(path, {"w": torch.zeros(4)}, {"step": 40, "epoch": 2, "metrics": {"loss": 9.0}})
    session.event("checkpoint", path=str(path), step=40, bytes=manifest["bytes"], digest=manifest["digest"])
    loop.sync_logs()
    loop.upload_pending()
    assert [m["file"] for m in remote.checkpoints()] == ["ckpt-step00000040.pt"]
    loop.close()
    remote_events = b"".join(remote.store.get_bytes(o.key)[0] for o in remote.store.list("events/"))
    assert remote_events == session.events_path.read_bytes()


def test_sync_never_uploads_a_checkpoint_that_fails_verification(tmp_path):
    session, [path] = _session_with_checkpoints(tmp_path, [5])
    with open(path, "r+b") as f:  # damage it after its manifest was written
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff" * 64)
    remote = RemoteSession(LocalStore(tmp_path / "bucket"))
    loop = SyncLoop(remote)
    loop.attach(session.dir)
    loop.close()
    assert remote.latest_checkpoint() is None and remote.checkpoints() == []
    assert "failed verification" in loop.skipped[0][1]
    assert any("failed verification" in (e.get("message") or "") for e in remote.read_events())


def test_before_a_deadline_a_checkpoint_goes_up_only_if_it_fits(tmp_path):
    session, _ = _session_with_checkpoints(tmp_path, [7])
    remote = RemoteSession(LocalStore(tmp_path / "bucket"))
    loop = SyncLoop(remote)
    loop.attach(session.dir)
    loop.bandwidth_bps = 10.0  # ten bytes a second: nothing fits in what is left
    loop.set_deadline(time.time() + 60)
    loop.sync_logs()
    loop.upload_pending()
    assert remote.latest_checkpoint() is None
    assert "needs" in loop.skipped[0][1] and "before the machine goes" in loop.skipped[0][1]


# --- secrets, end hooks, deadlines -----------------------------------------------------------------

def test_folder_secret_store_keeps_values_private(tmp_path):
    store = FolderSecretStore(tmp_path / "secrets")
    store.put("HF_TOKEN", "hf_abc")
    store.put("WANDB_API_KEY", "w")
    assert store.names() == ["HF_TOKEN", "WANDB_API_KEY"]
    assert stat.S_IMODE((tmp_path / "secrets" / "HF_TOKEN").stat().st_mode) == 0o600
    assert resolve_secrets(store, ["HF_TOKEN"]) == {"HF_TOKEN": "hf_abc"}
    with pytest.raises(SecretNotFoundError, match="Secret NOPE, ALSO is not in folder"):
        resolve_secrets(store, ["NOPE", "HF_TOKEN", "ALSO"])
    store.delete("HF_TOKEN")
    store.delete("HF_TOKEN")
    assert store.names() == ["WANDB_API_KEY"]
    env = EnvSecretStore("RUNPOD_SECRET_", {"RUNPOD_SECRET_HF_TOKEN": "x", "OTHER": "y"})
    assert env.get("HF_TOKEN") == "x" and env.get("OTHER") == "y" and env.names() == ["HF_TOKEN"]


def test_ssm_secret_store_reads_what_the_launcher_put(moto_server, monkeypatch):
    """`ssm:PATH` (the boot script's TRAINCTL_SSM_PATH) reads SecureStrings decrypted; the
    endpoint is botocore's own (AWS_ENDPOINT_URL here), the region the boot script's."""
    from trainctl.cloud.aws.secrets import put_secrets

    put_secrets(moto_server.context(), "parts", {"HF_TOKEN": "hf_ssm", "WANDB_API_KEY": "w"})
    monkeypatch.delenv("TRAINCTL_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    monkeypatch.setenv("TRAINCTL_REGION", "us-east-1")
    store = open_secret_store("ssm:/trainctl/parts/")
    assert store.name == "ssm" and store.names() == ["HF_TOKEN", "WANDB_API_KEY"]
    assert resolve_secrets(store, ["HF_TOKEN", "WANDB_API_KEY"]) == {"HF_TOKEN": "hf_ssm", "WANDB_API_KEY": "w"}
    with pytest.raises(SecretNotFoundError, match="Secret NOPE is not in ssm"):
        resolve_secrets(store, ["HF_TOKEN", "NOPE"])


@pytest.mark.parametrize("spec, message", [
    ("vault:/x", "Unknown secret store 'vault'"),
    ("folder:", "needs a folder"),
    ("ssm:trainctl/x", "needs a parameter path"),
])
def test_bad_secret_store_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        open_secret_store(spec)


@pytest.mark.parametrize("name", ["1ABC", "A-B", "TRAIN_OPS_SESSION_ID", ""])
def test_bad_secret_names(tmp_path, name):
    with pytest.raises(UsageError):
        FolderSecretStore(tmp_path).put(name, "v")


@pytest.mark.parametrize("spec, command, message", [
    ("gcp", None, "Unknown end hook 'gcp'"),
    ("command", None, "needs a command"),
    ("none", "echo x", "only for the command hook"),
    ("no.such.module:End", None, "cannot be imported"),
    ("trainctl.agent.lease:Lease", None, "is not a MachineEnd"),
])
def test_bad_end_hooks(spec, command, message):
    with pytest.raises(UsageError, match=message):
        open_end_hook(spec, command=command)


def test_command_end_hook_passes_the_reason_and_retries(tmp_path):
    record = tmp_path / "ended"
    hook = open_end_hook("command", command=f"printf '%s' \"$TRAINCTL_END_REASON\" > {record}")
    hook.end_machine("training completed")
    assert record.read_text() == "training completed"
    assert isinstance(open_end_hook("none"), NoEnd)
    failing = CommandEnd(f"echo no >> {tmp_path / 'tries'}; exit 4", retry_delay_s=0)
    with pytest.raises(EndFailedError, match="failed 3 times \\(exit code 4"):
        failing.end_machine("x")
    assert (tmp_path / "tries").read_text().count("no") == 3


@pytest.mark.parametrize("text, expected", [
    ("2026-05-01T12:00:00Z", 1777636800.0),
    ("2026-05-01T14:00:00+02:00", 1777636800.0),
    ("1777636800", 1777636800.0),
    ("", None),
])
def test_deadlines_are_absolute(text, expected):
    assert parse_deadline(text) == expected


@pytest.mark.parametrize("text", ["2026-05-01T12:00:00", "tomorrow", "12:00"])
def test_a_deadline_without_a_zone_is_refused(text):
    with pytest.raises(UsageError, match="not an absolute UTC time"):
        parse_deadline(text)
