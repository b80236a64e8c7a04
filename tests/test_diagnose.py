"""Failure diagnosis from real output: failing scripts run here, CUDA/NCCL ones from recorded text."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, clean_env, run_cli
from trainctl.launcher.diagnose import Diagnosis, diagnose

FIXTURES = Path(__file__).parent / "fixtures" / "diagnose"


def run_script(tmp_path: Path, source: str, *args: str) -> tuple[str, int]:
    """Run a real script with this interpreter; its merged output and exit code."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(source))
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120, env=clean_env())
    assert proc.returncode != 0, proc.stdout
    return proc.stdout, proc.returncode


def diagnosed(tmp_path: Path, source: str, *args: str, **kw) -> Diagnosis:
    output, code = run_script(tmp_path, source, *args)
    found = diagnose(output, exit_code=code, script="train.py", args=list(args), **kw)
    assert found is not None, output
    return found


# ---------------------------------------------------------------- real failures


@pytest.mark.parametrize(("module", "package"), [("cv2", "opencv-python"), ("sklearn", "scikit-learn"),
                                                 ("bs4", "beautifulsoup4"), ("not_a_real_pkg", "not_a_real_pkg")])
def test_missing_module_names_the_package_to_install(tmp_path, module, package):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    d = diagnosed(tmp_path, f"import os\nimport {module}\n")
    assert d.kind == "import"
    assert f"module '{module}' is not installed at train.py:2" in d.what
    assert f"pip install {package}" in d.fix


def test_import_error_of_a_missing_name_points_at_the_version(tmp_path):
    d = diagnosed(tmp_path, "from json import no_such_function\n")
    assert d.kind == "import"
    assert "'no_such_function' cannot be imported from 'json'" in d.what


def test_file_not_found_names_the_argument(tmp_path):
    d = diagnosed(tmp_path, """
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("--data")
        a = p.parse_args()
        open(a.data).read()
    """, "--data", "data/train.csv")
    assert d.kind == "file_not_found"
    assert "argument --data names a file that does not exist: data/train.csv" in d.what
    assert "relative path" in d.cause


def test_missing_script_itself(tmp_path):
    proc = subprocess.run([sys.executable, str(tmp_path / "nope.py")], capture_output=True, text=True)
    d = diagnose(proc.stderr, exit_code=proc.returncode)
    assert d is not None and d.kind == "script_missing" and "nope.py does not exist" in d.what


def test_script_without_the_resume_flag(tmp_path):
    d = diagnosed(tmp_path, """
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("--ckpt_path")
        p.add_argument("--lr", type=float)
        p.parse_args()
    """, "--lr", "0.1", "--resume", "ck.pt")
    assert d.kind == "resume_flag"
    assert "does not accept --resume: error: unrecognized arguments: --resume ck.pt" in d.what
    assert 'resume_flag = "--ckpt_path"' in d.fix


def test_configured_resume_flag_is_the_one_looked_for(tmp_path):
    output, code = run_script(tmp_path, "import argparse\nargparse.ArgumentParser().parse_args()\n",
                              "--init-from", "x.pt")
    d = diagnose(output, exit_code=code, resume_flag="--init-from")
    assert d is not None and d.kind == "resume_flag" and "--init-from" in d.what
    assert diagnose(output, exit_code=code).kind == "arguments"  # not our flag: plain bad arguments


def test_argument_of_the_wrong_type(tmp_path):
    d = diagnosed(tmp_path, """
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument("--lr", type=float)
        p.parse_args()
    """, "--lr", "fast")
    assert d.kind == "arguments"
    assert "argument --lr: invalid float value: 'fast'" in d.what


STATE_DICT = """
    import torch
    from torch import nn
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    {build}
    model.load_state_dict(sd)
"""


def test_state_dict_size_mismatch(tmp_path):
    d = diagnosed(tmp_path, STATE_DICT.format(
        build="sd = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2)).state_dict()"))
    assert d.kind == "state_dict"
    assert "size mismatch for 0.weight: checkpoint [16, 4], model [8, 4] and 2 more" in d.what
    assert "different settings" in d.cause
    assert "trainctl checkpoint info" in d.fix


def test_state_dict_missing_and_unexpected_keys(tmp_path):
    d = diagnosed(tmp_path, STATE_DICT.format(
        build="sd = dict(model.state_dict()); sd['extra.weight'] = sd.pop('1.bias')"))
    assert d.kind == "state_dict"
    assert "1 missing key (1.bias)" in d.what and "1 unexpected (extra.weight)" in d.what
    assert "strict=False" in d.fix


def test_state_dict_saved_from_a_ddp_wrapped_model(tmp_path):
    d = diagnosed(tmp_path, STATE_DICT.format(
        build="sd = {'module.' + k: v for k, v in model.state_dict().items()}"))
    assert d.kind == "state_dict"
    assert "'module.'" in d.cause and "removeprefix('module.')" in d.fix


