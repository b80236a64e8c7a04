"""Shared fixtures: a throwaway project folder and a way to run the real CLI in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# moto's server and AWS answers for the AWS tests (fixtures start only when a test asks).
pytest_plugins = ["tests.aws_fixtures"]

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any TRAIN_OPS_* or torchrun variables leaking in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TRAIN_OPS_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, *, timeout: float = 120, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainctl", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env or clean_env(), input=input)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project with a trainctl.toml (so nothing leaks into the repo's own state)."""
    (tmp_path / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    return tmp_path


@pytest.fixture
def cli(project: Path):
    def _run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), project, **kw)

    return _run
