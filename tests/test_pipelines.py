"""`trainctl pipeline`: steps as sessions, outputs passed on, matrix sweeps, re-runs that skip
what is done and resume what stopped, and pipeline files checked before anything runs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainctl.session import Session, SessionStore, effective_status

from .conftest import EXAMPLES, REPO, clean_env, run_cli

TRAIN = str(EXAMPLES / "pipeline_train.py")
EVALUATE = str(EXAMPLES / "pipeline_evaluate.py")


def step_sessions(project: Path, pipeline_id: str, step: str) -> list[dict]:
    """The step's sessions, oldest first, by the pipeline link in their session.json."""
    records, _ = SessionStore(project / ".trainctl").list()
    return sorted((r for r in records if (r.get("pipeline") or {}).get("id") == pipeline_id
                   and r["pipeline"]["step"] == step), key=lambda r: r["id"])


def record(project: Path, pipeline_id: str) -> dict:
    return json.loads((project / ".trainctl" / "pipelines" / f"{pipeline_id}.json").read_text())


def three_steps(finetune_args: str = '"--steps", "20", "--eval-every", "10"', parallel: int = 2) -> str:
    return f"""
name = "three"

[steps.pretrain]
script = "{TRAIN}"
args = ["--steps", "10", "--eval-every", "5"]

[steps.finetune]
script = "{TRAIN}"
needs = ["pretrain"]
args = [{finetune_args}, "--init-from", "{{steps.pretrain.best_checkpoint}}", "--lr", "{{matrix.lr}}"]
matrix = {{lr = [0.01, 0.003]}}
parallel = {parallel}
select = {{metric = "val_loss", mode = "min"}}

[steps.evaluate]
script = "{EVALUATE}"
needs = ["finetune"]
args = ["--checkpoint", "{{steps.finetune.best.checkpoint}}"]
"""


