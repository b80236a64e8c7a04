"""Shared fixtures: a throwaway project folder and a way to run the real CLI in it."""

from __future__ import annotations

import os
import re
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


def write_entry_point(folder: Path) -> Path:
    """`folder/trainctl`, the script pip writes for pyproject.toml's [project.scripts] entry,
    for this checkout: an installed one names the module that held `main` when it was installed."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    module, function = re.search(r'^trainctl\s*=\s*"([\w.]+):(\w+)"', text, re.MULTILINE).groups()
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "trainctl"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\n"
                      f"if __name__ == '__main__':\n    sys.exit({function}())\n")
    script.chmod(0o755)
    return folder


def pytest_configure(config: pytest.Config) -> None:
    """trainctl's bytecode, written once before any test (by the controller, not each xdist
    worker): the tests start thousands of trainctl processes, and where PYTHONDONTWRITEBYTECODE
    is set (as in CI) each one compiled every module it imports from source (~0.6 s of CPU for
    all of them), as no installed package does."""
    config.addinivalue_line("markers", "slow: an end-to-end test of tens of seconds; such tests run first, so the "
                                       "two workers share them out and finish together")
    if hasattr(config, "workerinput"):
        return
    import compileall

    compileall.compile_dir(str(REPO / "trainctl"), quiet=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first (in their order), then the rest: started last, one of
    them kept one worker busy for a minute after the other had run out of tests."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


# --- no network but loopback; servers for the cloud tests (tests/servers.py) -------------------

from .netguard import loopback_guard  # noqa: E402
from .servers import FAKE_AWS_ENV, UNSET_AWS_ENV, FakeIMDS, FaultProxy, MotoServer, make_s3_store  # noqa: E402

loopback_guard.install()


@pytest.fixture(autouse=True)
def _loopback_only():
    """Fail any test that tried to reach a non-loopback address, even if the error was caught.
    Child processes get the same guard through servers.loopback_env()."""
    del loopback_guard.violations[:]
    yield
    if loopback_guard.violations:
        found = list(loopback_guard.violations)
        del loopback_guard.violations[:]
        pytest.fail("network outside loopback: " + "; ".join(found), pytrace=False)


@pytest.fixture(scope="session")
def moto_server():
    """moto's server on 127.0.0.1 for the whole session, with fake AWS credentials in os.environ
    (and no profile, config file or IMDS lookup of the machine running the tests)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in UNSET_AWS_ENV:
            mp.delenv(name, raising=False)
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        server = MotoServer.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(moto_server) -> str:
    """A fresh, empty bucket on moto's server (emptied and removed afterwards)."""
    name = moto_server.create_bucket()
    yield name
    moto_server.delete_bucket(name)


@pytest.fixture
def fault_proxy(moto_server):
    """A FaultProxy in front of moto's server: point a store's endpoint_url at `.url`."""
    proxy = FaultProxy(moto_server.endpoint_url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def imds():
    """A fake IMDSv2 on 127.0.0.1; set AWS_EC2_METADATA_SERVICE_ENDPOINT to `.endpoint`."""
    server = FakeIMDS().start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same test over each storage implementation: a folder, and S3 on moto's server."""
    if request.param == "local":
        from trainctl.storage import LocalStore

        return LocalStore(tmp_path / "store")
    moto = request.getfixturevalue("moto_server")
    return make_s3_store(moto.endpoint_url, request.getfixturevalue("s3_bucket"), tmp_path / "upload-state")