def test_nan_loss_printed_by_the_script(tmp_path):
    d = diagnosed(tmp_path, """
        import sys, torch
        for step in range(3):
            loss = torch.tensor(-1.0 + step).log()
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        sys.exit(1)
    """)
    assert d.kind == "nan_loss"
    assert "the loss became NaN: `step 0 loss nan`" in d.what
    assert "learning rate" in d.fix


def test_permission_denied(tmp_path):
    target = tmp_path / "locked.txt"
    target.write_text("x")
    target.chmod(0)
    if os.geteuid() == 0:  # root reads anything chmod 000; a sysfs file refuses writes even to root
        target = Path("/sys/kernel/notes")
        if not target.exists():
            pytest.skip("running as root without /sys/kernel/notes to provoke EACCES")
    d = diagnosed(tmp_path, f"open({str(target)!r}, 'w')\n")
    assert d.kind == "permission"
    assert f"permission denied: {target}" in d.what
    assert "chmod" in d.fix


def test_disk_full(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    d = diagnosed(tmp_path, "f = open('/dev/full', 'w')\nf.write('x' * 10)\nf.close()\n")
    assert d.kind == "disk_full"
    assert "checkpoint cleanup --dry-run" in d.fix


def test_killed_by_sigkill_without_a_traceback(tmp_path):
    output, code = run_script(tmp_path, "import os, signal\nprint('epoch 1', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert code == -9
    for kw in ({"exit_code": code}, {"exit_code": 137}, {"exit_code": None, "signal_name": "SIGKILL"}):
        d = diagnose(output, **kw)
        assert d is not None and d.kind == "oom_killed", kw
        assert "out-of-memory killer" in d.cause and "num_workers" in d.fix


def test_cuda_on_a_cpu_only_torch(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = diagnosed(tmp_path, "import torch\ntorch.zeros(1).cuda()\n")
    assert d.kind == "cuda_unavailable"
    assert "CPU-only" in d.what


def test_other_exception_names_the_error_and_where(tmp_path):
    d = diagnosed(tmp_path, """
        def main():
            raise KeyError("batch_size")
        main()
    """)
    assert d.kind == "exception"
    assert d.what == "the script raised KeyError: 'batch_size' at train.py:3"


# ---------------------------------------------------------------- recorded CUDA / NCCL output


@pytest.mark.parametrize(("fixture", "kind", "fragment"), [
    ("cuda_oom.txt", "cuda_oom", "on GPU 0 (tried to allocate 20.00 GiB) at train.py:71"),
    ("cuda_oom_old.txt", "cuda_oom", "tried to allocate 512.00 MiB"),
    ("cuda_driver_too_old.txt", "cuda_driver", "the driver supports CUDA 11.4"),
    ("cuda_runtime_insufficient.txt", "cuda_driver", "older than the CUDA version"),
    ("cuda_no_kernel_image.txt", "cuda_driver", "no kernels for this GPU (sm_90)"),
    ("nccl_timeout.txt", "distributed_timeout", "NCCL collective operation timed out in ALLREDUCE (#7753) after 600 s"),
    ("nccl_error.txt", "distributed_error", "unhandled system error"),
    ("gloo_timeout.txt", "distributed_timeout", "gloo collective operation timed out after 3 s"),
    ("dist_store_timeout.txt", "distributed_timeout", "1 of 2 processes joined"),
    ("dataloader_worker_killed.txt", "oom_killed", "DataLoader worker (pid 41877)"),
    ("shm_bus_error.txt", "shared_memory", "/dev/shm"),
])
def test_recorded_outputs(fixture, kind, fragment):
    d = diagnose((FIXTURES / fixture).read_text(), exit_code=1)
    assert d is not None
    assert d.kind == kind
    assert fragment in d.what


def test_cuda_oom_fix_names_the_usual_remedies():
    d = diagnose((FIXTURES / "cuda_oom.txt").read_text(), exit_code=1)
    assert "batch size" in d.fix and "gradient accumulation" in d.fix and "autocast" in d.fix


# ---------------------------------------------------------------- the command and the format


def test_resume_command_uses_the_checkpoint_and_drops_an_old_resume_flag():
    out = "Traceback (most recent call last):\n  File \"t.py\", line 1\nValueError: boom\n"
    d = diagnose(out, exit_code=1, script="train.py", checkpoint="/ck/step 10.pt",
                 args=["--lr", "0.1", "--resume", "/ck/old.pt", "--api-key", "s3cret"])
    assert d.command == "trainctl checkpoint resume '/ck/step 10.pt' train.py --lr 0.1 --api-key '***'"
    assert diagnose(out, exit_code=1, script="train.py").command is None


def test_lines_and_dict():
    d = diagnose("Traceback (most recent call last):\nValueError: boom\n", exit_code=1,
                 script="t.py", checkpoint="c.pt")
    assert [line.split()[0] for line in d.lines()] == ["what", "likely", "fix", "run"]
    assert d.lines()[-1] == "run            trainctl checkpoint resume c.pt t.py"
    assert set(d.to_dict()) == {"kind", "what", "cause", "fix", "command"}
    json.dumps(d.to_dict())


def test_terminal_colours_and_rank_prefixes_are_ignored():
    text = "\x1b[31m[rank1]: Traceback (most recent call last):\n[rank1]:   File \"/x/train.py\", line 9, in f\n" \
           "[rank1]: ModuleNotFoundError: No module named 'cv2'\x1b[0m\n"
    d = diagnose(text, exit_code=1)
    assert d.kind == "import" and "'cv2' is not installed at train.py:9" in d.what


def test_nothing_known_is_none():
    assert diagnose("", exit_code=1) is None
    assert diagnose("some output\n", exit_code=3) is None


# ---------------------------------------------------------------- end to end


def test_failed_session_records_and_shows_the_diagnosis(project):
    proc = run_cli(["local", str(EXAMPLES / "failing.py"), "--steps", "40"], project, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert "the loss became Inf" in proc.stderr
    sessions = list((project / ".trainctl" / "sessions").iterdir())
    data = json.loads((sessions[0] / "session.json").read_text())
    diag = data["diagnosis"]
    assert diag["kind"] == "nan_loss"
    assert diag["command"].startswith("trainctl checkpoint resume ")
    assert "ckpt" in diag["command"] and diag["command"].endswith("failing.py --steps 40")
    shown = run_cli(["sessions", "show", data["id"]], project)
    assert "the loss became Inf" in shown.stdout


def test_state_dict_mismatch_inside_restore_points_at_the_users_line(project):
    """run.restore() calls load_state_dict inside trainctl: the diagnosis names the script's
    line that called it, never trainctl's own run.py."""
    (project / "train.py").write_text(textwrap.dedent("""
        import argparse
        import torch
        import trainctl
        parser = argparse.ArgumentParser()
        parser.add_argument("--hidden", type=int, default=8)
        parser.add_argument("--resume")
        args = parser.parse_args()
        model = torch.nn.Sequential(torch.nn.Linear(4, args.hidden), torch.nn.Linear(args.hidden, 1))
        run = trainctl.init(config=vars(args))
        run.track(model=model)
        meta = run.restore()
        run.save_checkpoint(step=1)
    """))
    first = run_cli(["local", "--no-preflight", "train.py"], project, timeout=180)
    assert first.returncode == 0, first.stderr
    second = run_cli(["local", "--no-preflight", "--resume", "auto", "train.py", "--hidden", "16"],
                     project, timeout=180)
    assert second.returncode == 1, second.stderr
    data = json.loads(sorted((project / ".trainctl" / "sessions").glob("*/session.json"))[-1].read_text())
    assert data["diagnosis"]["kind"] == "state_dict"
    assert data["diagnosis"]["what"].endswith(" at train.py:12"), data["diagnosis"]
    assert "run.py" not in data["diagnosis"]["what"] + data["diagnosis"]["cause"]
    assert "the checkpoint does not fit the Sequential model: size mismatch for 0.weight" in second.stderr


def test_frames_of_trainctl_itself_are_not_the_users_location():
    from trainctl.launcher import diagnose as diagnose_mod

    here = Path(diagnose_mod.__file__).resolve().parents[1]
    for path in (str(here / "run.py"), str(here / "callbacks" / "lightning.py"),
                 "/opt/venv/lib/python3.11/site-packages/trainctl/run.py",
                 "/home/u/src/trainctl/trainctl/checkpoint.py"):
        assert diagnose_mod._is_library(path), path
    for path in ("/home/u/trainctl/train.py", "/home/u/proj/run.py", "train.py"):
        assert not diagnose_mod._is_library(path), path


TRACEBACK = ['Traceback (most recent call last):', '  File "/p/train.py", line 5, in <module>', '    step()',
             '  File "/p/train.py", line 3, in step', '    raise ValueError("boom in step 7")',
             'ValueError: boom in step 7']


@pytest.mark.parametrize("at", range(1, len(TRACEBACK) + 1))
def test_a_line_of_stdout_inside_the_traceback_does_not_hide_the_exception(at):
    # stdout and stderr are read apart: a line printed just before the crash can land anywhere in it
    lines = [*TRACEBACK[:at], "starting", *TRACEBACK[at:]]
    found = diagnose("\n".join(["epoch 1", *lines]) + "\n", exit_code=1, script="train.py")
    assert found is not None and found.what == "the script raised ValueError: boom in step 7 at train.py:3", lines


def test_an_exception_without_a_message_is_still_named():
    found = diagnose("\n".join([*TRACEBACK[:-1], "KeyboardInterrupt"]) + "\n", exit_code=1, script="train.py")
    assert found is not None and "KeyboardInterrupt" in found.what
    custom = diagnose("\n".join([*TRACEBACK[:-1], "Boom"]) + "\n", exit_code=1, script="train.py")
    assert custom is not None and custom.what == "the script raised Boom at train.py:3"
