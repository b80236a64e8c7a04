"""Secrets given on the command line (or put in a run's config) never reach a file trainctl
writes or a line it prints, whatever happens to the run (issue 13 #3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainctl.redact import REDACTED, redact_args, redact_command_text, redact_mapping
from trainctl.session import Session, SessionStore

from .conftest import clean_env

SECRETS = {
    "api_key": "sk-test-Secret1abcdef",
    "password": "hunter2Secretpw",
    "hf_token": "hf_SecretTokenValue9",
    "db_passwd": "dbSecretPasswd77",
    "extra_api_key": "extraSecretKey55",
    "env": "envSecretValue31",
}
SECRET_ARGS = [f"--api-key={SECRETS['api_key']}", "--password", SECRETS["password"],
               f"--hf_token={SECRETS['hf_token']}", "--db-passwd", SECRETS["db_passwd"]]

SCRIPT = """
    import argparse, os, sys, time
    import torch
    import trainctl

    p = argparse.ArgumentParser()
    for flag in ("--api-key", "--password", "--hf_token", "--db-passwd", "--resume"):
        p.add_argument(flag)
    p.add_argument("--crash", action="store_true")
    p.add_argument("--wait", action="store_true")
    args = p.parse_args()
    config = {**vars(args), "extra": ["lr=0.1", "extra_api_key=EXTRA"],
              "nested": {"overrides": ["--lr", "0.1", "--password", "EXTRA"]}}
    run = trainctl.init(config=config)
    model = torch.nn.Linear(2, 1)
    run.track(model=model)
    meta = run.restore()
    start = meta["step"] if meta else 0
    for step in range(start + 1, start + 3):
        run.log({"loss": 1.0 / step}, step=step)
        run.save_checkpoint(step=step, metrics={"loss": 1.0 / step})
    if args.crash:
        raise RuntimeError("the data loader broke")
    if args.wait:
        print("waiting", flush=True)
        while True:
            time.sleep(0.05)
            run.log({"loss": 0.1}, step=start + 3)
