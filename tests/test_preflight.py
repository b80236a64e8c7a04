"""Pre-flight checks: the API the launcher calls, and `trainctl check` over a bad-input table."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, clean_env, run_cli
from trainctl import config as config_mod
from trainctl.errors import EXIT_USAGE, PreflightError
from trainctl.launcher.preflight import PreflightReport, run_preflight, visible_gpus

GOOD = """
import argparse
import json

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--data")
parser.add_argument("--resume")
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def check(project: Path, script: Path | str, *args: str, **kw) -> PreflightReport:
    cwd = os.getcwd()
    os.chdir(project)  # paths among the arguments resolve from where the run starts
    try:
        return run_preflight(script, list(args), config_mod.load(project), **kw)
    finally:
        os.chdir(cwd)


def by_name(report: PreflightReport, name: str) -> list[tuple[str, str]]:
    return [(r.status, r.message) for r in report.results if r.name == name]


# ---------------------------------------------------------------- the API


def test_good_script_passes_every_check(project):
    script = write(project / "train.py", GOOD)
    report = check(project, script, resume="auto")
    assert report.ok, report.lines()
    names = [r.name for r in report.results]
    assert names == ["config", "script", "imports", "resume", "checkpoints", "state", "gpus"]
    assert report.lines()[1] == f"  ok    script      {script} compiles"
    assert f"{project / 'trainctl.toml'} is valid" in report.lines()[0]
    report.raise_if_failed()
    assert not (project / "checkpoints").exists() and not (project / ".trainctl").exists()


def test_raise_if_failed_names_the_first_failure_and_the_fix(project):
    report = check(project, project / "missing.py")
    assert not report.ok
    with pytest.raises(PreflightError) as e:
        report.raise_if_failed()
    assert e.value.exit_code == EXIT_USAGE == 2
    assert str(e.value) == f"pre-flight check 'script' failed: {project / 'missing.py'} does not exist."
    assert "relative to the current folder" in e.value.hint
    assert any(line.startswith("  FAIL  script") for line in report.lines())
    assert any("hint: " in line for line in report.lines())


def test_syntax_error_gives_file_line_column_and_the_line(project):
    script = write(project / "train.py", "import os\n\ndef f():\n    y = = 2\n")
    (status, message), = by_name(check(project, script), "script")
    assert status == "fail"
    assert message.startswith(f"{script}:4:9:")
    assert "SyntaxError" in message and "`y = = 2`" in message


def test_imports(project):
    write(project / "helpers.py", "")
    write(project / "pkg" / "__init__.py", "")
    script = write(project / "train.py", """
        from __future__ import annotations
        import os.path
        import helpers, pkg.sub
        from . import sibling
        from typing import TYPE_CHECKING
        import cv2
        try:
            import skimage
        except ImportError:
            skimage = None
        if TYPE_CHECKING:
            import not_installed_typing_only
        def main():
            from sklearn import metrics
        if __name__ == "__main__":
            import numpy
    """)
    results = by_name(check(project, script), "imports")
    assert ("fail", "train.py:7 imports 'cv2', which is not installed in this Python.") in results
    assert ("fail", "train.py:15 imports 'sklearn', which is not installed in this Python.") in results
    assert ("warn", "train.py:9 optionally imports 'skimage' (guarded), which is not installed.") in results
    assert len(results) == 3  # beside-the-script, relative, TYPE_CHECKING and installed ones pass
    report = check(project, script)
    hints = [r.hint for r in report.results if r.name == "imports"]
    assert "Install it: pip install opencv-python" in hints
    assert "Install it: pip install scikit-learn" in hints


