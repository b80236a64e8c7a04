"""Every `trainctl ...` command in README.md's shell blocks works as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, clean_env, write_entry_point

EXPECTED_EXIT = {"examples/failing.py": None}  # None: any non-zero


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            command = re.split(r"\s{2,}#", line)[0].strip()
            if command.startswith("trainctl "):
                commands.append(command)
    return commands


def test_readme_has_commands():
    assert len(readme_commands()) > 10


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("readme")
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    (project / "examples").symlink_to(REPO / "examples")
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "trainctl", "local", "--quiet", "examples/quickstart.py",
                            "--epochs", "2", "--steps-per-epoch", "10"], cwd=project, env=clean_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    return project


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_works(demo_project, command):
    if "--follow" in command or command == "trainctl tensorboard":
        pytest.skip("runs until stopped")
    if command.startswith("trainctl aws "):
        pytest.skip("needs an AWS account: tests/test_aws_e2e.py runs the README's AWS commands against moto")
    if command.startswith("trainctl runpod "):
        pytest.skip("needs RunPod: test_runpod_readme.py runs it against the fake RunPod API")
    bin_dir = write_entry_point(demo_project.parent / "bin")
    env = clean_env(PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
                    COLUMNS="120")
    r = subprocess.run(["bash", "-c", command], cwd=demo_project, env=env, capture_output=True,
                       text=True, timeout=180)
    expected = next((code for key, code in EXPECTED_EXIT.items() if key in command), 0)
    if expected is None:  # the script's own traceback is part of what a failing example shows
        assert r.returncode != 0
    else:
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == expected, r.stdout + r.stderr
