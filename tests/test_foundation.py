"""trainctl local, trainctl.init() and the session store, through real processes and files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainctl import env as env_mod
from trainctl.errors import TrainctlWarning
from trainctl.session import Session, SessionStore

from .conftest import REPO, clean_env, run_cli


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def only_session(project: Path) -> Session:
    sessions = SessionStore(project / ".trainctl").ids()
    assert len(sessions) == 1, sessions
    return Session(project / ".trainctl" / "sessions" / sessions[0])


def test_env_injection_every_variable_points_at_existing_paths(project, cli):
    write(project / "dump.py", """
        import json, os, sys
        json.dump({k: v for k, v in os.environ.items() if k.startswith("TRAIN_OPS_")},
                  open("env.json", "w"))
        print("args", sys.argv[1:])
    """)
    r = cli("local", "--no-preflight", "dump.py", "--lr", "0.1")
    assert r.returncode == 0, r.stderr
    seen = json.loads((project / "env.json").read_text())
    assert set(seen) == set(env_mod.VARIABLES) - {"TRAIN_OPS_RESUME"}
    for key in ("TRAIN_OPS_SESSION_DIR", "TRAIN_OPS_CHECKPOINT_DIR", "TRAIN_OPS_TENSORBOARD_DIR",
                "TRAIN_OPS_CONFIG"):
        assert Path(seen[key]).exists(), key
    session = only_session(project)
    assert seen["TRAIN_OPS_SESSION_ID"] == session.id
    assert seen["TRAIN_OPS_ATTEMPT"] == "0" and seen["TRAIN_OPS_BACKEND"] == "local"
    assert seen["TRAIN_OPS_CHECKPOINT_DIR"].endswith(os.path.join("checkpoints", session.id))
    assert "args ['--lr', '0.1']" in r.stdout


def test_output_passthrough_and_tee(project, cli):
    write(project / "talk.py", """
        import sys
        for i in range(3):
            print(f"out {i}")
            print(f"err {i}", file=sys.stderr)
    """)
    r = cli("local", "--no-preflight", "talk.py")
    assert r.returncode == 0
    assert [line for line in r.stdout.splitlines() if line.startswith("out")] == ["out 0", "out 1", "out 2"]
    assert "err 2" in r.stderr and "err" not in r.stdout
    log = only_session(project).output_log.read_text()
    assert all(f"out {i}" in log and f"err {i}" in log for i in range(3))


def test_failing_script_exit_code_tail_and_failed_session(project, cli):
    write(project / "boom.py", """
        import sys
        for i in range(30):
            print(f"line {i}")
        sys.exit(3)
    """)
    r = cli("local", "--no-preflight", "boom.py")
    assert r.returncode == 3
    session = only_session(project)
    assert session.read()["status"] == "failed" and session.read()["exit_code"] == 3
    # the output was on screen: every line once, the summary does not repeat its tail
    assert [line for line in r.stdout.splitlines() if line.startswith("line ")] == [f"line {i}" for i in range(30)]
    assert "line 29" not in r.stderr
    assert session.id in r.stderr and str(session.output_log) in r.stderr
    assert "Traceback" not in r.stderr


def test_quickstart_under_launcher_records_metrics_checkpoints_summary(project, cli):
    r = cli("local", str(REPO / "examples" / "quickstart.py"), "--epochs", "2",
            "--steps-per-epoch", "20")
    assert r.returncode == 0, r.stderr
    session = only_session(project)
    data = session.read()
    assert data["status"] == "completed" and data["exit_code"] == 0
    assert data["config"]["epochs"] == 2  # trainctl.init(config=vars(args))
    steps = sorted(e["step"] for e in session.metrics() if "loss" in e["values"])
    assert steps == list(range(1, 41))
    assert data["summary"]["checkpoints"] == 2
    assert "completed" in r.stderr and session.id in r.stderr and "loss" in r.stderr
    ckpts = sorted((project / "checkpoints" / session.id).glob("*.pt"))
    assert [p.name for p in ckpts] == ["ckpt-step00000020.pt", "ckpt-step00000040.pt"]


def test_standalone_python_script_is_recorded(project):
    write(project / "alone.py", """
        import trainctl
        run = trainctl.init(config={"lr": 0.1, "api_key": "hunter2"}, name="solo")
        for step in range(1, 6):
            run.log({"loss": 1.0 / step}, step=step)
    """)
    r = subprocess.run([sys.executable, "alone.py"], cwd=project, capture_output=True, text=True,
                       env=clean_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    session = only_session(project)
    data = session.read()
    assert data["status"] == "completed" and data["name"] == "solo"
    assert data["config"] == {"lr": 0.1, "api_key": "***"}
    assert "hunter2" not in session.events_path.read_text() + session.json_path.read_text()
    assert data["summary"]["best"]["loss"]["value"] == pytest.approx(0.2)
    assert [e["step"] for e in session.metrics()] == [1, 2, 3, 4, 5]


def test_standalone_crash_marks_session_failed(project):
    write(project / "crash.py", """
        import trainctl
        run = trainctl.init()
        run.log({"loss": 1.0})
        raise RuntimeError("bad batch")
    """)
    r = subprocess.run([sys.executable, "crash.py"], cwd=project, capture_output=True, text=True,
                       env=clean_env(), timeout=60)
    assert r.returncode == 1
    data = only_session(project).read()
    assert data["status"] == "failed" and "bad batch" in data["error"]


def test_sessions_list_and_show(project, cli):
    write(project / "ok.py", "print('loss: 0.5')\n")
    for _ in range(2):
        assert cli("local", "--no-preflight", "ok.py").returncode == 0
    r = cli("sessions", "list")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 3
    assert "completed" in r.stdout and "ok.py" in r.stdout
    listed = json.loads(cli("sessions", "list", "--json").stdout)
    assert [s["status"] for s in listed] == ["completed", "completed"]
    assert listed[0]["id"] > listed[1]["id"]  # newest first
    shown = cli("sessions", "show", "latest")
    assert shown.returncode == 0 and listed[0]["id"] in shown.stdout
    as_json = json.loads(cli("sessions", "show", listed[1]["id"][-6:], "--json").stdout)  # the random part
    assert as_json["id"] == listed[1]["id"]
    assert len(json.loads(cli("sessions", "list", "--json", "--limit", "1").stdout)) == 1
    assert json.loads(cli("sessions", "show", "latest~1", "--json").stdout)["id"] == listed[1]["id"]
    assert cli("sessions", "show", "latest~2").returncode == 3


def test_crashed_session_is_not_running_forever(project):
    store = SessionStore(project / ".trainctl")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.create(status="running", script="x.py",
                 processes=[{"pid": dead.pid, "start_ticks": 1, "role": "script"}])
    r = run_cli(["sessions", "list", "--json"], project)
    assert json.loads(r.stdout)[0]["status"] == "crashed"


def test_ctrl_c_kills_session_and_child(project):
    write(project / "slow.py", """
        import os, time
        open("child.pid", "w").write(str(os.getpid()))
        print("started", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", "slow.py"],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 30
    while not (project / "child.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    child = int((project / "child.pid").read_text())
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert only_session(project).read()["status"] == "killed"


def test_events_log_under_concurrency(tmp_path):
    store = SessionStore(tmp_path)
    session = store.create(script="x.py")
    writer = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from trainctl.session import Session
        s = Session(Path({str(session.dir)!r}))
        w = int(sys.argv[1])
        for batch in range(50):
            s.append_events([{{"kind": "metric", "step": batch * 100 + i, "values": {{"w": w}}}} for i in range(100)])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(w)], env=clean_env()) for w in range(8)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = session.events_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line valid JSON
    seen = [(e["values"]["w"], e["step"]) for e in events if e["kind"] == "metric"]
    assert len(seen) == 8 * 5000 and len(set(seen)) == 8 * 5000


