"""Every `trainctl ...` command in README.md's shell blocks does what the README says it does,
in the order the README gives them, in a project where `make demo` has run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO, clean_env, write_entry_point

pytestmark = pytest.mark.slow

# sections whose commands need a cloud account: their own tests run them, in order, against
# moto (tests/test_aws_e2e.py) and the fake RunPod API (tests/test_runpod_readme.py)
OWN_TESTS = {"AWS": "tests/test_aws_e2e.py", "RunPod": "tests/test_runpod_readme.py"}


def readme_commands(*, cloud: bool = False) -> list[str]:
    """The `trainctl ...` lines of README.md's bash blocks, in order; those of the cloud
    sections only with `cloud`."""
    text = (REPO / "README.md").read_text()
    commands = []
    for section in re.split(r"^## ", text, flags=re.MULTILINE):
        if (section.split("\n", 1)[0].strip() in OWN_TESTS) != cloud:
            continue
        for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
            for line in block.splitlines():
                command = re.split(r"\s{2,}#", line)[0].strip()
                if command.startswith("trainctl "):
                    commands.append(command)
    return commands


def make_demo_command() -> list[str]:
    """What `make demo` runs, with this checkout's CLI."""
    recipe = re.search(r"^demo:.*\n\t(.+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    argv = shlex.split(recipe)
    assert argv[0].endswith("/trainctl"), recipe
    return [sys.executable, "-m", "trainctl", *argv[1:]]


@dataclass
class Ran:
    """One README command as it ran: its output, and the project's files before and after."""

    command: str
    code: int
    out: str
    err: str
    project: Path
    before: set[str]
    after: set[str]

    @property
    def shown(self) -> str:
        return self.out + self.err

    def json(self):
        return json.loads(self.out)


def files(project: Path) -> set[str]:
    return {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file() and "tensorboard-views" not in str(p)}


def checkpoints(ran: Ran, when: str = "after") -> set[str]:
    return {f for f in getattr(ran, when) if f.startswith("checkpoints/") and not f.endswith(".json")}


def newest_session(project: Path) -> dict:
    sessions = sorted((project / ".trainctl" / "sessions").iterdir())
    return json.loads((sessions[-1] / "session.json").read_text())


# --- what each command is for, as the README says it --------------------------------------------

def lists_every_checkpoint(r: Ran) -> None:
    assert re.search(r"ckpt-step00000300\.pt\s+3\s+300 .*valid", r.out), r.out
    assert r.out.count("valid") == len(checkpoints(r))


def lists_the_latest_sessions_checkpoints_as_json(r: Ran) -> None:
    listed = r.json()
    latest = newest_session(r.project)["id"]
    assert listed and {c["session_id"] for c in listed} == {latest}
    assert all(c["status"] == "valid" for c in listed)


def lists_checkpoints_and_partial_files(r: Ran) -> None:
    for name in checkpoints(r):
        assert re.search(rf"{re.escape(name.split('/', 1)[1])}\s.*valid", r.out), (name, r.out)


def monitors_a_checkpoint_folder(r: Ran) -> None:
    assert re.search(r"^checkpoints \d+, newest checkpoints/\S+\.pt step \d+", r.out, re.MULTILINE), r.out


def monitors_a_log_and_a_checkpoint_folder(r: Ran) -> None:
    assert r.out.startswith("log .trainctl/sessions/") and re.search(r"^progress\s+epoch", r.out, re.MULTILINE)
    monitors_a_checkpoint_folder(r)


def backs_up_to_a_folder(r: Ran) -> None:
    session = newest_session(r.project)
    assert session["status"] == "completed"
    assert "synced: 1 checkpoint(s) uploaded, latest ckpt-step00000005.pt" in r.err, r.err
    copy = r.project / "backup" / r.project.name / session["id"]
    assert json.loads((copy / "latest.json").read_text())["file"] == "ckpt-step00000005.pt"


def reads_the_backup(r: Ran) -> None:
    session = newest_session(r.project)
    log = (r.project / ".trainctl" / "sessions" / session["id"] / "output.log").read_text()
    assert r.out and r.out.splitlines() == log.splitlines()[-3:], r.out


def monitors_the_backup(r: Ran) -> None:
    session = newest_session(r.project)
    assert r.out.startswith(f"session {session['id']}  completed"), r.out
    assert re.search(r"^progress\s+epoch 1/1 step 5/5", r.out, re.MULTILINE), r.out
    assert re.search(r"^storage\s+file://\S+/backup/\S+ \(released\)$", r.out, re.MULTILINE), r.out


def shows_epoch_step_and_metrics(r: Ran) -> None:
    assert re.search(r"^status:\s+valid$", r.out, re.MULTILINE), r.out
    assert re.search(r"^epoch:\s+\d+$", r.out, re.MULTILINE) and re.search(r"^step:\s+\d+$", r.out, re.MULTILINE)
    assert re.search(r"^metrics:\s+.*loss=", r.out, re.MULTILINE)


def verifies_every_checkpoint(r: Ran) -> None:
    assert r.out.count("valid: digest matches") == len(checkpoints(r)) > 0


def verifies_the_named_checkpoint(r: Ran) -> None:
    assert re.fullmatch(r"ok\s+last\.ckpt\s+valid: digest matches\n", r.out), r.out


def deletes_nothing(r: Ran) -> None:
    assert r.after >= r.before, r.before - r.after
    assert "Nothing to delete" in r.out or "Would delete" in r.out


def resume_trains_more_epochs(r: Ran) -> None:
    # after `make demo` (3 epochs, 300 steps) the resume trains epochs 4 and 5
    assert re.search(r"resuming from checkpoints/.*ckpt-step00000300\.pt \(session \S+, epoch 3, step 300\)", r.err), r.err
    assert "resumed      from epoch 3, step 300" in r.err and "reached epoch 5, step 500" in r.err, r.err
    assert "epoch 5/5 step 500/500" in r.out
    assert newest_session(r.project)["status"] == "completed"


def starts_in_the_background(r: Ran) -> None:
    m = re.search(r"Started session (\S+) in the background", r.out)
    assert m, r.out
    assert f"trainctl sessions attach {m.group(1)}" in r.out
    assert newest_session(r.project)["id"] == m.group(1)


def shows_the_last_lines(r: Ran) -> None:
    lines = r.out.splitlines()
    assert len(lines) <= 5
    log = (r.project / ".trainctl" / "sessions" / newest_session(r.project)["id"] / "output.log").read_text()
    assert all(line in log for line in lines)


def follows_to_the_end(r: Ran) -> None:
    session = newest_session(r.project)
    assert session["status"] == "completed"
    assert f"trainctl: session {session['id']} completed" in r.err
    assert "epoch 1/1 step 100/100" in r.out


def stops_it_or_says_it_ended(r: Ran) -> None:
    # the README's run above was followed to its end: stop says so; a running one ends `stopped`
    session = newest_session(r.project)
    assert (f"Session {session['id']} stopped" in r.out and session["status"] == "stopped") or \
        f"Session {session['id']} is not running (completed); nothing to stop." in r.out, r.out


def says_what_deleting_would_remove(r: Ran) -> None:
    session = newest_session(r.project)
    assert "Would delete 1 session(s)" in r.out and f"session {session['id']}" in r.out
    assert f"checkpoints/{session['id']}/" in r.out
    assert r.after == r.before


def shows_progress_and_metrics(r: Ran) -> None:
    session = newest_session(r.project)
    assert f"session {session['id']}" in r.out and "progress" in r.out and "loss" in r.out


def one_json_object(r: Ran) -> None:
    data = r.json()
    assert data["session"] == newest_session(r.project)["id"]
    session = newest_session(r.project)  # the backed-up run of "Cloud storage": 5 steps
    last = Path(session["summary"]["last_checkpoint"]).name
    assert f"ckpt-step{data['progress']['step']:08d}.pt" == last and "loss" in data["metrics"]


def parses_the_log(r: Ran) -> None:
    parsed = [json.loads(line) for line in r.out.splitlines()]
    assert parsed and all("values" in p for p in parsed)


def prints_the_tensorboard_command(r: Ran) -> None:
    argv = shlex.split(r.out)
    assert argv[1:3] == ["-m", "tensorboard.main"]
    view = Path(argv[argv.index("--logdir") + 1])
    session = newest_session(r.project)
    (link,) = view.iterdir()
    assert link.name.endswith(session["id"][-6:]) and os.readlink(link).endswith(f"{session['id']}/tensorboard")


def plots_the_loss(r: Ran) -> None:
    assert r.out.startswith("loss") and "step" in r.out and "●" in r.out


def writes_an_image(r: Ran) -> None:
    assert "loss.png" in r.after - r.before
    assert (r.project / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def compares_two_sessions(r: Ran) -> None:
    assert "differences" in r.out and "loss final" in r.out and "loss best" in r.out


def restarts_and_resumes_lightning(r: Ran) -> None:
    session = newest_session(r.project)
    assert session["status"] == "completed" and session["restart"]["max_restarts"] == 3
    assert any(f.endswith("last.ckpt") for f in checkpoints(r) - checkpoints(r, "before"))


def checks_pass(r: Ran) -> None:
    assert "pre-flight: all" in r.out and "checks passed" in r.out and "FAIL" not in r.out


def checks_as_json(r: Ran) -> None:
    data = r.json()
    assert data["ok"] is True and {c["name"] for c in data["results"]} >= {"script", "imports", "checkpoints"}


def diverges_after_a_checkpoint(r: Ran) -> None:
    assert r.code == 1
    assert "the loss became" in r.err and "trainctl checkpoint resume" in r.err
    assert len(checkpoints(r) - checkpoints(r, "before")) >= 1


def shows_what_happened(r: Ran) -> None:
    for label in ("what happened", "likely cause", "fix", "run"):
        assert re.search(rf"^{label}\s", r.out, re.MULTILINE), (label, r.out)
    assert "trainctl checkpoint resume" in r.out


def lists_the_templates(r: Ran) -> None:
    assert [line.split()[0] for line in r.out.splitlines()] == ["plain", "lightning", "hf"]
    assert r.after == r.before


def writes_the_plain_template(r: Ran) -> None:
    assert r.after - r.before == {"train.py"}, r.after - r.before
    assert "Wrote train.py (plain template)." in r.out and "Kept the existing trainctl.toml." in r.out
    assert "run.restore()" in (r.project / "train.py").read_text()


def trains_the_template(r: Ran) -> None:
    session = newest_session(r.project)
    assert session["status"] == "completed" and session["script"].endswith("/train.py")
    assert f"checkpoints/{session['id']}/ckpt-step00000040.pt" in r.after - r.before
    assert session["summary"]["checkpoints"] == 4 and "val_loss" in session["summary"]["best"]


def pipeline_sessions(project: Path, step: str | None = None) -> list[dict]:
    out = []
    for folder in sorted((project / ".trainctl" / "sessions").iterdir()):
        data = json.loads((folder / "session.json").read_text())
        link = data.get("pipeline") or {}
        if link.get("id") == "demo" and step in (None, link.get("step")):
            out.append(data)
    return out


def runs_the_three_steps(r: Ran) -> None:
    record = json.loads((r.project / ".trainctl" / "pipelines" / "demo.json").read_text())
    assert record["status"] == "completed"
    assert {n: s["state"] for n, s in record["steps"].items()} == dict.fromkeys(("pretrain", "finetune", "evaluate"), "completed")
    assert [len(pipeline_sessions(r.project, s)) for s in ("pretrain", "finetune", "evaluate")] == [1, 2, 1]
    (evaluate,) = pipeline_sessions(r.project, "evaluate")
    best = record["steps"]["finetune"]["outputs"]["best_checkpoint"]
    assert evaluate["args"] == ["--checkpoint", best] and f"[evaluate] evaluated {best}" in r.out


def shows_the_pipeline_steps(r: Ran) -> None:
    assert r.out.startswith("pipeline demo  completed")
    for step in ("pretrain", "finetune", "evaluate"):
        assert re.search(rf"^{step}\s+completed\s+\d+\s+\S+\s+val_loss ", r.out, re.MULTILINE), r.out
    assert re.search(r"^finetune .*\[lr=0\.0?\d+\]\s+checkpoints/", r.out, re.MULTILINE), r.out


def lists_the_pipeline(r: Ran) -> None:
    assert re.search(r"^demo\s+completed\s+3/3\s", r.out, re.MULTILINE), r.out


def lists_the_pipelines_sessions(r: Ran) -> None:
    ids = {s["id"] for s in pipeline_sessions(r.project)}
    listed = {line.split()[0] for line in r.out.splitlines()[1:]}
    assert len(ids) >= 4 and listed == ids, (listed, ids)
    assert "demo.finetune[lr=0.01]" in r.out and "demo.pretrain" in r.out


def compares_the_sweep(r: Ran) -> None:
    assert "differences" in r.out and re.search(r"lr\s.*0\.01.*0\.003", r.out), r.out


def reruns_only_evaluate(r: Ran) -> None:
    assert "step pretrain: up to date" in r.err and "step finetune: up to date" in r.err
    assert [len(pipeline_sessions(r.project, s)) for s in ("pretrain", "finetune", "evaluate")] == [1, 2, 2]


EXPECTED: list[tuple[str, Callable[[Ran], None]]] = [
    (r"checkpoint list$", lists_every_checkpoint),
    (r"checkpoint list --session latest --json$", lists_the_latest_sessions_checkpoints_as_json),
    (r"checkpoint list --all$", lists_checkpoints_and_partial_files),
    (r"checkpoint info .*\*\.pt", shows_epoch_step_and_metrics),
    (r"monitor --checkpoint checkpoints$", monitors_a_checkpoint_folder),
    (r"monitor --log .* --checkpoint checkpoints$", monitors_a_log_and_a_checkpoint_folder),
    (r"local --quiet --sync \./backup ", backs_up_to_a_folder),
    (r"sessions logs .*backup/.* --tail 3$", reads_the_backup),
    (r"monitor .*backup/.* --once$", monitors_the_backup),
    (r"checkpoint verify$", verifies_every_checkpoint),
    (r"checkpoint cleanup .*--dry-run", deletes_nothing),
    (r"checkpoint resume .* examples/quickstart\.py --epochs 5$", resume_trains_more_epochs),
    (r"local --detach ", starts_in_the_background),
    (r"sessions logs latest --tail 5$", shows_the_last_lines),
    (r"sessions attach latest$", follows_to_the_end),
    (r"sessions stop latest$", stops_it_or_says_it_ended),
    (r"sessions delete latest --checkpoints --dry-run$", says_what_deleting_would_remove),
    (r"monitor$", shows_progress_and_metrics),
    (r"monitor latest --once --json$", one_json_object),
    (r"monitor --log .* --parsed$", parses_the_log),
    (r"tensorboard latest --print-command$", prints_the_tensorboard_command),
    (r"sessions plot latest$", plots_the_loss),
    (r"sessions plot latest --metric val_loss --out loss\.png$", writes_an_image),
    (r"sessions compare latest~1 latest$", compares_two_sessions),
    (r"local --max-restarts 3 examples/lightning_quickstart\.py$", restarts_and_resumes_lightning),
    (r"checkpoint info .*last\.ckpt", shows_epoch_step_and_metrics),
    (r"checkpoint verify .*last\.ckpt", verifies_the_named_checkpoint),
    (r"check examples/quickstart\.py --epochs 3$", checks_pass),
    (r"check --json examples/quickstart\.py$", checks_as_json),
    (r"local examples/failing\.py --fail nan$", diverges_after_a_checkpoint),
    (r"sessions show latest$", shows_what_happened),
    (r"init --template list$", lists_the_templates),
    (r"init --template plain$", writes_the_plain_template),
    (r"local train\.py --steps 40 --eval-every 10$", trains_the_template),
    (r"pipeline run examples/pipeline\.toml$", runs_the_three_steps),
    (r"pipeline status demo$", shows_the_pipeline_steps),
    (r"pipeline list$", lists_the_pipeline),
    (r"sessions list --pipeline demo$", lists_the_pipelines_sessions),
    (r"sessions compare .*demo\.finetune", compares_the_sweep),
    (r"pipeline run examples/pipeline\.toml --from evaluate$", reruns_only_evaluate),
]
RUNS_UNTIL_STOPPED = (r"--follow", r"^trainctl tensorboard$")


def expectation(command: str) -> Callable[[Ran], None] | None:
    found = [check for pattern, check in EXPECTED if re.search(pattern, command)]
    assert len(found) <= 1, f"{command!r} matches {len(found)} expectations"
    return found[0] if found else None


def test_readme_has_commands():
    assert len(readme_commands()) > 10


def test_every_readme_command_states_its_effect():
    """A command added to the README gets a check of what it does (not only its exit code)."""
    missing = [c for c in readme_commands()
               if expectation(c) is None and not any(re.search(p, c) for p in RUNS_UNTIL_STOPPED)]
    assert missing == []


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory) -> Path:
    """A project where `make demo` has run."""
    project = tmp_path_factory.mktemp("readme")
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    (project / "examples").symlink_to(REPO / "examples")
    r = subprocess.run(make_demo_command(), cwd=project, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return project


def run_and_check(project: Path, command: str) -> None:
    """One README command in `project`, then the check of what it says it does."""
    bin_dir = write_entry_point(project.parent / "bin")
    env = clean_env(PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
                    COLUMNS="120")
    before = files(project)
    r = subprocess.run(["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    ran = Ran(command, r.returncode, r.stdout, r.stderr, project, before, files(project))
    if "examples/failing.py" not in command:  # its own traceback is part of what it shows
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == 0, r.stdout + r.stderr
    check = expectation(command)
    assert check is not None
    check(ran)


@pytest.fixture(scope="module")
def readme_runs(demo_project) -> list[BaseException | None]:
    """Every command, in the README's order, each checked right after it ran (a later command
    reads what an earlier one wrote). Done once per process, whichever of the tests below asks
    first, so the order holds however pytest-xdist spreads the tests over its workers."""
    outcomes: list[BaseException | None] = []
    for command in readme_commands():
        if any(re.search(p, command) for p in RUNS_UNTIL_STOPPED):
            outcomes.append(None)
            continue
        try:
            run_and_check(demo_project, command)
            outcomes.append(None)
        except (AssertionError, subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
            outcomes.append(e)
    return outcomes


@pytest.mark.parametrize("index", range(len(readme_commands())), ids=readme_commands())
def test_readme_command_does_what_it_says(readme_runs, index):
    command = readme_commands()[index]
    if any(re.search(p, command) for p in RUNS_UNTIL_STOPPED):
        pytest.skip("runs until stopped")
    failure = readme_runs[index]
    if failure is not None:
        raise failure


def test_the_cloud_sections_are_run_by_their_own_tests():
    """The AWS and RunPod commands are left out above: each section's own test runs them."""
    cloud = readme_commands(cloud=True)
    assert any(c.startswith("trainctl aws ") for c in cloud) and any(c.startswith("trainctl runpod ") for c in cloud)
    assert not any(c.startswith(("trainctl aws ", "trainctl runpod ")) for c in readme_commands())
    for test in OWN_TESTS.values():
        assert "README" in (REPO / test).read_text()
