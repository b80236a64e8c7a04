"""One malformed record (session.json field, events.jsonl line) never breaks a command: the bad
record is skipped with a warning naming file and line, a bad session shows as `unreadable`, and
every other session and command works. Through the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainctl.session import SessionStore

from .conftest import clean_env, run_cli

TRAIN = """
import torch
import trainctl

run = trainctl.init(total_steps=3)
model = torch.nn.Linear(2, 1)
run.track(model=model)
meta = run.restore()
for step in range((meta or {}).get("step") or 0, 3):
    run.log({"loss": 1.0 / (step + 1)}, step=step + 1)
run.save_checkpoint(step=3, metrics={"loss": 0.33})
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A project with one real standalone run (metrics and a checkpoint)."""
    root = tmp_path_factory.mktemp("base")
    (root / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    (root / "train.py").write_text(TRAIN)
    proc = subprocess.run([sys.executable, "train.py"], cwd=root, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return root


def _deep(n: int) -> str:
    return '{"kind": "metric", "step": 9, "values": ' + "[" * n + "]" * n + "}"


BAD_SESSION_JSON = [
    ("pid-string", {"processes": [{"pid": "abc"}]}, "'processes' is [{'pid': 'abc'}]"),
    ("pid-float", {"processes": [{"pid": 1.5}]}, "'processes' is [{'pid': 1.5}]"),
    ("pid-huge", {"processes": [{"pid": 2**70}]}, "'processes' is [{'pid': 1180591620717411303424}]"),
    ("started-string", {"started_at": "yesterday"}, "'started_at' is 'yesterday'"),
    ("summary-list", {"summary": [1, 2]}, "'summary' is [1, 2]"),
]

BAD_EVENT_LINES = [
    ("supersede", '{"kind":"supersede","attempt":"x","from_step":"y"}', "'attempt' is 'x'"),
    ("values-list", '{"kind":"metric","step":5,"values":[1,2]}', "'values' is [1, 2]"),
    ("path-number", '{"kind":"checkpoint","path":123,"step":3}', "'path' is 123"),
    ("step-string", '{"kind":"metric","step":"abc","values":{"loss":1}}', "'step' is 'abc'"),
    ("deep-json", _deep(100_000), "nested too deeply"),
    ("not-an-object", "[1, 2, 3]", "a list, not an object"),
]


def _copy(base: Path, tmp_path: Path) -> Path:
    project = tmp_path / "p"
    shutil.copytree(base, project, ignore=shutil.ignore_patterns("*.lock"))
    return project


def _good_id(project: Path) -> str:
    return SessionStore(project / ".trainctl").ids()[-1]


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "This is a bug" not in proc.stderr


@pytest.mark.parametrize(("case", "fields", "reason"), BAD_SESSION_JSON, ids=[c[0] for c in BAD_SESSION_JSON])
def test_bad_session_json_is_unreadable_and_nothing_else_breaks(base, tmp_path, case, fields, reason):
    project = _copy(base, tmp_path)
    good = _good_id(project)
    bad = SessionStore(project / ".trainctl").create(status="running", script=str(project / "train.py"))
    data = json.loads(bad.json_path.read_text())
    data.update(fields)
    bad.json_path.write_text(json.dumps(data))

    listing = run_cli(["sessions", "list"], project)
    _ok(listing)
    row = next(line for line in listing.stdout.splitlines() if bad.id in line)
    assert "unreadable" in row
    assert reason in listing.stderr and bad.id in listing.stderr
    assert any(good in line and "completed" in line for line in listing.stdout.splitlines())
    as_json = json.loads(run_cli(["sessions", "list", "--json"], project).stdout)
    assert {r["id"]: r["status"] for r in as_json}[bad.id] == "unreadable"

    shown = run_cli(["sessions", "show", bad.id], project)
    assert shown.returncode != 0 and reason in shown.stderr and "Traceback" not in shown.stderr
    for args in (["sessions", "show", good], ["monitor", good, "--once"], ["sessions", "plot", good],
                 ["checkpoint", "cleanup", "--keep-last-n", "1", "--dry-run"], ["checkpoint", "list"]):
        _ok(run_cli(args, project))
    resumed = run_cli(["local", "--quiet", "--resume", "auto", "train.py"], project)
    _ok(resumed)
    assert "resuming from" in resumed.stderr
    assert json.loads(bad.json_path.read_text())["processes" if "processes" in fields else next(iter(fields))] \
        == next(iter(fields.values()))  # nothing rewrote the bad file


@pytest.mark.parametrize(("case", "line", "reason"), BAD_EVENT_LINES, ids=[c[0] for c in BAD_EVENT_LINES])
def test_bad_event_line_is_skipped_with_file_and_line(base, tmp_path, case, line, reason):
    project = _copy(base, tmp_path)
    good = SessionStore(project / ".trainctl").get(_good_id(project))
    lines = good.events_path.read_text().splitlines()
    lines.insert(2, line)  # between good records: line 3 of the file
    good.events_path.write_text("\n".join(lines) + "\n")
    where = f"{good.events_path}:3: skipped a malformed record ({reason})"

    for args in (["sessions", "show", good.id], ["monitor", good.id, "--once"],
                 ["monitor", good.id, "--once", "--json"], ["sessions", "plot", good.id],
                 ["sessions", "list"]):
        proc = run_cli(args, project)
        _ok(proc)
        if args[:2] != ["sessions", "list"]:  # list reads session.json files only
            assert where in proc.stderr, (args, proc.stderr)
            assert proc.stderr.count("skipped a malformed record") == 1, (args, proc.stderr)
    shown = run_cli(["sessions", "show", good.id], project).stdout
    assert "loss 0.3333" in shown and "checkpoints     1" in shown
    _ok(run_cli(["local", "--quiet", "--resume", "auto", "train.py"], project))
