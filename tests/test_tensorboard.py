"""TensorBoard: event files read back with TensorBoard's own loaders; `trainctl tensorboard`."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env
from trainctl.config import load
from trainctl.session import SessionStore
from trainctl.tensorboard_sink import TensorBoardSink


def read_plugin(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's server shows: the plugin loader, which lists scalars as tensors."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def read_classic(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """Steps equal, values equal as float32 (TensorBoard's scalar type), NaN equal to NaN."""
    if [s for s, _ in a] != [s for s, _ in b]:
        return False
    return all((math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-6)
               for (_, x), (_, y) in zip(a, b, strict=True))


@pytest.mark.parametrize("reader", [read_plugin, read_classic])
def test_round_trip(tmp_path: Path, reader) -> None:
    events = [{"step": i, "epoch": i // 5, "t": 1000.0 + i,
               "values": {"loss": 1.0 / (i + 1), "acc": i / 10, "phase": "train", "done": True}}
              for i in range(10)]
    events.append({"step": 10, "values": {"loss": float("nan"), "acc": float("inf")}})
    events.append({"step": None, "values": {"loss": 0.5}})  # no step: the next one
    events.append({"values": {"loss": 0.25}})
    events.append({"step": 10**400, "values": {"big": 10**400, "huge": 1e300}})  # beyond float32/int64
    with TensorBoardSink(tmp_path / "tb") as sink:
        sink.write(events)

    data = reader(tmp_path / "tb")
    assert set(data) == {"loss", "acc", "big", "huge"}  # strings and booleans are not scalars
    assert data["big"] == data["huge"] == [(13, math.inf)]
    assert same(data["loss"], [(i, 1.0 / (i + 1)) for i in range(10)]
                + [(10, math.nan), (11, 0.5), (12, 0.25)])
    assert same(data["acc"], [(i, i / 10) for i in range(10)] + [(10, math.inf)])


@pytest.mark.parametrize("reader", [read_plugin, read_classic])
def test_resume_purges_points_from_purge_step(tmp_path: Path, reader) -> None:
    logdir = tmp_path / "tb"
    with TensorBoardSink(logdir) as first:
        first.write([{"step": i, "values": {"loss": float(i), "acc": float(i)}} for i in range(10)])
    # the resumed attempt restarts from a checkpoint at step 5
    with TensorBoardSink(logdir, purge_step=5) as resumed:
        resumed.write([{"step": i, "values": {"loss": 100.0 + i}} for i in range(5, 8)])

    data = reader(logdir)
    assert data["loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                            (5, 105.0), (6, 106.0), (7, 107.0)]
    assert data["acc"] == [(i, float(i)) for i in range(5)]  # every tag is cut at the purge step
    assert len(list(logdir.iterdir())) == 2


def test_continuation_without_purge_step_keeps_everything(tmp_path: Path) -> None:
    logdir = tmp_path / "tb"
    with TensorBoardSink(logdir) as first:
        first.write([{"step": i, "values": {"loss": float(i)}} for i in range(3)])
    with TensorBoardSink(logdir) as second:
        second.write([{"step": i, "values": {"loss": float(i)}} for i in range(3, 6)])
    assert read_plugin(logdir)["loss"] == [(i, float(i)) for i in range(6)]


def test_flush_makes_points_visible_and_close_is_final(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()  # nothing is created before the first write
    sink.write([])
    sink.write([{"step": 1, "values": {"note": "text only"}}])
    assert not (tmp_path / "tb").exists()
    sink.write([{"step": 3, "values": {"loss": 2.0}}])
    sink.flush()
    assert read_plugin(tmp_path / "tb") == {"loss": [(3, 2.0)]}
    sink.close()
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.write([{"step": 4, "values": {"loss": 1.0}}])


def test_import_is_light() -> None:
    code = ("import sys, trainctl.tensorboard_sink, trainctl.cli.tensorboard, "
            "trainctl.cli.compare, trainctl.cli.plot\n"
            "print(sorted(m for m in ('torch', 'tensorboard', 'matplotlib', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=clean_env(), check=True).stdout
    assert out.strip() == "[]"


def make_session(project: Path, session_id: str, **fields) -> object:
    store = SessionStore(load(project).state_dir)
    session = store.create(session_id=session_id, **fields)
    events = [{"kind": "metric", "step": i, "values": {"loss": 2.0 - i / 10}, "attempt": 0, "source": "run"}
              for i in range(5)]
    session.append_events(events)
    with TensorBoardSink(session.tensorboard_dir) as sink:
        sink.write(events)
    parsed = [{**e, "values": {"acc": i / 10}, "source": "output"} for i, e in enumerate(events)]
    with TensorBoardSink(session.tensorboard_dir / "output") as sink:  # what the launcher parsed
        sink.write(parsed)
    return session


def runs_of(stdout: str) -> dict[str, str]:
    """Run name -> session TensorBoard folder, from a printed command over trainctl's view."""
    argv = shlex.split(stdout.strip())
    assert argv[1:3] == ["-m", "tensorboard.main"]
    assert argv[argv.index("--load_fast") + 1] == "false"  # the loader that follows links
    view = Path(argv[argv.index("--logdir") + 1])
    return {link.name: os.readlink(link) for link in view.iterdir()}


def test_print_command_names_runs(project: Path, cli) -> None:
    a = make_session(project, "20250101-000000-aaaaaa", name="baseline", script="train.py")
    b = make_session(project, "20250101-000100-bbbbbb", script="scripts/finetune.py")

    result = cli("tensorboard", "--print-command", "--port", "7007")
    assert result.returncode == 0, result.stderr
    assert runs_of(result.stdout) == {"finetune-bbbbbb": str(b.tensorboard_dir),
                                      "baseline-aaaaaa": str(a.tensorboard_dir)}
    argv = shlex.split(result.stdout)
    assert argv[argv.index("--port") + 1] == "7007"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"

    result = cli("tensorboard", "latest", "--print-command")
    assert runs_of(result.stdout) == {"finetune-bbbbbb": str(b.tensorboard_dir)}
    result = cli("tensorboard", "baseline", "aaaa", "--print-command")  # same session twice
    assert runs_of(result.stdout) == {"baseline-aaaaaa": str(a.tensorboard_dir)}
    again = cli("tensorboard", "baseline", "--print-command")  # the same choice: the same folder
    assert again.stdout == result.stdout


@pytest.mark.parametrize(("args", "code", "fragment"), [
    (["nope"], 3, "No session 'nope'"),
    (["aaaa", "nope"], 3, "No session 'nope'"),
    (["--port", "70000"], 2, "--port"),
])
def test_bad_input(project: Path, cli, args, code, fragment) -> None:
    make_session(project, "20250101-000000-aaaaaa", script="train.py")
    before = sorted((p, p.stat().st_mtime_ns) for p in project.rglob("*"))
    result = cli("tensorboard", "--print-command", *args)
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted((p, p.stat().st_mtime_ns) for p in project.rglob("*")) == before


def test_no_sessions_is_an_error(cli) -> None:
    result = cli("tensorboard", "--print-command")
    assert result.returncode == 3
    assert "No sessions in this project yet" in result.stderr
    assert "trainctl local" in result.stderr
    assert "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_serves_sessions_and_stops_with_its_launcher(project: Path) -> None:
    make_session(project, "20250101-000000-aaaaaa", name="baseline", script="train.py")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "tensorboard", "--port", str(port)],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        runs: object = None
        deadline = time.monotonic() + 90  # a bound for a hung server, not a speed assertion
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                runs = get_json(f"{base}/data/runs")
                if isinstance(runs, list) and len(runs) >= 2:  # both folders loaded
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        # the script's own points as the run itself (never "baseline-aaaaaa/."), parsed output below it
        assert sorted(runs) == ["baseline-aaaaaa", "baseline-aaaaaa/output"], (runs, proc.poll())
        query = urllib.parse.urlencode({"run": "baseline-aaaaaa", "tag": "loss"})
        points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [(step, round(value, 5)) for _, step, value in points] == [
            (i, round(2.0 - i / 10, 5)) for i in range(5)]
        query = urllib.parse.urlencode({"run": "baseline-aaaaaa/output", "tag": "acc"})
        points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [(step, round(value, 5)) for _, step, value in points] == [(i, i / 10) for i in range(5)]
    finally:
        proc.send_signal(signal.SIGTERM)  # what `kill` or a closing terminal sends
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    with socket.socket() as s:  # TensorBoard went with it: nothing listens on the port (a bind
        # could still fail for a while on the server's closed connections in TIME_WAIT)
        assert s.connect_ex(("127.0.0.1", port)) != 0


LIVE = """
import sys, time
from pathlib import Path
import trainctl

marks = Path(sys.argv[1])
run = trainctl.init()
for step in range(1, 51):
    run.log({"loss": 1.0 / step}, step=step)
    time.sleep(0.01)
while not (marks / "stop").exists():  # alive: TensorBoard must already show every point
    time.sleep(0.02)
"""

KILLED = """
import os, sys, time
from pathlib import Path
import torch
import trainctl

marks = Path(sys.argv[1])
run = trainctl.init(total_steps=60)
model = torch.nn.Linear(2, 1)
run.track(model=model)
meta = run.restore()
(marks / f"pid{run.attempt}").write_text(str(os.getpid()))
for step in range((meta or {}).get("step") or 0, 60):
    run.log({"loss": 1.0 / (step + 1)}, step=step + 1)
    if step + 1 == 40:
        run.save_checkpoint(step=40)
    if step + 1 == 45 and run.attempt == 0:
        while True:  # past the checkpoint, until killed
            time.sleep(0.05)
"""


def _metric_steps(session_dir: Path, attempt: int | None = None) -> list[int]:
    try:
        lines = (session_dir / "events.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("kind") == "metric" and (attempt is None or e.get("attempt") == attempt):
            out.append(e["step"])
    return out


def _wait(predicate, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, "the run ended early"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _launch(project: Path, script: str, marks: Path, *options: str) -> subprocess.Popen:
    (project / "train.py").write_text(script)
    return subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--quiet", "--no-preflight",
                             *options, "train.py", str(marks)], cwd=project, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _session_dir(project: Path) -> Path:
    store = SessionStore(load(project).state_dir)
    return store.sessions_dir / store.ids()[0] if store.ids() else project / "none"


@pytest.mark.parametrize("reader", [read_plugin, read_classic])
def test_tensorboard_holds_what_the_session_log_holds_while_the_run_is_live(project: Path, reader) -> None:
    marks = project / "marks"
    marks.mkdir()
    proc = _launch(project, LIVE, marks)
    try:
        # the session log is flushed every second; TensorBoard is written before it
        _wait(lambda: len(_metric_steps(_session_dir(project))) == 50, proc)
        points = reader(_session_dir(project) / "tensorboard")
        assert [s for s, _ in points["loss"]] == list(range(1, 51))
    finally:
        (marks / "stop").touch()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_kill_9_under_max_restarts_keeps_attempt_0s_points(project: Path) -> None:
    marks = project / "marks"
    marks.mkdir()
    proc = _launch(project, KILLED, marks, "--max-restarts", "1", "--restart-delay", "0")
    try:
        _wait(lambda: (marks / "pid0").exists() and 45 in _metric_steps(_session_dir(project), 0), proc)
        os.kill(int((marks / "pid0").read_text()), signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    logdir = _session_dir(project) / "tensorboard"
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[0].stat().st_size > 0  # attempt 0's file is not empty
    for reader in (read_plugin, read_classic):
        steps = [s for s, _ in reader(logdir)["loss"]]
        assert steps == list(range(1, 61))  # every step once: 41-45 of attempt 0 purged
