"""The training environment on a rented machine: the image's own CUDA torch, kept as it is.

GPU images ship torch built for their driver in one interpreter (the PyTorch Deep Learning AMI:
`/opt/pytorch/bin/python`; RunPod's PyTorch images: the system `python3`). The agent finds that
interpreter (`find_interpreter`), then installs the trainctl wheel and the project's
requirements (`requirements.txt`, else `[project].dependencies` of `pyproject.toml`) with a pip
constraints file pinning the torch family it found (torch, torchvision, torchaudio, triton,
nvidia-*), so a requirement can never swap the image's torch for a download that may not match
the driver. `torch_replacements` says beforehand which requirements would have to replace it.

Where it installs (`setup_environment`, mode):
- "venv" (the default): an overlay venv whose `.pth` adds the interpreter's site-packages
  (`site.addsitedir`, so their own .pth files work too). `python -m venv --system-site-packages`
  run from an interpreter that is itself a venv (as /opt/pytorch is) sees the *base* Python, not
  torch; the overlay sees exactly the interpreter's packages, and the image stays untouched.
- "direct": into the interpreter itself (when a venv can't be made);
- "none": install nothing (an image already prepared).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrainctlError, UsageError

CANDIDATES = ("/opt/pytorch/bin/python", "/opt/conda/bin/python", "python3", "python")
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton")
MODES = ("auto", "venv", "direct", "none")
OVERLAY_PTH = "_trainctl_image_site.pth"
PIP_BASE_ARGS = ("--no-input", "--disable-pip-version-check", "--no-warn-script-location")
_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")

_PROBE = r"""
import json, site, sys, sysconfig
out = {"python": sys.version.split()[0], "executable": sys.executable, "prefix": sys.prefix,
       "base_prefix": getattr(sys, "base_prefix", sys.prefix),
       "purelib": sysconfig.get_paths()["purelib"], "platlib": sysconfig.get_paths()["platlib"],
       "stdlib": sysconfig.get_paths()["stdlib"], "torch": None, "cuda": False, "cuda_version": None}
try:
    import importlib.metadata as md
    out["dists"] = {(d.metadata["Name"] or "").lower().replace("_", "-"): d.version for d in md.distributions()}
except Exception as e:
    out["dists"] = {}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_version"] = torch.version.cuda
    out["cuda"] = bool(torch.cuda.is_available())
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
print("TRAINCTL-PROBE " + json.dumps(out))
"""


class SetupError(TrainctlError):
    """The training environment could not be set up (a setup failure ends the machine)."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def in_torch_family(name: str) -> bool:
    name = normalize(name)
    return name in TORCH_FAMILY or name.startswith("nvidia-")


@dataclass(frozen=True)
class Interpreter:
    """A Python found on the machine and what it holds."""

    path: str
    python: str
    prefix: str
    base_prefix: str
    purelib: str
    platlib: str
    stdlib: str
    torch: str | None
    cuda: bool = False
    cuda_version: str | None = None
    dists: dict[str, str] = field(default_factory=dict)
    torch_error: str | None = None

    @property
    def is_venv(self) -> bool:
        return os.path.realpath(self.prefix) != os.path.realpath(self.base_prefix)

    @property
    def externally_managed(self) -> bool:
        return (Path(self.stdlib) / "EXTERNALLY-MANAGED").exists()

    def pinned(self) -> dict[str, str]:
        """The torch family installed here: name -> version (what the constraints pin)."""
        return {name: version for name, version in sorted(self.dists.items()) if in_torch_family(name)}

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "python": self.python, "torch": self.torch, "cuda": self.cuda,
                "cuda_version": self.cuda_version, "venv": self.is_venv, "pinned": self.pinned()}


