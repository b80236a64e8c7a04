"""`trainctl init --template`: each template writes a runnable script that uses trainctl fully;
plain and lightning run under `trainctl local`, are killed, and resume bit-exactly."""

from __future__ import annotations

import ast
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainctl import scaffold
from trainctl.config import tomllib
from trainctl.session import Session, SessionStore

from .conftest import REPO, clean_env, run_cli

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def sessions(project: Path) -> list[Session]:
    store = SessionStore(project / ".trainctl")
    return [Session(store.sessions_dir / i) for i in store.ids()]


def test_list_names_every_template(tmp_path):
    r = run_cli(["init", "--template", "list"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["plain", "lightning", "hf"]
    assert list(tmp_path.iterdir()) == []


def test_templates_ship_as_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["trainctl"]
    for t in scaffold.TEMPLATES.values():
        assert (REPO / "trainctl" / "templates" / t.file).is_file()
        assert any(Path("templates", t.file).match(p) for p in patterns), t.file


@pytest.mark.parametrize("name", list(scaffold.TEMPLATES))
def test_template_source_compiles_and_uses_trainctl_fully(name):
    text = scaffold.text(scaffold.TEMPLATES[name])
    compile(text, f"{name}.py", "exec")
    ast.parse(text)
    assert "PLUG YOUR DATA IN HERE" in text and text.count("PLUG YOUR DATA IN HERE") == 1
    assert "seed" in text and "--resume" in text
    if name == "plain":
        for call in ("trainctl.init(", "run.track(model=model, optimizer=optimizer, scheduler=scheduler)",
                     "run.restore()", "run.log(", "run.save_checkpoint(", "run.finish()",
                     "torch.use_deterministic_algorithms(True)"):
            assert call in text, call
    elif name == "lightning":
        for call in ("TrainctlCallback(", "ckpt_path=cb.resume_path()", "ModelCheckpoint(", "lr_scheduler",
                     "L.seed_everything(", "deterministic=True"):
            assert call in text, call
    else:
        for call in ("trainctl.init(", "run.log(", "run.should_stop", "resume_from_checkpoint=args.resume_from_checkpoint",
                     "set_seed(", "full_determinism=True", "sys.exit(75)", "output_dir=str(run.checkpoint_dir)"):
            assert call in text, call


@pytest.mark.skipif(HAS_TRANSFORMERS, reason="transformers is installed here")
def test_hf_without_transformers_says_how_to_install(tmp_path):
    r = run_cli(["init", "--template", "hf"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["error: the hf template needs transformers, which is not installed here.",
                                     "hint: Install it with: pip install transformers"]
    assert list(tmp_path.iterdir()) == []


def test_hf_config_takes_the_trainer_resume_flag():
    text = scaffold.config_text(scaffold.TEMPLATES["hf"])
    assert tomllib.loads(text)["resume_flag"] == "--resume_from_checkpoint"
    assert tomllib.loads(scaffold.config_text(scaffold.TEMPLATES["plain"]))["resume_flag"] == "--resume"


def test_writes_script_and_config_and_says_so(tmp_path):
    r = run_cli(["init", "--template", "plain"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Wrote train.py (plain template)." in r.stdout and "Wrote trainctl.toml." in r.stdout
    assert (tmp_path / "train.py").read_text() == scaffold.text(scaffold.TEMPLATES["plain"])
    assert tomllib.loads((tmp_path / "trainctl.toml").read_text())["resume_flag"] == "--resume"


def test_keeps_existing_config_and_writes_named_script(tmp_path):
    (tmp_path / "trainctl.toml").write_text('checkpoint_dir = "ckpts"\n')
    r = run_cli(["init", "--template", "lightning", "my_train.py"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Wrote my_train.py (lightning template)." in r.stdout and "Kept the existing trainctl.toml." in r.stdout
    assert (tmp_path / "trainctl.toml").read_text() == 'checkpoint_dir = "ckpts"\n'
    assert "TrainctlCallback" in (tmp_path / "my_train.py").read_text()


BAD = [
    # (args, files before, exit code, error line)
    (["--template", "keras"], {}, 2, "error: unknown template 'keras'. Valid: plain, lightning, hf."),
    (["--template", "plain"], {"train.py": "mine\n"}, 2, "error: {root}/train.py already exists; nothing was written."),
    (["--template", "plain", "sub"], {"sub/x": ""}, 2, "error: {root}/sub is a directory."),
]


@pytest.mark.parametrize("args,before,code,message", BAD)
def test_bad_template_requests(tmp_path, args, before, code, message):
    for name, content in before.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    r = run_cli(["init", *args], tmp_path)
    assert r.returncode == code
    assert r.stderr.splitlines()[0] == message.format(root=tmp_path), r.stderr
    assert r.stderr.splitlines()[1].startswith("hint: ") and "Traceback" not in r.stderr
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} == set(before)
    for name, content in before.items():
        assert (tmp_path / name).read_text() == content


def test_force_overwrites_the_script_only(tmp_path):
    (tmp_path / "train.py").write_text("mine\n")
    (tmp_path / "trainctl.toml").write_text("# mine\n")
    r = run_cli(["init", "--template", "plain", "--force"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Overwrote train.py (plain template)." in r.stdout
    assert "trainctl.init(" in (tmp_path / "train.py").read_text()
    assert (tmp_path / "trainctl.toml").read_text() == "# mine\n"


# --- each template runs, is killed, and resumes bit-exactly ---------------------------------------

# (template, the script's arguments, a line of the template after which a pause goes: the test
# needs time to kill the script between two checkpoints; the numbers are the same either way).
# Where a file `hold` exists, the pause lasts once a checkpoint is on disk: the script waits
# there to be killed however slow the machine is, and never ends first.
RUNS = {
    "plain": (["--steps", "40", "--eval-every", "5"], "        step += 1\n", "ckpt-step00000040.pt"),
    "lightning": (["--epochs", "3", "--batch-size", "64"], "        return loss\n", "last.ckpt"),
}


def new_project(root: Path, template: str) -> Path:
    root.mkdir()
    r = run_cli(["init", "--template", template], root)
    assert r.returncode == 0, r.stderr
    (root / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n')
    script = root / "train.py"
    text = script.read_text()
    after = RUNS[template][1]
    assert text.count(after) == 1
    indent = after[: len(after) - len(after.lstrip())]
    pause = "__import__('time').sleep(3600 if __import__('os').path.exists('hold') and " \
            "__import__('glob').glob('checkpoints/*/*') else 0.05)"
    script.write_text(text.replace(after, after.replace(after.strip(), pause) + after
                                   if template == "lightning" else after + f"{indent}{pause}\n"))
    return root


def checkpoint_events(session: Session) -> list[dict]:
    try:
        return list(session.iter_events(("checkpoint",)))
    except FileNotFoundError:
        return []


def final_state(project: Path, session: Session, name: str) -> dict:
    import torch

    return torch.load(project / "checkpoints" / session.id / name, weights_only=True)


def assert_same_tensors(a, b, where="") -> None:
    import torch

    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            if k not in ("trainctl", "callbacks", "loops"):  # metadata and timings differ by nature
                assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"


@pytest.mark.slow
@pytest.mark.parametrize("template", list(RUNS))
def test_template_killed_and_resumed_ends_bit_identical(tmp_path, template):
    args, _after, final = RUNS[template]
    reference = new_project(tmp_path / "reference", template)
    done = run_cli(["local", "--no-preflight", "train.py", *args], reference, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (ref_session,) = sessions(reference)

    project = new_project(tmp_path / "killed", template)
    (project / "hold").write_text("")
    proc = subprocess.Popen([sys.executable, "-m", "trainctl", "local", "--no-preflight", "train.py", *args],
                            cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (sessions(project) and checkpoint_events(sessions(project)[0])):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.02)
        (session,) = sessions(project)
        pid = session.read()["runtime"]["pid"]
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out[-3000:]
    assert session.read()["status"] == "failed"
    assert len(checkpoint_events(session)) < len(checkpoint_events(ref_session)), "killed too late: the run had ended"

    (project / "hold").unlink()
    resumed = run_cli(["local", "--no-preflight", "--resume", "auto", "train.py", *args], project, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    newest = sessions(project)[0]
    assert newest.id != session.id and newest.read()["resume_from"]
    assert_same_tensors(final_state(project, newest, final), final_state(reference, ref_session, final))
