"""A project that trains on RunPod, without RunPod: the fake API on loopback (tests/fake_runpod.py),
moto's S3 server as storage, the real CLI in subprocesses, HOME in a temp folder. The tests of
`trainctl runpod` and the end-to-end tests (which play the pod) share it."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES, clean_env
from tests.fake_runpod import API_KEY, FakeRunPod
from tests.servers import loopback_env

SECRETS = {"AWS_ACCESS_KEY_ID": "aws_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret"}


def toml_config(bucket: str, endpoint: str, **runpod: Any) -> str:
    values = {"gpu": "NVIDIA RTX A4000", "max_hours": 2.0, "setup": "none", "secrets": SECRETS, **runpod}

    def render(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {render(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines = ['checkpoint_dir = "checkpoints"', "", "[cloud]", f'storage = "s3://{bucket}/trainctl"',
             f'endpoint_url = "{endpoint}"', 'region = "us-east-1"', "", "[runpod]"]
    lines += [f"{k} = {render(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class World:
    """One project folder, the fake RunPod, a bucket on moto; `run` is the CLI there."""

    tmp: Path
    project: Path
    fake: FakeRunPod
    bucket: str
    endpoint: str
    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = loopback_env(clean_env(), HOME=str(self.home), RUNPOD_API_KEY=API_KEY,
                           RUNPOD_API_BASE_URL=self.fake.base_url)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 180, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "trainctl", *args], cwd=self.project,
                              capture_output=True, text=True, timeout=timeout,
                              env=env or self.env(), input=input)

    def configure(self, **runpod: Any) -> None:
        (self.project / "trainctl.toml").write_text(toml_config(self.bucket, self.endpoint, **runpod))

    def session(self, session_id: str) -> dict[str, Any]:
        return json.loads((self.project / ".trainctl" / "sessions" / session_id / "session.json").read_text())

    def session_ids(self) -> list[str]:
        folder = self.project / ".trainctl" / "sessions"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    def remote(self, session_id: str) -> Any:
        from trainctl.storage.remote import RemoteSession

        from .servers import make_s3_store

        store = make_s3_store(self.endpoint, self.bucket, self.tmp / "test-uploads",
                              prefix=f"trainctl/{self.project.name}/{session_id}")
        return RemoteSession(store)

    def only_pod(self) -> str:
        assert len(self.fake.pods) == 1, self.fake.pods
        return next(iter(self.fake.pods))


def launched_session(result: subprocess.CompletedProcess[str]) -> str:
    found = re.search(r"Started session (\S+) on pod", result.stdout)
    assert found, result.stdout + result.stderr
    return found.group(1)


@pytest.fixture
def world(tmp_path, fake, moto_server, s3_bucket) -> World:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "train.py").write_text((EXAMPLES / "quickstart.py").read_text())
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    fake.secrets = {"aws_key_id": "testing", "aws_secret": "testing"}
    w = World(tmp_path, project, fake, s3_bucket, moto_server.endpoint_url, home)
    w.configure()
    return w


# --- playing the pod ------------------------------------------------------------------------------

PYTHON3_SHIM = f"""#!/bin/sh
exec {shlex.quote(sys.executable)} "$@"
"""


@dataclass
class PodPlayer:
    """Be the pod: run its start command (from the pod's dockerArgs) with the environment RunPod
    gives it, in a folder of its own; when the fake terminates the pod, its processes go too."""

    world: World
    pod_id: str
    folder: Path
    proc: subprocess.Popen[str] | None = None

    def start(self) -> PodPlayer:
        from trainctl.cloud.runpod.startscript import SCRIPT_PATH

        self.folder.mkdir(parents=True, exist_ok=True)
        bin_dir = self.folder / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "python3"
        shim.write_text(PYTHON3_SHIM)
        shim.chmod(0o755)
        pod = self.world.fake.pods[self.pod_id]
        args = pod.input["dockerArgs"].replace(SCRIPT_PATH, str(self.folder / "start.sh"))
        env = loopback_env(clean_env(), **self.world.fake.pod_environment(self.pod_id))
        env.update(HOME=str(self.folder), RUNPOD_API_BASE_URL=self.world.fake.base_url,
                   PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        self.proc = subprocess.Popen(shlex.split(args), env=env, cwd=self.folder,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.world.fake.on_terminate[self.pod_id] = self.kill
        return self

    def kill(self) -> None:
        """What RunPod does to a terminated pod's container."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def interrupt(self) -> None:
        """An interruptible pod outbid: SIGTERM to the container's first process (the start
        script, which hands it to the agent), as `docker stop` sends it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        assert self.proc is not None
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            self.kill()
        return self.proc.returncode, out