def probe(python: str, *, timeout_s: float = 180.0) -> Interpreter | None:
    """What `python` is and holds (imports torch to find out); None when it does not run."""
    resolved = python if os.sep in python else shutil.which(python)
    if not resolved or not os.access(resolved, os.X_OK):
        return None
    try:
        done = subprocess.run([resolved, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONNOUSERSITE": "1"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("TRAINCTL-PROBE ")), None)
    if line is None:
        return None
    data = json.loads(line[len("TRAINCTL-PROBE "):])
    return Interpreter(path=resolved, python=data["python"], prefix=data["prefix"], base_prefix=data["base_prefix"],
                       purelib=data["purelib"], platlib=data["platlib"], stdlib=data["stdlib"], torch=data["torch"],
                       cuda=data["cuda"], cuda_version=data["cuda_version"], dists=data.get("dists") or {},
                       torch_error=data.get("torch_error"))


def find_interpreter(python: str | None = None, candidates: Sequence[str] = CANDIDATES) -> Interpreter:
    """`python` when given (it must import torch), else the first of `candidates` that does."""
    if python:
        found = probe(python)
        if found is None:
            raise UsageError(f"Interpreter {python} does not run.", "Pass --python with a Python that exists here.")
        if found.torch is None:
            raise UsageError(f"Interpreter {python} cannot import torch ({found.torch_error}).",
                             "Pass --python with the image's PyTorch interpreter, e.g. /opt/pytorch/bin/python.")
        return found
    tried = []
    for candidate in candidates:
        found = probe(candidate)
        if found is not None and found.torch is not None:
            return found
        tried.append(candidate if found is None else f"{candidate} (no torch)")
    raise UsageError(f"No Python with torch on this machine (tried {', '.join(tried)}).",
                     "Use an image with PyTorch (the Deep Learning AMI, a RunPod PyTorch image) or pass --python.")


# --- requirements -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Requirement:
    """One requirement line and where it came from ("requirements.txt:3")."""

    source: str
    text: str
    name: str
    specifier: str


def parse_requirement(text: str, source: str) -> Requirement | None:
    """A requirement line's name and version specifier (None for options, URLs, blanks)."""
    line = text.split(" #", 1)[0].strip()
    if not line or line.startswith(("#", "-", "git+", "http://", "https://", "file:", ".", "/")):
        return None
    m = _NAME_RE.match(line)
    if m is None or ("@" in line.split(";", 1)[0] and "://" in line):
        return None
    specifier = m.group(3).split(";", 1)[0].strip().replace(" ", "")
    return Requirement(source, line, normalize(m.group(1)), specifier)


def read_requirements(project_dir: str | os.PathLike[str]) -> tuple[list[str], list[Requirement]]:
    """(pip arguments that install the project's requirements, the requirements parsed).

    `requirements.txt` (following its -r includes), else `[project].dependencies` of
    pyproject.toml; trainctl itself is left out (the wheel provides it)."""
    root = Path(project_dir)
    requirements_txt = root / "requirements.txt"
    if requirements_txt.is_file():
        parsed: list[Requirement] = []
        _read_requirements_file(requirements_txt, root, parsed, set())
        return ["-r", str(requirements_txt)], parsed
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"{pyproject} cannot be read ({e}).", "Fix the file; it lists the requirements.") from e
        deps = (data.get("project") or {}).get("dependencies") or []
        parsed = [r for i, text in enumerate(deps) if isinstance(text, str)
                  and (r := parse_requirement(text, f"pyproject.toml dependency {i + 1}")) is not None]
        kept = [r for r in parsed if r.name != "trainctl"]
        return [r.text for r in kept], kept
    return [], []


def _read_requirements_file(path: Path, root: Path, out: list[Requirement], seen: set[Path]) -> None:
    real = path.resolve()
    if real in seen:
        return
    seen.add(real)
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = raw.strip()
        include = re.match(r"^(?:-r|--requirement)(?:\s+|=)(\S+)", line)
        if include:
            _read_requirements_file(path.parent / include.group(1), root, out, seen)
            continue
        found = parse_requirement(line, f"{path.relative_to(root) if path.is_relative_to(root) else path}:{number}")
        if found is not None:
            out.append(found)


def _packaging() -> Any:
    try:
        from packaging import specifiers, version
    except ImportError:
        try:
            from pip._vendor.packaging import (  # pip vendors it everywhere pip is
                specifiers,
                version,
            )
        except ImportError:
            return None
    return specifiers, version


@dataclass(frozen=True)
class TorchReplacement:
    """A requirement of the torch family the image's version may not satisfy."""

    requirement: Requirement
    installed: str | None
    satisfied: bool | None  # None: not known (the image's version is not known here)

    @property
    def message(self) -> str:
        r = self.requirement
        if self.installed is None:
            return (f"{r.source}: '{r.text}' pins {r.name}; the machine keeps its image's {r.name} "
                    f"(a constraints file pins it), so the image's version must satisfy '{r.specifier}'")
        return (f"{r.source}: '{r.text}' would replace the image's {r.name} {self.installed} "
                f"(built for its CUDA driver)")


def torch_replacements(requirements: Iterable[Requirement], installed: dict[str, str] | None) -> list[TorchReplacement]:
    """Which requirements would replace (or, with `installed` None, pin) the image's torch family.
    Requirements without a version, or satisfied by the installed version, are left out."""
    tools = _packaging()
    found = []
    for r in requirements:
        if not in_torch_family(r.name) or not r.specifier:
            continue
        if installed is None:
            found.append(TorchReplacement(r, None, None))
            continue
        have = installed.get(r.name)
        if have is None:
            continue  # not in the image: pip installs one that fits the pinned torch
        satisfied: bool | None = None
        if tools is not None:
            specifiers, version = tools
            try:
                satisfied = specifiers.SpecifierSet(r.specifier).contains(version.Version(have), prereleases=True)
            except (specifiers.InvalidSpecifier, version.InvalidVersion):
                satisfied = None
        if satisfied is not True:
            found.append(TorchReplacement(r, have, satisfied))
    return found


def constraints_text(pinned: dict[str, str], *, allow: Iterable[str] = ()) -> str:
    """A pip constraints file holding the image's torch family at the versions installed."""
    skip = {normalize(n) for n in allow}
    lines = ["# the image's torch family, pinned so no requirement replaces it (trainctl)"]
    lines += [f"{name}=={version}" for name, version in sorted(pinned.items()) if name not in skip]
    return "\n".join(lines) + "\n"


# --- setting up -------------------------------------------------------------------------------

@dataclass
class Prepared:
    """The environment the script runs in."""

    python: str
    mode: str
    interpreter: Interpreter
    requirements: list[str] = field(default_factory=list)
    constraints: str | None = None
    duration_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"python": self.python, "mode": self.mode, "interpreter": self.interpreter.summary(),
                "requirements": self.requirements, "constraints": self.constraints,
                "duration_s": round(self.duration_s, 3)}