def test_a_session_being_created_is_never_seen_half_made(tmp_path):
    """`sessions list`, `latest` or a second node on a shared state dir, reading while a run
    starts, found the new folder before its session.json and called the session corrupt."""
    creator = textwrap.dedent(f"""
        from pathlib import Path
        from trainctl.session import SessionStore
        store = SessionStore(Path({str(tmp_path)!r}))
        for i in range(300):
            store.create(session_id=f"s{{i:04d}}", script="x.py")
    """)
    proc = subprocess.Popen([sys.executable, "-c", creator], env=clean_env())
    store = SessionStore(tmp_path)
    half_made = []
    while proc.poll() is None:
        for sid in store.ids():
            if not (store.sessions_dir / sid / "session.json").is_file():
                half_made.append(sid)
    assert proc.wait() == 0
    assert half_made == []
    assert len(store.ids()) == 300 and [p.name for p in store.sessions_dir.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(FileExistsError):
        store.create(session_id="s0000")
    assert store.get("s0000").read()["script"] == "x.py"


def test_torn_last_line_and_corrupt_session_are_skipped(project, cli):
    store = SessionStore(project / ".trainctl")
    good = store.create(status="completed", script="good.py")
    with open(good.events_path, "a") as f:
        f.write('{"kind": "metric", "step": 1, "val')  # a writer died mid-line
    bad = store.create(status="completed", script="bad.py")
    bad.json_path.write_text('{"id": "half-writ')
    r = cli("sessions", "list")
    assert r.returncode == 0
    assert good.id in r.stdout and "unreadable" in next(x for x in r.stdout.splitlines() if bad.id in x)
    assert "skipped" in r.stderr and bad.id in r.stderr
    assert list(good.iter_events()) and good.metrics() == []
    good.event("metric", step=2, values={"loss": 1.0})  # appending after a torn line still works
    with pytest.warns(TrainctlWarning, match="skipped a malformed record"):
        assert [e["step"] for e in good.metrics()] == [2]


def test_import_guard_keeps_heavy_packages_out():
    code = textwrap.dedent("""
        import sys, subprocess
        import trainctl
        from trainctl.cli import main as cli
        import trainctl.storage, trainctl.storage.s3, trainctl.storage.remote, trainctl.storage.bundle
        trainctl.storage.open_store("s3://some-bucket/x", endpoint_url="http://127.0.0.1:9")  # no client yet
        heavy = [m for m in ("torch", "lightning", "boto3", "botocore", "runpod", "tensorboard", "numpy", "matplotlib") if m in sys.modules]
        print(",".join(heavy))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env())
    assert r.stdout.strip() == ""
    for args in (["--help"], ["sessions", "list"], ["local", "--help"]):
        probe = textwrap.dedent(f"""
            import sys, runpy
            sys.argv = ["trainctl", *{args!r}]
            try:
                from trainctl.cli.main import cli
                cli.main(args=sys.argv[1:], standalone_mode=False)
            except SystemExit:
                pass
            heavy = [m for m in ("torch", "lightning", "boto3", "runpod", "tensorboard") if m in sys.modules]
            print("HEAVY=" + ",".join(heavy))
        """)
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           env=clean_env(), cwd=REPO)
        assert "HEAVY=\n" in r.stdout or r.stdout.rstrip().endswith("HEAVY="), (args, r.stdout, r.stderr)


def test_readme_and_local_help_list_every_variable(cli):
    readme = (REPO / "README.md").read_text()
    table = dict(re.findall(r"^\| `(TRAIN_OPS_\w+)` \| (.+?) \|$", readme, re.MULTILINE))
    assert table == env_mod.VARIABLES
    help_text = cli("local", "--help").stdout
    for name, meaning in env_mod.VARIABLES.items():
        assert name in help_text and meaning in help_text, name


def test_init_writes_config_and_refuses_to_overwrite(tmp_path):
    r = run_cli(["init"], tmp_path)
    assert r.returncode == 0 and (tmp_path / "trainctl.toml").exists()
    before = (tmp_path / "trainctl.toml").read_text()
    r = run_cli(["init"], tmp_path)
    assert r.returncode == 2 and "--force" in r.stderr
    assert (tmp_path / "trainctl.toml").read_text() == before
    assert run_cli(["init", "--force"], tmp_path).returncode == 0


BAD_INPUT = [
    # (name, args, files, exit code, message fragment)
    ("no script", ["local"], {}, 2, "Missing argument 'SCRIPT'"),
    ("missing script", ["local", "nope.py"], {}, 3, "nope.py does not exist"),
    ("directory", ["local", "data"], {"data/x.txt": "x"}, 3, "is a directory"),
    ("malformed toml", ["sessions", "list"], {"trainctl.toml": "checkpoint_dir = \n"}, 2, "trainctl.toml:1"),
    ("unknown key", ["sessions", "list"], {"trainctl.toml": "chekpoint_dir = 'x'\n"}, 2, "Did you mean 'checkpoint_dir'"),
    ("wrong type", ["sessions", "list"], {"trainctl.toml": "[retention]\nkeep_last_n = 'three'\n"}, 2, "trainctl.toml:2"),
    ("bad pattern", ["sessions", "list"], {"trainctl.toml": "[metrics]\npatterns = ['(?P<x>[0-9']\n"}, 2, "trainctl.toml:2: metrics pattern"),
    ("pattern without name", ["sessions", "list"], {"trainctl.toml": "[metrics]\npatterns = ['gnorm=([0-9.]+)']\n"}, 2, "no named group"),
    ("bad signal name", ["sessions", "list"], {"trainctl.toml": "[signals]\npreempt = ['SIGFOO']\n"}, 2, "unknown signal 'SIGFOO'"),
    ("bad checkpoint signal", ["sessions", "list"], {"trainctl.toml": "[signals]\ncheckpoint = ['SIGBAR']\n"}, 2, "'signals.checkpoint' has unknown signal 'SIGBAR'"),
    ("toml ends early", ["sessions", "list"], {"trainctl.toml": "a = 1\nstate_dir = [\n"}, 2, "trainctl.toml:2: malformed TOML"),
    ("unknown session", ["sessions", "show", "20990101"], {}, 3, "No session '20990101'"),
    ("negative restarts", ["local", "--max-restarts", "-1", "ok.py"], {"ok.py": "pass"}, 2, "--max-restarts"),
    ("bad restart-on", ["local", "--restart-on", "always", "ok.py"], {"ok.py": "pass"}, 2, "Valid: preempted, failed"),
    ("init exists", ["init"], {}, 2, "already exists"),
]


@pytest.mark.parametrize("name,args,files,code,fragment", BAD_INPUT, ids=[r[0] for r in BAD_INPUT])
def test_bad_input(project, name, args, files, code, fragment):
    for rel, text in files.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    r = run_cli(args, project)
    assert r.returncode == code, r.stderr
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == before


def test_resume_flag_among_script_args_is_verified_and_passed_on(project, cli):
    write(project / "argv.py", """
        import json, os, sys
        json.dump({"argv": sys.argv[1:], "env": os.environ.get("TRAIN_OPS_RESUME")}, open("seen.json", "w"))
        import argparse  # the script takes the flag: "--resume"
    """)
    from trainctl import checkpoint

    ckpt = project / "old.pt"
    checkpoint.save(ckpt, {"w": [1.0]}, {"step": 3, "script": str(project / "argv.py")})
    r = cli("local", "--no-preflight", "argv.py", "--lr", "0.1", "--resume", "old.pt")
    assert r.returncode == 0, r.stderr
    seen = json.loads((project / "seen.json").read_text())
    assert seen["argv"] == ["--lr", "0.1", "--resume", str(ckpt)]
    assert seen["env"] == str(ckpt)
    assert only_session(project).read()["resume_from"] == str(ckpt)
    r = cli("local", "--no-preflight", "argv.py", "--resume", "missing.pt")
    assert r.returncode == 3 and "missing.pt does not exist" in r.stderr


@pytest.mark.parametrize("body,status", [
    ("import sys\nsys.exit(3)", "failed"),
    ("raise KeyboardInterrupt", "killed"),
    ("import sys\nsys.exit(0)", "completed"),
])
def test_standalone_exit_paths_are_recorded(project, body, status):
    (project / "s.py").write_text("import trainctl\nrun = trainctl.init()\nrun.log({'loss': 1.0})\n" + body + "\n")
    subprocess.run([sys.executable, "s.py"], cwd=project, capture_output=True, env=clean_env(), timeout=60)
    assert only_session(project).read()["status"] == status


def test_failed_async_checkpoint_does_not_leave_the_session_running(project):
    write(project / "a.py", """
        import trainctl
        run = trainctl.init()
        run.save_checkpoint({"bad": lambda: 0}, step=1, blocking=False)  # can't be pickled
    """)
    subprocess.run([sys.executable, "a.py"], cwd=project, capture_output=True, env=clean_env(), timeout=60)
    session = only_session(project)
    assert session.read()["status"] == "completed"  # with the failure counted in its summary
    assert session.read()["summary"]["failed_saves"] == 1
    assert [e["step"] for e in session.iter_events(("checkpoint_failed",))] == [1]


def test_background_process_left_by_the_script_is_reaped(project, cli):
    write(project / "bg.py", """
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open("bg.pid", "w").write(str(p.pid))
    """)
    r = cli("local", "--no-preflight", "bg.py")
    assert r.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(int((project / "bg.pid").read_text()), 0)


def test_resume_auto_skips_checkpoints_of_running_sessions(project, cli):
    from trainctl import checkpoint, sysinfo

    write(project / "t.py", "import os\nprint('resume', os.environ.get('TRAIN_OPS_RESUME'))\n")
    store = SessionStore(project / ".trainctl")
    done = store.create(status="completed", script=str(project / "t.py"))
    live = store.create(status="running", script=str(project / "t.py"), processes=[
        {"pid": os.getpid(), "start_ticks": sysinfo.process_start_ticks(os.getpid()), "role": "script"}])
    older = project / "checkpoints" / done.id / "ckpt-step00000001.pt"
    checkpoint.save(older, {"w": [1.0]}, {"step": 1, "session_id": done.id, "script": str(project / "t.py")})
    time.sleep(0.01)
    newer = project / "checkpoints" / live.id / "ckpt-step00000009.pt"
    checkpoint.save(newer, {"w": [2.0]}, {"step": 9, "session_id": live.id, "script": str(project / "t.py")})
    r = cli("local", "--no-preflight", "--resume", "auto", "t.py")
    assert r.returncode == 0, r.stderr
    assert f"resume {older}" in r.stdout


def test_resume_auto_without_checkpoints_starts_fresh_even_without_the_flag(project, cli):
    (project / "plain.py").write_text("print('loss: 0.5')\n")
    r = cli("local", "--resume", "auto", "plain.py")
    assert r.returncode == 0, r.stderr
    assert "starting from scratch" in r.stderr


def test_failure_without_checkpoint_suggests_running_again_not_resuming(project, cli):
    (project / "crash.py").write_text("raise KeyError('x')\n")
    r = cli("local", "--no-preflight", "crash.py")
    assert r.returncode == 1
    assert "run again    trainctl local crash.py" in r.stderr and "checkpoint resume" not in r.stderr


def test_ambiguous_session_prefix_says_so(project, cli):
    store = SessionStore(project / ".trainctl")
    store.create(script="a.py")
    store.create(script="b.py")
    r = cli("sessions", "show", "20")
    assert r.returncode == 3 and "matches 2 sessions" in r.stderr and "No session" not in r.stderr