""".replace("EXTRA", SECRETS["extra_api_key"])


def secret_env() -> dict[str, str]:
    return clean_env(MY_SERVICE_TOKEN=SECRETS["env"], TMPDIR=os.environ.get("_SECRETS_TMP", ""))


def leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


def sessions(project: Path) -> list[Session]:
    store = SessionStore(project / ".trainctl")
    return [Session(store.sessions_dir / i) for i in store.ids()]


def wait_for(predicate, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s  # a bound for a hung run, not a speed assertion
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_secrets_reach_no_file_and_no_screen(project: Path, monkeypatch) -> None:
    tmp = project / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("_SECRETS_TMP", str(tmp))  # crash reports land inside the project
    (project / "secret.py").write_text(textwrap.dedent(SCRIPT))
    printed: list[str] = []

    def cli(*args: str, expect: int | None = 0, **kw) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "trainctl", *args], cwd=project, env=secret_env(),
                           capture_output=True, text=True, timeout=180, **kw)
        printed.append(f"{r.stdout}\n{r.stderr}")
        if expect is not None:
            assert r.returncode == expect, r.stdout + r.stderr
        return r

    # a run that crashes, is restarted with the resume flag, and fails for good: restart lines,
    # diagnosis, summary and resume command
    r = cli("local", "--max-restarts", "2", "--restart-delay", "0", "secret.py", *SECRET_ARGS, "--crash",
            expect=1)
    assert "resume" in r.stderr and "***" in r.stderr
    assert "original values" in r.stderr  # the printed command names what the user must fill in
    cli("local", "--dry-run", "secret.py", *SECRET_ARGS)
    cli("check", "secret.py", *SECRET_ARGS)
    cli("local", "--resume", "auto", "--no-preflight", "secret.py", *SECRET_ARGS)

    # a detached run, stopped: the stop's summary
    cli("local", "--detach", "secret.py", *SECRET_ARGS, "--wait")
    detached = sessions(project)[0]
    wait_for(lambda: b"waiting" in detached.output_log.read_bytes(), "the detached run to start")
    cli("sessions", "stop", detached.id, "--grace-period", "60")

    # a launcher killed with SIGKILL: the script records its own end and prints how to resume
    before = len(sessions(project))
    launcher = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", "secret.py",
                                 *SECRET_ARGS, "--wait"], cwd=project, env=secret_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(sessions(project)) > before and sessions(project)[0].output_log.exists()
             and b"waiting" in sessions(project)[0].output_log.read_bytes(), "the launched run to start")
    killed = sessions(project)[0]
    launcher.kill()
    out, err = launcher.communicate(timeout=60)
    printed.append(out + err)
    wait_for(lambda: killed.read().get("status") == "preempted", "the orphaned script to record its end")

    # a standalone run stopped with SIGTERM (emergency checkpoint, resume command printed)
    alone = subprocess.Popen([sys.executable, "secret.py", *SECRET_ARGS, "--wait"], cwd=project,
                             env=secret_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert alone.stdout is not None
    assert alone.stdout.readline().strip() == "waiting"
    alone.send_signal(signal.SIGTERM)
    out, err = alone.communicate(timeout=120)
    printed.append(out + err)
    assert alone.returncode == 75, err

    # every reader of what was recorded
    newest = sorted((project / "checkpoints").rglob("*.pt"))[-1]
    for args in (["sessions", "list"], ["sessions", "list", "--json"], ["sessions", "show", "latest"],
                 ["sessions", "show", "latest", "--json"], ["sessions", "show", detached.id],
                 ["sessions", "show", killed.id], ["sessions", "logs", killed.id],
                 ["sessions", "compare", "latest~1", "latest"], ["checkpoint", "list", "--json"],
                 ["checkpoint", "info", str(newest)], ["checkpoint", "info", "--json", str(newest)],
                 ["monitor", "latest", "--once", "--json"]):
        cli(*args)

    # trainctl's own crash report (an unexpected error) records the command line it ran with
    crash = ("import sys, click\nfrom trainctl.cli.errors import run_cli\n"
             "@click.command(context_settings={'ignore_unknown_options': True})\n"
             "@click.argument('args', nargs=-1, type=click.UNPROCESSED)\n"
             "def cmd(args):\n    raise RuntimeError('unexpected')\n"
             f"sys.argv = ['trainctl', 'local', 'secret.py', *{SECRET_ARGS!r}]\n"
             "sys.exit(run_cli(cmd, sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", crash], cwd=project, env=secret_env(), capture_output=True,
                       text=True, timeout=60)
    printed.append(r.stdout + r.stderr)
    assert r.returncode == 1 and "Full report:" in r.stderr
    report = Path(r.stderr.split("Full report: ")[1].split()[0])
    assert report.is_file() and report.is_relative_to(tmp)
    assert "secret.py" in report.read_text() and REDACTED in report.read_text()

    on_screen = "\n".join(printed)
    assert leaks(on_screen) == [], [line for line in on_screen.splitlines() if leaks(line)][:10]
    found = {}
    for path in project.rglob("*"):
        if path.is_file() and path.name != "secret.py":
            hits = leaks(path.read_bytes().decode("latin-1"))
            if hits:
                found[str(path.relative_to(project))] = hits
    assert found == {}
    # what the redaction left is still useful: the flags, and the values that are not secret
    data = json.loads((sessions(project)[-1].json_path).read_text())
    assert data["config"]["extra"] == ["lr=0.1", "extra_api_key=***"]
    assert data["config"]["nested"]["overrides"] == ["--lr", "0.1", "--password", "***"]


@pytest.mark.parametrize(("args", "expected"), [
    (["--api-key=sk-1", "--lr", "1"], ["--api-key=***", "--lr", "1"]),
    (["--password", "p", "--epochs", "3"], ["--password", "***", "--epochs", "3"]),
    (["--hf_token=t", "--db-passwd", "d"], ["--hf_token=***", "--db-passwd", "***"]),
    (["extra_api_key=k", "lr=0.1"], ["extra_api_key=***", "lr=0.1"]),
    (["--token", "--lr", "1"], ["--token", "--lr", "1"]),  # a flag without its value: nothing to hide
    (["--secret-file", "s.json"], ["--secret-file", "***"]),
    (["-p", "x", "--lr=-1", "--token", "-5"], ["-p", "x", "--lr=-1", "--token", "***"]),
])
def test_redact_args(args, expected):
    assert redact_args(args) == expected


def test_redact_mapping_covers_lists_and_strings():
    config = {"lr": 0.1, "api_key": "k", "tags": ["a", "extra_api_key=k2", "--password=p"],
              "argv": ["--token", "t", "--lr", "1"], "nested": [{"hf_token": "t"}, ("AUTH_HEADER=Bearer x",)],
              "empty_token": "", "note": "lr=0.1 then 0.01"}
    assert redact_mapping(config) == {
        "lr": 0.1, "api_key": REDACTED, "tags": ["a", "extra_api_key=***", "--password=***"],
        "argv": ["--token", REDACTED, "--lr", "1"], "nested": [{"hf_token": REDACTED}, ["AUTH_HEADER=***"]],
        "empty_token": "", "note": "lr=0.1 then 0.01"}


def test_redact_command_text():
    line = "python train.py --api-key=sk-1 --password hunter2 --lr 0.1 HF_TOKEN=abc"
    assert redact_command_text(line) == "python train.py --api-key=*** --password *** --lr 0.1 HF_TOKEN=***"


def test_a_diagnosis_that_quotes_the_command_line_hides_its_secrets():
    from trainctl.launcher.diagnose import diagnose

    output = ("usage: train.py [-h] [--lr LR]\n"
              "train.py: error: unrecognized arguments: --api-key=sk-live-123 --password hunter2\n")
    found = diagnose(output, exit_code=2, script="train.py", args=["--api-key=sk-live-123", "--password", "hunter2"],
                     checkpoint="ckpt.pt")
    assert found is not None and found.kind == "arguments"
    text = " ".join(filter(None, (found.what, found.cause, found.fix, found.command)))
    assert "sk-live-123" not in text and "hunter2" not in text
    assert "unrecognized arguments: --api-key=*** --password ***" in found.what