def _run_pip(command: list[str], log: Callable[[str], None], *, timeout_s: float) -> None:
    log("$ " + " ".join(command))
    tail: list[str] = []
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PIP_NO_INPUT": "1", "PYTHONNOUSERSITE": "1"})
    except OSError as e:
        raise SetupError(f"pip could not start: {e}.", "Check the interpreter.") from e
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        line = line.rstrip()
        log(line)
        tail = [*tail[-29:], line]
        if time.monotonic() > deadline:
            proc.kill()
            break
    code = proc.wait()
    if code != 0:
        last = next((ln for ln in reversed(tail) if ln.strip().startswith("ERROR")), tail[-1] if tail else "")
        raise SetupError(f"Installing the requirements failed (pip exit {code}): {last.strip()}",
                                "Fix requirements.txt / pyproject.toml (the full pip output is in the session's output), "
                                "then launch again.")


def make_overlay_venv(interpreter: Interpreter, venv_dir: Path) -> str:
    """A venv whose site-packages `.pth` adds the interpreter's own (torch included); returns
    the venv's python."""
    python = venv_dir / "bin" / "python"
    if not python.exists():
        done = subprocess.run([interpreter.path, "-m", "venv", "--without-pip", str(venv_dir)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise SetupError(f"python -m venv failed: {(done.stderr or done.stdout).strip()[-300:]}",
                                    "Use --setup direct to install into the image's interpreter.")
    major_minor = ".".join(interpreter.python.split(".")[:2])
    site_dir = venv_dir / "lib" / f"python{major_minor}" / "site-packages"
    site_dir.mkdir(parents=True, exist_ok=True)
    dirs = list(dict.fromkeys([interpreter.purelib, interpreter.platlib]))
    # `import` lines in a .pth run at start-up: addsitedir also reads the image's own .pth files
    (site_dir / OVERLAY_PTH).write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs), encoding="utf-8")
    return str(python)