@pytest.mark.slow
def test_three_step_pipeline_runs_and_passes_checkpoints_on(project):
    (project / "pipeline.toml").write_text(three_steps())
    r = run_cli(["pipeline", "run", "pipeline.toml"], project, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = record(project, "three")
    assert rec["status"] == "completed"
    assert [s["state"] for s in rec["steps"].values()] == ["completed"] * 3

    (pretrain,) = step_sessions(project, "three", "pretrain")
    finetunes = step_sessions(project, "three", "finetune")
    (evaluate,) = step_sessions(project, "three", "evaluate")
    assert {f["pipeline"]["instance"] for f in finetunes} == {"lr=0.01", "lr=0.003"}
    # each fine-tune started from pretrain's best checkpoint by val_loss
    best_pretrain = rec["steps"]["pretrain"]["outputs"]["best_checkpoint"]
    assert Path(best_pretrain).parent.name == pretrain["id"]
    for f in finetunes:
        assert f["args"][f["args"].index("--init-from") + 1] == best_pretrain
        assert f["args"][f["args"].index("--lr") + 1] == f["pipeline"]["combo"]["lr"].__str__()
    # evaluate got the checkpoint of the fine-tune with the lowest val_loss
    best_val = {f["pipeline"]["instance"]: f["summary"]["best"]["val_loss"]["value"] for f in finetunes}
    winner = min(best_val, key=best_val.get)
    assert rec["steps"]["finetune"]["best_instance"] == winner
    chosen = evaluate["args"][evaluate["args"].index("--checkpoint") + 1]
    winner_session = next(f for f in finetunes if f["pipeline"]["instance"] == winner)
    assert Path(chosen).parent.name == winner_session["id"]
    assert evaluate["summary"]["last"]["val_loss"] == pytest.approx(best_val[winner])

    # sessions list --pipeline shows exactly the four
    listed = run_cli(["sessions", "list", "--pipeline", "three", "--json"], project)
    assert listed.returncode == 0, listed.stderr
    assert sorted(s["id"] for s in json.loads(listed.stdout)) == sorted(
        [pretrain["id"], evaluate["id"], *(f["id"] for f in finetunes)])
    status = run_cli(["pipeline", "status", "three"], project)
    assert status.returncode == 0, status.stderr
    lines = {line.split()[0]: line for line in status.stdout.splitlines()[2:] if line.strip()}
    assert "completed" in lines["pretrain"] and f"[{winner}]" in lines["finetune"]
    assert "val_loss" in lines["finetune"] and "checkpoints/" + winner_session["id"] in lines["finetune"]
    assert "continue" not in status.stdout

    # a second run: everything up to date, nothing started
    again = run_cli(["pipeline", "run", "pipeline.toml"], project, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("up to date") == 3
    assert len(SessionStore(project / ".trainctl").ids()) == 4

    # --from finetune: finetune and evaluate again, pretrain kept
    forced = run_cli(["pipeline", "run", "pipeline.toml", "--from", "finetune", "-q"], project, timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert len(step_sessions(project, "three", "pretrain")) == 1
    assert len(step_sessions(project, "three", "finetune")) == 4
    assert len(step_sessions(project, "three", "evaluate")) == 2
    listing = run_cli(["pipeline", "list"], project)
    assert listing.stdout.splitlines()[1].split()[:3] == ["three", "completed", "3/3"]


def wait_for(condition, timeout: float = 120, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the pipeline ended first: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def running_finetune_with_a_checkpoint(project: Path):
    for f in step_sessions(project, "three", "finetune"):
        session = Session(project / ".trainctl" / "sessions" / f["id"])
        if f["status"] == "running" and any(session.iter_events(("checkpoint",))):
            return f
    return None


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_killed_during_step_two_continues_it_without_redoing_step_one(project, signum):
    slow = '"--steps", "60", "--eval-every", "5", "--step-delay", "0.05"'
    (project / "pipeline.toml").write_text(three_steps(slow, parallel=1))
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "pipeline", "run", "-q", "pipeline.toml"],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = wait_for(lambda: running_finetune_with_a_checkpoint(project), proc=proc)
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if signum == signal.SIGTERM:
        assert proc.returncode == 130, err
        assert record(project, "three")["status"] == "interrupted"
    # the script ends too (an emergency checkpoint on the way) before the pipeline goes on
    stopped = Session(project / ".trainctl" / "sessions" / victim["id"])
    wait_for(lambda: effective_status(stopped.read()) != "running")
    status = run_cli(["pipeline", "status"], project)
    assert "interrupted" in status.stdout and "trainctl pipeline run pipeline.toml" in status.stdout, status.stdout

    again = run_cli(["pipeline", "run", "pipeline.toml"], project, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "step pretrain: up to date" in again.stderr
    assert len(step_sessions(project, "three", "pretrain")) == 1
    mine = [f for f in step_sessions(project, "three", "finetune")
            if f["pipeline"]["instance"] == victim["pipeline"]["instance"]]
    assert len(mine) == 2 and mine[0]["id"] == victim["id"]
    resumed = mine[1]
    assert resumed["status"] == "completed"
    assert Path(resumed["resume_from"]).parent.name == victim["id"]  # its own checkpoint, verified
    assert f"resuming from {resumed['resume_from']}" in again.stderr
    metrics = Session(project / ".trainctl" / "sessions" / resumed["id"]).metrics()
    first_step = min(e["step"] for e in metrics if "loss" in e["values"])
    assert first_step > 1  # continued, not started over
    assert record(project, "three")["status"] == "completed"


def test_failed_step_says_how_to_continue_and_continues(project):
    flaky = project / "flaky.py"
    flaky.write_text("import pathlib, sys\nimport trainctl\nrun = trainctl.init()\n"
                     "run.log({'val_loss': 1.0}, step=1)\n"
                     "sys.exit(3 if pathlib.Path('broken').exists() else 0)\n")
    (project / "pipeline.toml").write_text(f"""
[steps.pretrain]
script = "{TRAIN}"
args = ["--steps", "5", "--eval-every", "5"]
[steps.check]
script = "flaky.py"
needs = ["pretrain"]
args = ["--from-step", "{{steps.pretrain.session_id}}", "--loss", "{{steps.pretrain.metrics.val_loss}}"]
""")
    (project / "broken").write_text("")
    r = run_cli(["pipeline", "run", "-q", "pipeline.toml"], project, timeout=300)
    assert r.returncode == 1
    assert "failed at step check; continue" in r.stdout and "trainctl pipeline run pipeline.toml" in r.stdout
    assert re.search(r"^step check: session (\S+) failed: trainctl sessions show \1$", r.stdout, re.MULTILINE), r.stdout
    rec = record(project, "pipeline")
    assert rec["status"] == "failed" and rec["steps"]["check"]["state"] == "failed"
    (check,) = step_sessions(project, "pipeline", "check")
    (pretrain,) = step_sessions(project, "pipeline", "pretrain")
    assert check["args"][1] == pretrain["id"]
    assert float(check["args"][3]) == pretrain["summary"]["best"]["val_loss"]["value"]
    (project / "broken").unlink()
    r = run_cli(["pipeline", "run", "-q", "pipeline.toml"], project, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(step_sessions(project, "pipeline", "pretrain")) == 1
    assert len(step_sessions(project, "pipeline", "check")) == 2
    only = run_cli(["pipeline", "run", "-q", "pipeline.toml", "--only", "check", "--from", "check"], project, timeout=300)
    assert only.returncode == 0, only.stderr
    assert len(step_sessions(project, "pipeline", "pretrain")) == 1
    assert len(step_sessions(project, "pipeline", "check")) == 3


# --- bad pipeline files: one error each, with file and line, before anything runs -------------

GOOD_STEP = f'[steps.a]\nscript = "{TRAIN}"\n'
BAD_FILES = [
    # (name, text, line, error)
    ("unknown step in needs", GOOD_STEP + f'[steps.b]\nscript = "{TRAIN}"\nneeds = ["a", "pretrain"]\n', 5,
     "step b needs 'pretrain', which is not a step. Steps: a, b."),
    ("cycle", f'[steps.a]\nscript = "{TRAIN}"\nneeds = ["c"]\n[steps.b]\nscript = "{TRAIN}"\nneeds = ["a"]\n'
              f'[steps.c]\nscript = "{TRAIN}"\nneeds = ["b"]\n', 6, "steps form a cycle through needs: a -> c -> b -> a."),
    ("needs itself", GOOD_STEP + 'needs = ["a"]\n', 3, "step a needs itself."),
    ("reference to a step not needed", GOOD_STEP + f'[steps.b]\nscript = "{TRAIN}"\n'
     'args = ["--init-from", "{steps.a.best_checkpoint}"]\n', 5,
     "step b: {steps.a.best_checkpoint} uses step a's outputs, but b does not need a, so it may run first."),
    ("reference to an output no step gives", GOOD_STEP + f'[steps.b]\nscript = "{TRAIN}"\nneeds = ["a"]\n'
     'args = ["--x", "{steps.a.best_model}"]\n', 6,
     "step b: {steps.a.best_model} asks for 'best_model', which a step does not produce. "
     "Valid: best_checkpoint, last_checkpoint, session_dir, session_id, checkpoint, metrics.NAME."),
    ("reference to an unknown step", GOOD_STEP + 'args = ["{steps.nope.last_checkpoint}"]\n', 3,
     "step a: {steps.nope.last_checkpoint} names step 'nope', which does not exist. Steps: a."),
    ("reference to its own outputs", GOOD_STEP + 'args = ["{steps.a.last_checkpoint}"]\n', 3,
     "step a: {steps.a.last_checkpoint} refers to the step's own outputs, which do not exist before it runs."),
    ("unknown matrix key", GOOD_STEP + 'args = ["--lr", "{matrix.lr}"]\nmatrix = {wd = [0.1]}\n', 3,
     "step a: {matrix.lr} names matrix key 'lr', which this step's matrix does not have."),
    ("malformed reference", GOOD_STEP + 'args = ["{pretrain.ckpt}"]\n', 3,
     "step a: {pretrain.ckpt} is not a reference trainctl knows."),
    ("unknown step key", GOOD_STEP + 'argz = ["--lr", "1"]\n', 3,
     "step a: unknown key 'argz'. Valid: script, args, needs, backend, resources, matrix, parallel, select, max_restarts."),
    ("unknown top-level key", 'name = "p"\nstep = 1\n' + GOOD_STEP, 2,
     "unknown key 'step'. Valid at the top: name, steps."),
    ("missing script", GOOD_STEP + '[steps.b]\nscript = "nowhere.py"\n', 4,
     "step b: script nowhere.py does not exist (looked for {root}/nowhere.py)."),
    ("quoted step table, key further down", GOOD_STEP + '\n# the second step\n[ steps."b" ]\nneeds = ["a"]\n'
     'script = "gone.py"\n', 7, "step b: script gone.py does not exist (looked for {root}/gone.py)."),
    ("no script key", GOOD_STEP + '[steps.b]\nargs = []\n', 3,
     "step b: script is missing or not a string."),
    ("unknown backend", GOOD_STEP + 'backend = "gcp"\n', 3,
     "step a: backend 'gcp' is unknown. Valid: local, aws, runpod."),
    ("bad select mode", GOOD_STEP + 'select = {metric = "acc", mode = "up"}\n', 3,
     "step a: select mode must be min or max, not 'up'."),
    ("bad parallel", GOOD_STEP + 'parallel = 0\n', 3,
     "step a: parallel must be a whole number of 1 or more, not 0."),
    ("unknown resource", GOOD_STEP + 'resources = {gpu = 1}\n', 3,
     "step a: resources has unknown key 'gpu'. Valid here: nproc_per_node, gpus."),
    ("bad resource value", GOOD_STEP + 'resources = {nproc_per_node = 0}\n', 3,
     "step a: resources nproc_per_node must be a whole number of 1 or more, not 0."),
    ("not TOML", GOOD_STEP + 'args = [\n', 3, None),
    ("no steps", 'name = "x"\n', 1, "the pipeline has no steps."),
]


@pytest.mark.parametrize("name,text,line,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_pipeline_files_get_one_error_with_file_and_line(project, name, text, line, message):
    (project / "bad.toml").write_text(text)
    r = run_cli(["pipeline", "run", "bad.toml"], project)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint: "), r.stderr
    prefix = f"error: bad.toml:{line}: "
    assert lines[0].startswith(prefix), (lines[0], prefix)
    if message is not None:
        assert lines[0] == prefix + message.replace("{root}", str(project)), lines[0]
    assert not (project / ".trainctl").exists() and not (project / "checkpoints").exists()


@pytest.mark.parametrize("args,message", [
    (["pipeline", "run", "missing.toml"], "error: pipeline file missing.toml does not exist."),
    (["pipeline", "run", "ok.toml", "--from", "nope"], "error: --from nope: no such step in ok.toml. Steps: a."),
    (["pipeline", "run", "ok.toml", "--only", "nope"], "error: --only nope: no such step in ok.toml. Steps: a."),
    (["pipeline", "status", "nope"], "error: no pipeline 'nope' in this project."),
    (["pipeline", "status"], "error: no pipelines have run in this project."),
])
def test_bad_pipeline_commands(project, args, message):
    (project / "ok.toml").write_text(GOOD_STEP)
    r = run_cli(args, project)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == message and r.stderr.splitlines()[1].startswith("hint: "), r.stderr
    assert not (project / ".trainctl" / "sessions").exists()


def test_pipeline_list_empty_and_help_is_light(project):
    r = run_cli(["pipeline", "list"], project)
    assert r.returncode == 0 and r.stdout.startswith("No pipelines yet."), r.stderr
    code = ("import sys; from trainctl.cli.main import cli\n"
            "try:\n    cli(['pipeline', 'run', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'lightning', 'boto3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert out.stdout.strip().endswith("[]"), out.stdout + out.stderr


# --- cheap steps (no torch): matrix expansion, what counts as "the same", --only ------------------

ECHO = """import sys
import trainctl
run = trainctl.init()
run.log({"val_loss": float(sys.argv[sys.argv.index("--loss") + 1]) if "--loss" in sys.argv else 1.0}, step=1)
print("argv", sys.argv[1:])
"""


def test_matrix_runs_every_combination_and_reruns_what_changed(project):
    (project / "echo.py").write_text(ECHO)
    (project / "p.toml").write_text("""
[steps.first]
script = "echo.py"
args = ["--loss", "0.5"]
[steps.grid]
script = "echo.py"
needs = ["first"]
args = ["--loss", "{matrix.loss}", "--after", "{steps.first.session_id}"]
matrix = {loss = [0.3, 0.1], wd = [0, 1]}
parallel = 2
""")
    r = run_cli(["pipeline", "run", "p.toml"], project, timeout=300)
    assert r.returncode == 0, r.stderr
    grid = step_sessions(project, "p", "grid")
    (first,) = step_sessions(project, "p", "first")
    assert sorted(g["pipeline"]["instance"] for g in grid) == ["loss=0.1,wd=0", "loss=0.1,wd=1",
                                                               "loss=0.3,wd=0", "loss=0.3,wd=1"]
    for g in grid:  # the key the args don't name comes as --wd VALUE
        combo = g["pipeline"]["combo"]
        assert g["args"] == ["--loss", str(combo["loss"]), "--after", first["id"], "--wd", str(combo["wd"])]
    rec = record(project, "p")
    assert rec["steps"]["grid"]["best_instance"].startswith("loss=0.1")  # val_loss, min
    assert rec["steps"]["grid"]["outputs"]["select"] == {"metric": "val_loss", "mode": "min", "value": 0.1}
    shown = json.loads(run_cli(["pipeline", "status", "--json"], project).stdout)
    assert shown["id"] == "p" and shown["status"] == "completed"

    # a changed matrix: only the new combination runs
    (project / "p.toml").write_text((project / "p.toml").read_text().replace("wd = [0, 1]", "wd = [0, 1, 2]"))
    r = run_cli(["pipeline", "run", "-q", "p.toml"], project, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "step grid: 2 session(s) to run, 4 up to date" in r.stderr
    assert len(step_sessions(project, "p", "first")) == 1 and len(step_sessions(project, "p", "grid")) == 6

    # a changed script: everything that runs it again, the steps after with the new inputs
    (project / "echo.py").write_text(ECHO + "# changed\n")
    r = run_cli(["pipeline", "run", "-q", "p.toml"], project, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(step_sessions(project, "p", "first")) == 2 and len(step_sessions(project, "p", "grid")) == 12


def test_only_needs_its_inputs_done(project):
    (project / "echo.py").write_text(ECHO)
    (project / "p.toml").write_text("""
[steps.a]
script = "echo.py"
[steps.b]
script = "echo.py"
needs = ["a"]
args = ["--dir", "{steps.a.session_dir}"]
""")
    r = run_cli(["pipeline", "run", "p.toml", "--only", "b"], project, timeout=300)
    assert r.returncode == 1
    assert "step b needs the outputs of step a, which has not completed." in r.stderr
    assert "step b: step b needs the outputs of step a, which has not completed." in r.stdout
    assert "failed at step b" in r.stdout and not step_sessions(project, "p", "b")
    r = run_cli(["pipeline", "run", "p.toml", "--only", "a"], project, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [len(step_sessions(project, "p", s)) for s in "ab"] == [1, 0]
    r = run_cli(["pipeline", "run", "p.toml", "--only", "b"], project, timeout=300)
    assert r.returncode == 0, r.stderr
    (a,) = step_sessions(project, "p", "a")
    (b,) = step_sessions(project, "p", "b")
    assert b["args"] == ["--dir", str(project / ".trainctl" / "sessions" / a["id"])]
