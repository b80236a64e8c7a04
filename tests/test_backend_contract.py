"""The Backend contract, run against every implementation (as filelock tests every lock class):
LocalBackend and tests/folder_backend.py's FolderBackend. Then the engine itself, on the one that
is not LocalBackend: it needs nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainctl import config as config_mod
from trainctl.backends.base import BACKENDS, Backend, Handle, RunSpec, get_backend, register
from trainctl.launcher.supervisor import EngineEvents, RestartPolicy, Supervisor
from trainctl.session import State

from .conftest import REPO, clean_env

IMPLEMENTATIONS = ["local", "folder"]


@pytest.fixture(params=IMPLEMENTATIONS)
def backend(request, tmp_path, monkeypatch) -> Backend:
    register("folder", "tests.folder_backend:FolderBackend")
    monkeypatch.setenv("TRAINCTL_FOLDER_BACKEND_ROOT", str(tmp_path / "attempts"))
    found = get_backend(request.param, **({"use_pty": False} if request.param == "local" else {}))
    yield found
    for handle in ours(found.list(), tmp_path):  # nothing of a failed test keeps running
        found.release(handle)


def ours(handles: list[Handle], tmp_path: Path) -> list[Handle]:
    """The listed attempts this test started (the machine may run other people's)."""
    return [h for h in handles if str(tmp_path) in json.dumps(h.ids)]


def spec(tmp_path: Path, source: str, *args: str) -> RunSpec:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    session_dir = tmp_path / "session"
    session_dir.mkdir(exist_ok=True)
    return RunSpec(script=script, args=tuple(args), session_id="20260101-000000-abc123",
                   session_dir=session_dir, checkpoint_location=str(tmp_path / "checkpoints"), cwd=tmp_path)


def text_of(backend: Backend, handle: Handle, **kw) -> str:
    return b"".join(c.data for c in backend.log_iter(handle, **kw)).decode()


def wait_until_ended(backend: Backend, handle: Handle):
    while (found := backend.describe(handle)).running:
        time.sleep(0.02)
    return found


def wait_for_text(backend: Backend, handle: Handle, text: str) -> None:
    while text not in text_of(backend, handle):
        assert backend.describe(handle).running, text_of(backend, handle)
        time.sleep(0.02)


WAIT_FOR_GO = """
    import os, time
    print("ready", flush=True)
    while not os.path.exists("go"):
        time.sleep(0.01)
    print("done", flush=True)
"""


def test_plan_is_pure_and_repeatable(backend, tmp_path):
    s = spec(tmp_path, "print('hi')\n", "--lr", "0.1", "--api-key", "s3cret")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    first, second = backend.plan(s), backend.plan(s)
    assert first == second
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing started
    assert ours(backend.list(), tmp_path) == []
    assert str(s.script) in first.command and "--lr" in first.command
    assert first.env["TRAIN_OPS_SESSION_ID"] == s.session_id
    assert first.checkpoint_location == s.checkpoint_location
    shown = json.dumps(first.display())
    assert "s3cret" not in shown and "***" in shown


def test_launch_returns_at_once_and_describe_follows_the_attempt(backend, tmp_path):
    handle = backend.launch(backend.plan(spec(tmp_path, WAIT_FOR_GO)), 0)
    assert backend.describe(handle).state is State.RUNNING  # it waits for a file we have not written
    wait_for_text(backend, handle, "ready")
    (tmp_path / "go").write_text("")
    end = wait_until_ended(backend, handle)
    assert (end.state, end.exit_code) == (State.COMPLETED, 0)
    backend.release(handle)


def test_log_iter_follows_to_the_end_and_resumes_from_an_offset(backend, tmp_path):
    source = "import time\nfor i in range(40):\n    print('line', i, flush=True)\n    time.sleep(0.005)\n"
    handle = backend.launch(backend.plan(spec(tmp_path, source)), 0)
    chunks = list(backend.log_iter(handle, follow=True))
    expected = "".join(f"line {i}\n" for i in range(40))
    assert b"".join(c.data for c in chunks).decode() == expected
    assert not backend.describe(handle).running
    middle = chunks[0].offset + len("".join(f"line {i}\n" for i in range(10)))
    assert text_of(backend, handle, since=middle) == "".join(f"line {i}\n" for i in range(10, 40))
    backend.release(handle)


def test_a_failing_script_is_failed_with_its_exit_code(backend, tmp_path):
    handle = backend.launch(backend.plan(spec(tmp_path, "import sys; print('boom'); sys.exit(3)\n")), 0)
    end = wait_until_ended(backend, handle)
    assert (end.state, end.exit_code) == (State.FAILED, 3)
    assert "boom" in text_of(backend, handle)
    backend.release(handle)


def test_stop_is_preemption_style(backend, tmp_path):
    source = """
        import signal, sys, time
        def on_term(*_):
            print("emergency checkpoint", flush=True)
            sys.exit(75)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep(300)
    """
    handle = backend.launch(backend.plan(spec(tmp_path, source)), 0)
    wait_for_text(backend, handle, "ready")
    backend.stop(handle, grace_period_s=60)
    end = wait_until_ended(backend, handle)
    assert end.exit_code == 75 and "emergency checkpoint" in text_of(backend, handle)
    backend.release(handle)


@pytest.mark.parametrize("grace_period_s", [0, 0.5])
def test_stop_kills_what_ignores_it_after_the_grace_period(backend, tmp_path, grace_period_s):
    source = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(300)\n"
    handle = backend.launch(backend.plan(spec(tmp_path, source)), 0)
    wait_for_text(backend, handle, "ready")
    backend.stop(handle, grace_period_s=grace_period_s)
    end = wait_until_ended(backend, handle)
    assert (end.state, end.signal) == (State.KILLED, "SIGKILL")
    backend.release(handle)


def test_a_handle_saved_as_json_reattaches_from_another_process(backend, tmp_path):
    handle = backend.launch(backend.plan(spec(tmp_path, WAIT_FOR_GO)), 0)
    wait_for_text(backend, handle, "ready")
    saved = tmp_path / "handle.json"
    saved.write_text(json.dumps(handle.to_json()))
    other = textwrap.dedent(f"""
        import json, sys
        from trainctl.backends.base import Handle, get_backend, register
        register("folder", "tests.folder_backend:FolderBackend")
        handle = Handle.from_json(json.loads(open({str(saved)!r}).read()))
        backend = get_backend(handle.backend)
        print("state", backend.describe(handle).state)
        print("output", b"".join(c.data for c in backend.log_iter(handle)).decode().split())
        assert any(h.ids["pid"] == handle.ids["pid"] for h in backend.list())
        backend.stop(handle, grace_period_s=0)
        while backend.describe(handle).running:
            pass
        print("stopped")
    """)
    r = subprocess.run([sys.executable, "-c", other], cwd=REPO, env=clean_env(**{
        "TRAINCTL_FOLDER_BACKEND_ROOT": str(tmp_path / "attempts")}), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["state running", "output ['ready']", "stopped"]
    end = wait_until_ended(backend, handle)
    assert end.state is State.KILLED
    backend.release(handle)


def test_release_twice_is_fine_and_frees_a_running_attempt(backend, tmp_path):
    handle = backend.launch(backend.plan(spec(tmp_path, WAIT_FOR_GO)), 0)
    wait_for_text(backend, handle, "ready")
    assert [h.ids["pid"] for h in ours(backend.list(), tmp_path)] == [handle.ids["pid"]]
    backend.release(handle)
    backend.release(handle)
    assert not backend.describe(handle).running
    assert ours(backend.list(), tmp_path) == []


def test_unknown_backend_names_the_valid_ones():
    from trainctl.errors import UsageError

    with pytest.raises(UsageError, match=r"Unknown backend 'gcp'\. Valid: local"):
        get_backend("gcp")
    assert BACKENDS["local"] == "trainctl.backends.local:LocalBackend"


class Recorder(EngineEvents):
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.text = b""

    def message(self, text: str) -> None:
        self.messages.append(text)

    def output(self, chunk) -> None:
        self.text += chunk.data


def test_the_engine_runs_a_session_with_restarts_on_another_backend(tmp_path, monkeypatch):
    register("folder", "tests.folder_backend:FolderBackend")
    monkeypatch.setenv("TRAINCTL_FOLDER_BACKEND_ROOT", str(tmp_path / "attempts"))
    (tmp_path / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    script = tmp_path / "flaky.py"
    script.write_text("import os, sys\nattempt = int(os.environ['TRAIN_OPS_ATTEMPT'])\n"
                      "print('attempt', attempt, 'loss: 0.5', flush=True)\nsys.exit(1 if attempt == 0 else 0)\n")
    cfg = config_mod.load(tmp_path)
    events = Recorder()
    monkeypatch.chdir(tmp_path)
    supervisor = Supervisor(RunSpec(script=script), RestartPolicy(max_restarts=2, restart_delay_s=0), cfg,
                            backend="folder", events=events)
    supervisor.prepare(preflight=False)
    result = supervisor.run()
    assert result.outcome.status is State.COMPLETED and result.exit_code == 0
    data = result.session.read()
    assert data["status"] == "completed" and [a["status"] for a in data["attempts"]] == ["failed", "completed"]
    assert data["handle"]["backend"] == "folder" and data["handle"]["attempt"] == 1
    assert b"attempt 0" in events.text and b"attempt 1" in events.text
    assert any("restart 1/2" in m for m in events.messages)
    assert [e["values"] for e in result.session.metrics()] == [{"loss": 0.5}, {"loss": 0.5}]
    assert list((tmp_path / "attempts").iterdir()) == []  # each attempt released


def test_a_follower_that_joins_late_still_gets_each_stream_apart(tmp_path):
    """The engine's reader may attach after the script printed (a loaded machine): what it
    catches up on keeps stdout and stderr apart, or stderr lines reached the user's stdout."""
    local = get_backend("local", use_pty=False)
    source = ("import sys\nfor i in range(3):\n    print(f'out {i}')\n    print(f'err {i}', file=sys.stderr)\n")
    handle = local.launch(local.plan(spec(tmp_path, source)), 0)
    wait_until_ended(local, handle)  # everything printed before anyone follows
    chunks = list(local.log_iter(handle, follow=True))
    by_stream = {s: b"".join(c.data for c in chunks if c.stream == s).decode() for s in ("stdout", "stderr")}
    assert by_stream == {"stdout": "out 0\nout 1\nout 2\n", "stderr": "err 0\nerr 1\nerr 2\n"}, chunks
    local.release(handle)