def setup_environment(project_dir: str | os.PathLike[str], interpreter: Interpreter, *, mode: str = "auto",
                      venv_dir: str | os.PathLike[str], wheel: str | os.PathLike[str] | None = None,
                      pip_args: Sequence[str] = (), allow_torch_replace: bool = False,
                      log: Callable[[str], None] = lambda line: None, timeout_s: float = 3600.0) -> Prepared:
    """Install the trainctl wheel and the project's requirements for the script; see the module
    docstring for the modes. A requirement that would replace the image's torch is refused
    before pip runs (unless `allow_torch_replace`)."""
    if mode not in MODES:
        raise UsageError(f"Unknown setup mode {mode!r}. Valid: {', '.join(MODES)}.", "Use --setup venv.")
    started = time.monotonic()
    if mode == "none":
        return Prepared(interpreter.path, "none", interpreter, duration_s=time.monotonic() - started)
    install_args, requirements = read_requirements(project_dir)
    pinned = interpreter.pinned()
    replacing = torch_replacements(requirements, pinned)
    if replacing and not allow_torch_replace:
        first = replacing[0]
        raise SetupError(
            first.message + (f" (and {len(replacing) - 1} more)" if len(replacing) > 1 else "") + ".",
            f"Relax the pin (e.g. '{first.requirement.name}>={first.installed}'), pick an image with that version, "
            "or pass --allow-torch-replace.")
    allow = [r.requirement.name for r in replacing] if allow_torch_replace else []
    venv_dir = Path(venv_dir)
    python = interpreter.path
    chosen = mode
    if mode in ("auto", "venv"):
        try:
            python = make_overlay_venv(interpreter, venv_dir)
            chosen = "venv"
        except (SetupError, OSError, subprocess.TimeoutExpired) as e:
            if mode == "venv":
                raise SetupError(f"The overlay venv could not be made: {e}", "Use --setup direct.") from e
            log(f"overlay venv failed ({e}); installing into {interpreter.path}")
            chosen = "direct"
    constraints = venv_dir.parent / "constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text(constraints_text(pinned, allow=allow), encoding="utf-8")
    targets = ([str(wheel)] if wheel else []) + install_args
    if targets:
        command = [python, "-m", "pip", "install", *PIP_BASE_ARGS, "--constraint", str(constraints), *pip_args]
        if chosen == "direct" and interpreter.externally_managed:
            command.append("--break-system-packages")  # the image's own interpreter, on purpose
        if wheel:
            # the laptop's trainctl, even where the image has one of the same version (pip would
            # call that satisfied and keep it); its dependencies come with the next install
            _run_pip([*command, "--no-deps", "--force-reinstall", str(wheel)], log, timeout_s=timeout_s)
        _run_pip(command + targets, log, timeout_s=timeout_s)
    return Prepared(python, chosen, interpreter, [r.text for r in requirements], str(constraints),
                    time.monotonic() - started)
