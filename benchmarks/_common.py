"""Shared helpers for the benchmark scripts: sizes, statistics, subprocess timing, result lines.

Every figure script prints exactly one JSON object on its last stdout line:
{"figure": "B1", "title": ..., "mode": "full|quick|smoke", "params": {...},
 "rows": [{"name", "trainctl", "baseline", "baseline_name", "unit", "ratio", "goal", "pass",
           "trainctl_stats", "baseline_stats"}], "extra": {...}, "notes": [...]}
`pass` is True/False against the issue's goal, or None for a row that is only reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODES = ("full", "quick", "smoke")


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """--quick / --smoke select the size; the default is the issue's full size."""
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="smaller sizes (make bench-quick)")
    group.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness only")
    args = parser.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    return args


def pick(mode: str, full: Any, quick: Any, smoke: Any) -> Any:
    """The value for this mode."""
    return {"full": full, "quick": quick, "smoke": smoke}[mode]


def stats(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, max, p99 and count of a list of samples."""
    if not samples:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "p99": math.nan, "n": 0}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "p99": p99, "n": len(ordered)}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def row(name: str, trainctl: float, baseline: float | None, *, unit: str, goal: str,
        passed: bool | None, baseline_name: str = "", ratio_value: float | None = None,
        trainctl_stats: dict[str, float] | None = None,
        baseline_stats: dict[str, float] | None = None, **extra: Any) -> dict[str, Any]:
    """One table row; the ratio defaults to trainctl / baseline."""
    if ratio_value is None and baseline is not None:
        ratio_value = ratio(trainctl, baseline)
    out = {"name": name, "trainctl": trainctl, "baseline": baseline, "baseline_name": baseline_name,
           "unit": unit, "ratio": ratio_value, "goal": goal, "pass": passed}
    if trainctl_stats is not None:
        out["trainctl_stats"] = trainctl_stats
    if baseline_stats is not None:
        out["baseline_stats"] = baseline_stats
    out.update(extra)
    return out


def emit(figure: str, title: str, mode: str, rows: list[dict[str, Any]], *,
         params: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
         notes: list[str] | None = None) -> dict[str, Any]:
    """Print the figure's result as one JSON line (NaN/inf become null) and return it."""
    result = {"figure": figure, "title": title, "mode": mode, "params": params or {},
              "rows": rows, "extra": extra or {}, "notes": notes or []}
    print(json.dumps(_finite(result)), flush=True)
    return result


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without TRAIN_OPS_* / torchrun variables, with the repo importable."""
    # PYTHONDONTWRITEBYTECODE is dropped: an installed package runs from cached bytecode, and
    # compiling trainctl's sources on every start would be charged to trainctl alone
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TRAIN_OPS_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                           "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def warm_bytecode() -> None:
    """Compile trainctl to __pycache__ as `pip install` does (git-ignored; skipped if current)."""
    import compileall

    compileall.compile_dir(str(REPO / "trainctl"), quiet=2)


def trainctl_command() -> list[str]:
    """The installed `trainctl` entry point beside this interpreter, else `python -m trainctl`.

    An editable install's entry script names the module that held `main` when it was installed;
    when this checkout's pyproject.toml names another, an equivalent script (what pip writes) is
    generated, so the figure measures this checkout's code at an installed entry point's cost.
    """
    entry = Path(sys.executable).parent / "trainctl"
    if not entry.exists():
        return [sys.executable, "-m", "trainctl"]
    target = _entry_point()
    if target is None or f"from {target[0]} import {target[1]}" in entry.read_text(errors="replace"):
        return [str(entry)]
    script = Path(tempfile.gettempdir()) / f"trainctl-bench-entry-{os.getuid()}-{target[0]}.{target[1]}"
    if not script.exists():
        tmp = script.with_name(script.name + f".{os.getpid()}.tmp")
        tmp.write_text(f"#!{sys.executable}\nimport sys\nfrom {target[0]} import {target[1]}\n"
                       f"if __name__ == '__main__':\n    sys.exit({target[1]}())\n")
        tmp.chmod(0o755)
        os.replace(tmp, script)
    return [str(script)]


def _entry_point() -> tuple[str, str] | None:
    """(module, function) of the `trainctl` script in this checkout's pyproject.toml."""
    import re

    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^trainctl\s*=\s*"([\w.]+):(\w+)"', text, re.MULTILINE)
    return (m.group(1), m.group(2)) if m else None


@contextmanager
def project_dir(prefix: str = "trainctl-bench-", config: str = 'checkpoint_dir = "checkpoints"\n'):
    """A throwaway project folder with a trainctl.toml; the process works inside it."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    (root / "trainctl.toml").write_text(config)
    previous = os.getcwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(previous)
        shutil.rmtree(root, ignore_errors=True)


def time_process(argv: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 stdout: Any = subprocess.DEVNULL, timeout: float = 600,
                 check: bool = True) -> float:
    """Wall seconds of one whole process, start to exit (stdout to /dev/null or a file)."""
    start = time.perf_counter()
    proc = subprocess.run(list(argv), cwd=cwd, env=env if env is not None else clean_env(),
                          stdout=stdout, stderr=subprocess.PIPE, timeout=timeout)
    elapsed = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def interleaved(repeats: int, *variants: Callable[[], float], warmup: int = 1) -> list[list[float]]:
    """Run the variants in turn `repeats` times (after `warmup` untimed rounds), so drift on a
    shared machine hits each one alike; returns one sample list per variant."""
    for _ in range(warmup):
        for variant in variants:
            variant()
    samples: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for i, variant in enumerate(variants):
            samples[i].append(variant())
    return samples


def machine() -> dict[str, Any]:
    """Where the numbers came from (torch's version read without importing it)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:
        torch_version = None
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0],
            "torch": torch_version, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def vm_rss_kb() -> int:
    """This process's resident set size (VmRSS) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


# --- loggers compared in B1/B2 -----------------------------------------------------------------

class Logger:
    """One way to record 3 scalars a step: `log(values, step)` on the training thread, then
    `drain()` (everything written, as the run would at a checkpoint) and `close()`."""

    name = ""

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class TrainctlLogger(Logger):
    def __init__(self, folder: Path, *, tensorboard: bool, flush_interval_s: float) -> None:
        import trainctl

        self.name = "trainctl run.log" + (" (+TensorBoard)" if tensorboard else "")
        self.run = trainctl.init(name="bench", tensorboard=tensorboard,
                                 flush_interval_s=flush_interval_s)
        self.log = self.run.log  # type: ignore[method-assign]

    def drain(self) -> None:
        self.run.flush()

    def close(self) -> None:
        self.run.finish()


class RawJsonLogger(Logger):
    name = "raw json.dumps + buffered write"

    def __init__(self, folder: Path) -> None:
        self.file = open(folder / f"raw-{time.time_ns()}.jsonl", "w", encoding="utf-8")  # noqa: SIM115

    def log(self, values: dict[str, float], step: int) -> None:
        self.file.write(json.dumps({"t": time.time(), "step": step, "values": values}) + "\n")

    def drain(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class SummaryWriterLogger(Logger):
    name = "torch SummaryWriter.add_scalar x3"

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / f"tb-{time.time_ns()}"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def drain(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    name = "wandb.log (offline)"

    def __init__(self, folder: Path) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(mode="offline", dir=str(folder), project="bench")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(Logger):
    name = "mlflow.log_metrics (file store)"

    def __init__(self, folder: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri((folder / f"mlruns-{time.time_ns()}").as_uri())
        mlflow.start_run()

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def extra_loggers() -> dict[str, Callable[[Path], Logger]]:
    """wandb / mlflow columns, only where they are installed."""
    found: dict[str, Callable[[Path], Logger]] = {}
    if importable("wandb"):
        found["wandb"] = WandbLogger
    if importable("mlflow"):
        found["mlflow"] = MlflowLogger
    return found


def step_values(step: int) -> dict[str, float]:
    """The 3 scalars of a step, as a training loop would pass them."""
    return {"loss": 1.0 / (step + 1), "accuracy": step / (step + 1.0), "lr": 0.001}
