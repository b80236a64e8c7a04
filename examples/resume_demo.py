"""Show that an interrupted run ends bit-identical to an uninterrupted one.

Trains examples/quickstart.py twice under `trainctl local`: once straight through, once with
the training process SIGKILLed twice and SIGTERMed once while `--max-restarts` brings it back
from its newest valid checkpoint. Then compares the final model and optimizer tensors.

    make demo-resume
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ARGS = ["--epochs", "3", "--steps-per-epoch", "50", "--checkpoint-every", "10"]
TOTAL = 150


def newest_session(project: Path) -> Path:
    sessions = sorted((project / ".trainctl" / "sessions").iterdir())
    return sessions[-1]


def script_pid(session_dir: Path, attempt: int) -> int | None:
    import json

    try:
        runtime = json.loads((session_dir / "session.json").read_text()).get("runtime") or {}
    except (OSError, ValueError):
        return None
    return runtime.get("pid") if runtime.get("attempt") == attempt else None


def main() -> None:
    project = Path(tempfile.mkdtemp(prefix="trainctl-resume-demo-"))
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    trainctl = [sys.executable, "-m", "trainctl", "local", "--quiet"]
    script = str(HERE / "quickstart.py")

    print(f"1) uninterrupted run in {project}")
    subprocess.run([*trainctl, script, *ARGS], cwd=project, check=True)
    reference = newest_session(project)

    print("2) the same run, interrupted three times, restarted by trainctl")
    proc = subprocess.Popen([*trainctl, "--max-restarts", "5", "--restart-delay", "0", script, *ARGS,
                             "--step-delay", "0.01"], cwd=project)
    while newest_session(project) == reference:
        time.sleep(0.05)
    session = newest_session(project)
    for attempt, sig in enumerate([signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]):
        pid = None
        while pid is None and proc.poll() is None:
            pid = script_pid(session, attempt)
            time.sleep(0.05)
        time.sleep(0.4)
        print(f"   -> sending {sig.name} to the training process (attempt {attempt})", flush=True)
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, TypeError):
            pass
    if proc.wait() != 0:
        sys.exit("the interrupted run did not complete")

    name = f"ckpt-step{TOTAL:08d}.pt"
    a = torch.load(project / "checkpoints" / reference.name / name, weights_only=True)
    b = torch.load(project / "checkpoints" / session.name / name, weights_only=True)
    same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    same = same and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True)
        for x, y in zip(sa.values(), sb.values(), strict=True))
    print(f"3) final model and optimizer state identical: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