def test_imports_are_checked_in_the_interpreter_that_will_run(project):
    base = Path(sys.base_prefix) / "bin" / "python3"
    if not base.exists() or sys.prefix == sys.base_prefix:
        pytest.skip("needs a virtualenv with torch and a base interpreter without it")
    probe = subprocess.run([str(base), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, env=clean_env())
    if probe.stdout.strip() != "True":
        pytest.skip("the base interpreter has torch too")
    script = write(project / "train.py", "import torch\n")
    assert check(project, script).ok
    report = check(project, script, python=str(base))
    (status, message), = by_name(report, "imports")
    assert status == "fail" and f"not installed in {base} (Python " in message


def test_missing_interpreter(project):
    script = write(project / "train.py", "import os\n")
    report = check(project, script, python=str(project / "no-python"))
    assert by_name(report, "python")[0][0] == "fail"


@pytest.mark.parametrize(("source", "toml", "ok", "fragment"), [
    ('import argparse\np = argparse.ArgumentParser()\np.add_argument("--resume")\n', "", True, "defines --resume"),
    ('import click\n@click.command()\n@click.option("--resume")\ndef main(resume): pass\n', "", True, "defines --resume"),
    ("import trainctl\nrun = trainctl.init()\n", "", True, "TRAIN_OPS_RESUME"),
    ('import argparse\np = argparse.ArgumentParser()\np.add_argument("--ckpt_path")\n', "", False,
     'It defines --ckpt_path: set resume_flag = "--ckpt_path"'),
    ('import argparse\np = argparse.ArgumentParser()\np.add_argument("--lr")\n', "", False,
     "Add parser.add_argument(\"--resume\")"),
    ('import argparse\np = argparse.ArgumentParser()\np.add_argument("--ckpt_path")\n',
     'resume_flag = "--ckpt_path"\n', True, "defines --ckpt_path"),
    ("init_from = 'scratch'\nexec(open('configurator.py').read())\n", 'resume_flag = "--init_from=resume"\n', True,
     "sets init_from"),
])
def test_resume_flag(project, source, toml, ok, fragment):
    (project / "trainctl.toml").write_text('checkpoint_dir = "checkpoints"\n' + toml)
    script = write(project / "train.py", source)
    assert by_name(check(project, script), "resume") == []  # only checked when resuming
    (result,) = [r for r in check(project, script, resume="ck.pt").results if r.name == "resume"]
    assert (result.status == "pass") is ok
    assert fragment in result.message + (result.hint or "")
    if not ok:
        assert str(project / "trainctl.toml") in result.hint


def test_arguments_that_look_like_paths(project):
    script = write(project / "train.py", "")
    write(project / "data" / "train.csv", "a,b\n")
    report = check(project, script, "--data", "data/train.csv", "--lr", "-0.5")
    assert by_name(report, "arguments") == [("pass", "paths exist: data/train.csv")]

    report = check(project, script, "--data-dir=data/val", "--out", "runs/new", "--log_dir", "logs",
                   "extra/thing.yaml", "--steps", "10", "--url", "s3://bucket/key")
    results = by_name(report, "arguments")
    assert ("fail", "--data-dir data/val: no such file or folder.") in results
    assert ("warn", "extra/thing.yaml: no such file or folder (yet).") in results
    assert len(results) == 2  # output flags, numbers and URLs are not checked
    assert not report.ok


def test_checkpoint_dir_under_a_file_and_too_little_space(project):
    script = write(project / "train.py", "")
    (project / "blocker").write_text("")
    (project / "trainctl.toml").write_text('checkpoint_dir = "blocker/ckpts"\nmin_free_gb = 1000000000\n')
    report = check(project, script)
    (status, message), = by_name(report, "checkpoints")
    assert status == "fail" and "blocker is a file" in message
    (status, message), = by_name(report, "state")
    assert status == "fail" and "free (min_free_gb = 1e+09)" in message
    assert not (project / ".trainctl").exists()


def test_gpus_requested_but_none_visible(project, monkeypatch):
    script = write(project / "train.py", "")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides any GPU, as it does for the script
    assert visible_gpus() == []
    (status, message), = by_name(check(project, script, gpus=2), "gpus")
    assert (status, message) == ("fail", "2 GPUs requested, none visible.")
    (project / "trainctl.toml").write_text("gpus = 1\n")
    assert by_name(check(project, script), "gpus")[0][0] == "fail"
    assert by_name(check(project, script, gpus=0), "gpus")[0][0] == "pass"


def test_visible_gpus_are_listed(project):
    gpus = visible_gpus()
    if not gpus:
        pytest.skip("no GPU visible here")
    (status, message), = by_name(check(project, write(project / "train.py", ""), gpus=1), "gpus")
    assert status == "pass" and gpus[0]["name"] in message


def test_preflight_does_not_import_torch(project):
    script = write(project / "train.py", GOOD)
    code = ("import sys; from trainctl import config; from trainctl.launcher.preflight import run_preflight\n"
            f"r = run_preflight({str(script)!r}, [], config.load(), resume='x')\n"
            "heavy = [m for m in ('torch', 'numpy', 'lightning') if m in sys.modules]\n"
            "assert r.ok and not heavy, (r.lines(), heavy)")
    subprocess.run([sys.executable, "-c", code], cwd=project, check=True, env=clean_env())


# ---------------------------------------------------------------- `trainctl check`


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            try:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() + oct(path.stat().st_mode)
            except PermissionError:
                out[rel] = oct(path.stat().st_mode)
        else:
            out[rel] = "dir"
    return out


def test_check_good_script(project):
    write(project / "train.py", GOOD)
    before = snapshot(project)
    proc = run_cli(["check", "--resume", "ck.pt", "train.py", "--data", "train.py"], project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "  ok    resume      train.py defines --resume" in proc.stdout
    assert "pre-flight: all 8 checks passed" in proc.stdout
    assert snapshot(project) == before


def _setup_unreadable(p: Path) -> list[str]:
    write(p / "train.py", "print(1)\n").chmod(0)
    return ["train.py"]


BAD_INPUTS = [
    # (id, setup(project) -> argv after `check`, fragment of the output)
    ("missing script", lambda p: ["nope.py"], "nope.py does not exist"),
    ("typo in the name", lambda p: [write(p / "train.py", "") and "trian.py"], "Did you mean train.py?"),
    ("directory", lambda p: [(p / "src").mkdir() or "src"], "src is a directory, not a script"),
    ("broken symlink", lambda p: [(p / "link.py").symlink_to(p / "gone.py") or "link.py"], "is a broken symlink"),
    ("syntax error", lambda p: [write(p / "train.py", "def f(:\n    pass\n") and "train.py"], "train.py:1:7: SyntaxError"),
    ("missing import", lambda p: [write(p / "train.py", "import cv2\n") and "train.py"],
     "hint: Install it: pip install opencv-python"),
    ("malformed toml", lambda p: [(p / "trainctl.toml").write_text("[retention]\nkeep_last_n = \n") and
                                  write(p / "train.py", "") and "train.py"], "trainctl.toml:2: malformed TOML"),
    ("unknown config key", lambda p: [(p / "trainctl.toml").write_text("\nmin_free_gbs = 3\n") and
                                      write(p / "train.py", "") and "train.py"],
     "trainctl.toml:2: unknown key 'min_free_gbs'"),
    ("wrong config type", lambda p: [(p / "trainctl.toml").write_text('gpus = "two"\n') and
                                     write(p / "train.py", "") and "train.py"], "'gpus' must be an integer"),
    ("resume without the flag", lambda p: ["--resume", "ck.pt",
                                           write(p / "train.py", "import sys\n") and "train.py"],
     "train.py does not accept --resume"),
    ("missing input path", lambda p: [write(p / "train.py", "") and "train.py", "--data", "data/train.csv"],
     "--data data/train.csv: no such file or folder"),
    ("gpus requested, none visible", lambda p: ["--gpus", "1", write(p / "train.py", "") and "train.py"],
     "1 GPU requested, none visible"),
    ("negative gpus", lambda p: ["--gpus", "-1", "train.py"], "Invalid value for '--gpus'"),
    ("no script", lambda p: [], "Missing argument 'SCRIPT'"),
    ("unreadable script", _setup_unreadable, "cannot be read (Permission denied)"),
]


@pytest.mark.parametrize(("setup", "fragment"), [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_check_bad_input(project, setup, fragment, request):
    if "unreadable" in request.node.callspec.id and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode; the broken-symlink row covers an unreadable path")
    argv = setup(project)
    before = snapshot(project)
    proc = run_cli(["check", *argv], project, env=clean_env(CUDA_VISIBLE_DEVICES=""))
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_USAGE, output
    assert fragment in output
    assert "Traceback" not in output
    assert snapshot(project) == before


def test_check_examples_pass(project):
    for example in ("quickstart.py", "failing.py"):
        proc = run_cli(["check", "--resume", "auto", str(EXAMPLES / example)], project)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_json(project):
    import json

    write(project / "train.py", "import cv2\n")
    proc = run_cli(["check", "--json", "train.py"], project)
    assert proc.returncode == EXIT_USAGE
    data = json.loads(proc.stdout)
    assert data["ok"] is False
    (imports,) = [r for r in data["results"] if r["name"] == "imports"]
    assert imports == {"name": "imports", "status": "fail", "hint": "Install it: pip install opencv-python",
                       "message": "train.py:1 imports 'cv2', which is not installed in this Python."}
