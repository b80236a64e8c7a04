"""Pre-flight checks: catch what would kill a run minutes in (typo, missing package, full disk) before it starts.

Every check is cheap: the script is parsed, never imported or run, and torch is not imported.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CONFIG_FILE, Config, format_size
from ..errors import PreflightError
from ..redact import REDACTED, is_secret_name

# import name -> the distribution that provides it, where the two differ.
PACKAGE_FOR_MODULE: dict[str, str] = {
    "cv2": "opencv-python",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "bs4": "beautifulsoup4",
    "skimage": "scikit-image",
    "dateutil": "python-dateutil",
    "dotenv": "python-dotenv",
    "attr": "attrs",
    "Crypto": "pycryptodome",
    "jwt": "PyJWT",
    "serial": "pyserial",
    "git": "GitPython",
    "OpenSSL": "pyOpenSSL",
    "MySQLdb": "mysqlclient",
    "psycopg2": "psycopg2-binary",
    "docx": "python-docx",
    "pptx": "python-pptx",
    "fitz": "pymupdf",
    "zmq": "pyzmq",
    "usb": "pyusb",
    "grpc": "grpcio",
    "absl": "absl-py",
    "tree": "dm-tree",
    "hydra": "hydra-core",
    "faiss": "faiss-cpu",
    "flash_attn": "flash-attn",
    "mpl_toolkits": "matplotlib",
    "Levenshtein": "python-Levenshtein",
    "magic": "python-magic",
    "wx": "wxPython",
    "google.protobuf": "protobuf",
    "tensorflow_datasets": "tensorflow-datasets",
    "pytorch_lightning": "pytorch-lightning",
    "lightning": "lightning",
    "torch": "torch",
    "apex": "apex (build it from https://github.com/NVIDIA/apex)",
}


def install_hint(module: str) -> str:
    """'cv2' -> "pip install opencv-python" (the module's top-level name decides)."""
    top = module.split(".")[0]
    package = PACKAGE_FOR_MODULE.get(module) or PACKAGE_FOR_MODULE.get(top) or top
    if " " in package:
        return f"install {package}"
    return f"pip install {package}"


DATA_SUFFIXES = (
    ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini",
    ".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".npy", ".npz", ".parquet", ".arrow",
    ".h5", ".hdf5", ".pkl", ".pickle", ".tar", ".zip", ".gz", ".tfrecord", ".lmdb", ".db",
    ".png", ".jpg", ".jpeg", ".wav", ".mp4", ".py",
)
# Flag names that say a path is written by the script (not checked) or read by it (must exist:
# a missing input fails the run at once or, worse, after the model is built). Any other missing
# path (positional, --model-path) only warns: it may be an output the script creates.
_OUTPUT_WORDS = ("out", "save", "log", "dest", "export", "write", "result", "cache", "tensorboard",
                 "wandb", "run_dir", "rundir", "checkpoint_dir", "ckpt_dir", "checkpoint-dir",
                 "ckpt-dir")
_INPUT_WORDS = ("data", "input", "train", "val", "test", "eval", "config", "cfg", "vocab", "token",
                "weight", "pretrain", "init", "load", "resume", "src", "source", "corpus", "image",
                "label", "annotation", "manifest")
_PATH_FLAG_WORDS = ("path", "dir", "file", "data", "root", "folder")


@dataclass
class CheckResult:
    """One pre-flight check: status is "pass", "warn" or "fail"."""

    name: str
    status: str
    message: str
    hint: str | None = None


@dataclass
class PreflightReport:
    """Every check's result, in the order they ran."""

    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(r.status == "fail" for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    def lines(self, *, error_follows: bool = False) -> list[str]:
        """One line per check (and a hint line under each warning or failure). With
        `error_follows`, the first failure's hint is left to the error that raise_if_failed()
        prints next, so it is shown once."""
        label = {"pass": "ok", "warn": "warn", "fail": "FAIL"}
        first_failure = self.failures[0] if error_follows and self.failures else None
        out = []
        for r in self.results:
            out.append(f"  {label.get(r.status, r.status):<5} {r.name:<12}{r.message}")
            if r.hint and r.status != "pass" and r is not first_failure:
                out.append(f"  {'':<5} {'':<12}hint: {r.hint}")
        return out

    def raise_if_failed(self) -> None:
        """PreflightError (exit 2) naming the first failure; its hint says the fix."""
        failures = self.failures
        if not failures:
            return
        first = failures[0]
        more = f" (and {len(failures) - 1} more check(s) failed)" if len(failures) > 1 else ""
        raise PreflightError(f"pre-flight check '{first.name}' failed: {first.message}{more}",
                             first.hint or "Fix the problem above, or skip the checks with --no-preflight.")


# ---------------------------------------------------------------------------- the script


def _check_script(script: Path) -> tuple[CheckResult, bytes | None]:
    shown = str(script)
    if script.is_symlink() and not script.exists():
        return CheckResult("script", "fail", f"{shown} is a broken symlink (to {os.readlink(script)}).",
                           "Point the link at the script, or name the script itself."), None
    if not script.exists():
        near = _near_names(script)
        return CheckResult("script", "fail", f"{shown} does not exist.",
                           f"Did you mean {near}?" if near else
                           "Check the path (it is relative to the current folder)."), None
    if script.is_dir():
        inside = sorted(p.name for p in script.glob("*.py"))[:3]
        return CheckResult("script", "fail", f"{shown} is a directory, not a script.",
                           "Name the file to run" + (f", e.g. {script / inside[0]}" if inside else "") + "."), None
    if not script.is_file():
        return CheckResult("script", "fail", f"{shown} is not a regular file.",
                           "Name a Python script file."), None
    try:
        source = script.read_bytes()
    except OSError as e:
        return CheckResult("script", "fail", f"{shown} cannot be read ({e.strerror or e}).",
                           f"Check its permissions: chmod u+r {shown}"), None
    if script.suffix not in (".py", ".pyw", "") and not source.startswith(b"#!"):
        # it would still run as Python: a config file passed by mistake "works" until it doesn't
        return CheckResult("script", "warn", f"{shown} is not a .py file; it will be run with Python.",
                           "Name the training script (e.g. train.py); settings go after it as arguments."), source
    return CheckResult("script", "pass", f"{shown} is readable"), source


def _near_names(script: Path) -> str | None:
    import difflib

    folder = script.parent if str(script.parent) else Path(".")
    try:
        names = [p.name for p in folder.iterdir() if p.is_file()]
    except OSError:
        return None
    close = difflib.get_close_matches(script.name, names, n=1)
    return str(folder / close[0]) if close else None


def _compile_result(script: Path, error: dict[str, Any] | None) -> CheckResult:
    if error is None:
        return CheckResult("script", "pass", f"{script} compiles")
    where = f"{script}:{error.get('line') or '?'}:{error.get('col') or '?'}"
    text = (error.get("text") or "").strip()
    shown = f": `{text}`" if text else ""
    hint = (f"Fix the syntax at line {error.get('line') or '?'} of {script.name}; "
            f"check it with: python -m py_compile {script}")
    if script.suffix not in (".py", ""):
        hint = f"trainctl runs the script with Python; {script.name} does not look like a Python file."
    return CheckResult("script", "fail", f"{where}: {error['type']}: {error['msg']}{shown}", hint)


def _syntax_error(source: bytes, filename: str) -> dict[str, Any] | None:
    try:
        compile(source, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes in source
        if isinstance(e, SyntaxError):
            return {"type": type(e).__name__, "msg": e.msg, "line": e.lineno, "col": e.offset,
                    "text": e.text}
        return {"type": "ValueError", "msg": str(e), "line": None, "col": None, "text": None}
    return None


# ---------------------------------------------------------------------------- imports


@dataclass
class ImportUse:
    module: str  # top-level name, e.g. "cv2"
    line: int
    optional: bool  # guarded by try/except ImportError, or under an `if`


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    for n in names:
        label = n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "")
        if label in ("ImportError", "ModuleNotFoundError", "Exception", "BaseException"):
            return True
    return False


def _is_main_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def scan_imports(tree: ast.AST) -> list[ImportUse]:
    """Absolute imports anywhere in the module, each marked optional when guarded."""
    found: list[ImportUse] = []

    def visit(node: ast.AST, optional: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(ImportUse(alias.name.split(".")[0], node.lineno, optional))
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append(ImportUse(node.module.split(".")[0], node.lineno, optional))
            return
        if isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            guarded = optional or any(_catches_import_error(h) for h in node.handlers)  # type: ignore[attr-defined]
            for child in node.body:  # type: ignore[attr-defined]
                visit(child, guarded)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:  # type: ignore[attr-defined]
                visit(child, optional)
            return
        if isinstance(node, ast.If):
            if _is_type_checking(node):
                return  # never runs
            # an import under `if args.use_wandb:` only matters when that branch runs
            conditional = optional or not _is_main_guard(node)
            for child in node.body:
                visit(child, conditional)
            for child in node.orelse:
                visit(child, optional or True)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(tree, False)
    return found


def _beside_script(module: str, folder: Path) -> bool:
    if (folder / module).is_dir():
        return True
    if any((folder / f"{module}{suffix}").is_file() for suffix in (".py", ".pyc", ".pyd", ".so")):
        return True
    return any(folder.glob(f"{glob.escape(module)}.*.so"))  # compiled: name.cpython-311-x86_64-linux-gnu.so


def _missing_in_process(modules: Sequence[str]) -> list[str]:
    import importlib.util

    missing = []
    for name in modules:
        if name in sys.builtin_module_names:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = name in sys.modules
        if not found:
            missing.append(name)
    return missing


# Runs in the target interpreter (any Python 3): compiles the script, finds top-level modules.
_PROBE = r"""
import json, sys
payload = json.loads(sys.argv[1])
script = payload["script"]
sys.path = [p for p in sys.path if p not in ("", ".")]
sys.path.insert(0, payload["folder"])
out = {"version": sys.version.split()[0], "syntax": None, "missing": []}
try:
    with open(script, "rb") as f:
        compile(f.read(), script, "exec", dont_inherit=True)
except SyntaxError as e:
    out["syntax"] = {"type": type(e).__name__, "msg": e.msg, "line": e.lineno, "col": e.offset, "text": e.text}
except ValueError as e:
    out["syntax"] = {"type": "ValueError", "msg": str(e), "line": None, "col": None, "text": None}
import importlib.util
for name in payload["modules"]:
    try:
        ok = name in sys.builtin_module_names or importlib.util.find_spec(name) is not None
    except Exception:
        ok = False
    if not ok:
        out["missing"].append(name)
print(json.dumps(out))
"""


def _probe_interpreter(python: str, script: Path, modules: Sequence[str]) -> dict[str, Any]:
    payload = json.dumps({"script": str(script), "folder": str(script.resolve().parent),
                          "modules": list(modules)})
    try:
        proc = subprocess.run([python, "-c", _PROBE, payload], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run {python}: {e}") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{python} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_interpreter(python: str) -> bool:
    # don't resolve symlinks: a venv's python links to the base one but has other packages
    return os.path.abspath(python) == os.path.abspath(sys.executable)


def _import_results(script: Path, uses: list[ImportUse], missing: set[str],
                    interpreter: str) -> list[CheckResult]:
    if not uses:
        return [CheckResult("imports", "pass", "no imports to check")]
    results = []
    required_missing = sorted({u.module for u in uses if u.module in missing and not u.optional},
                              key=lambda m: min(u.line for u in uses if u.module == m))
    optional_missing = sorted({u.module for u in uses if u.module in missing and u.optional}
                              - set(required_missing))

    def first_line(m: str) -> int:
        return min(u.line for u in uses if u.module == m)

    for m in required_missing:
        results.append(CheckResult(
            "imports", "fail", f"{script.name}:{first_line(m)} imports '{m}', which is not installed in {interpreter}.",
            f"Install it: {install_hint(m)}"))
    for m in optional_missing:
        results.append(CheckResult(
            "imports", "warn", f"{script.name}:{first_line(m)} optionally imports '{m}' (guarded), which is not installed.",
            f"The script runs without it; to use it: {install_hint(m)}"))
    if not results:
        n = len({u.module for u in uses})
        results.append(CheckResult("imports", "pass", f"{n} imported module{'s' if n != 1 else ''} found in {interpreter}"))
    return results


# ---------------------------------------------------------------------------- resume flag


_PARSER_CALLS = ("add_argument", "option", "Option", "argument", "Argument", "DEFINE_string", "add_option")


def _defined_flags(tree: ast.AST) -> list[str]:
    """Option strings given to argparse/click/optparse-style definitions."""
    flags = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _PARSER_CALLS:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                        flags.append(arg.value)
    return flags


def _uses_trainctl_init(tree: ast.AST) -> bool:
    imports_init = False
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "init" and isinstance(node.value, ast.Name)
                and node.value.id == "trainctl"):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "trainctl" and any(
                a.name == "init" for a in node.names):
            imports_init = True
    return imports_init


def _module_assigns(tree: ast.AST, name: str) -> bool:
    for node in getattr(tree, "body", []):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def _check_resume(script: Path, tree: ast.AST, source: str, config: Config) -> CheckResult:
    flag = config.resume_flag
    name = flag.split("=", 1)[0]
    config_file = config.path or (config.root / CONFIG_FILE)
    flags = _defined_flags(tree)
    if name in flags:
        return CheckResult("resume", "pass", f"{script.name} defines {name}; the checkpoint is passed with it")
    if "=" in flag and _module_assigns(tree, name.lstrip("-")):
        # nanoGPT-style configurator: `--init_from=resume` overrides a module-level variable
        return CheckResult("resume", "pass", f"{script.name} sets {name.lstrip('-')}, which {flag} overrides")
    if _uses_trainctl_init(tree):
        return CheckResult("resume", "pass",
                           f"{script.name} calls trainctl.init(), which reads the checkpoint from TRAIN_OPS_RESUME")
    if f"'{name}'" in source or f'"{name}"' in source:
        return CheckResult("resume", "pass", f"{script.name} mentions {name}")
    from .script_conventions import detect_resume_conventions

    conventions = detect_resume_conventions(source)
    resume_like = [f for f in flags if any(w in f.lower() for w in ("resume", "ckpt", "checkpoint", "restore", "load", "init"))]
    if conventions:
        c = conventions[0]
        where = f" ({script.name} line {c.line})" if c.line else ""
        hint = (f"It {c.why}: set resume_flag = \"{c.flag}\" in {config_file}{where}, "
                f"or add {name} to the script.")
    elif resume_like:
        hint = (f"It defines {resume_like[0]}: set resume_flag = \"{resume_like[0]}\" in {config_file}, "
                f"or add {name} to the script.")
    else:
        hint = (f"Add parser.add_argument(\"{name}\") to the script (or call trainctl.init() in it), "
                f"or set the flag it takes in {config_file}: resume_flag = \"--checkpoint\".")
    return CheckResult("resume", "fail", f"{script.name} does not accept {name}, so it cannot be resumed.", hint)


# ---------------------------------------------------------------------------- arguments


def _path_args(args: Sequence[str]) -> list[tuple[str | None, str]]:
    """(flag name or None, value) for every argument that looks like a path."""
    out: list[tuple[str | None, str]] = []
    pending_flag: str | None = None
    for arg in args:
        flag: str | None
        if arg.startswith("-") and not _looks_negative_number(arg):
            name, eq, value = arg.partition("=")
            if not eq:
                pending_flag = name
                continue
            flag = name
        elif "=" in arg and not arg.startswith(("/", ".")) and "/" not in arg.split("=", 1)[0]:
            flag, _eq, value = arg.partition("=")  # key=value overrides (hydra, nanoGPT)
            pending_flag = None
        else:
            flag, value = pending_flag, arg
            pending_flag = None
        if _looks_like_path(flag, value):
            out.append((flag, value))
    return out


def _looks_negative_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def _looks_like_path(flag: str | None, value: str) -> bool:
    if not value or "://" in value or "$" in value or "{" in value:
        return False
    if "/" in value or value.lower().endswith(DATA_SUFFIXES):
        return not _looks_negative_number(value)
    lowered = (flag or "").lower()
    return bool(flag) and any(w in lowered for w in _PATH_FLAG_WORDS) and value not in ("", "none", "None")


def _check_arguments(args: Sequence[str], cwd: Path) -> list[CheckResult]:
    candidates = _path_args(args)
    if not candidates:
        return []
    missing_fail, missing_warn, present = [], [], []
    for flag, value in candidates:
        path = Path(os.path.expanduser(value))
        if not path.is_absolute():
            path = cwd / path
        exists = path.exists() if not glob.has_magic(str(path)) else bool(glob.glob(str(path)))
        if exists:
            present.append(value)
            continue
        lowered = (flag or "").lower()
        shown = f"{flag} {REDACTED if is_secret_name(flag) else value}" if flag else value
        if any(w in lowered for w in _OUTPUT_WORDS):
            continue  # the script writes it
        if flag and any(w in lowered for w in _INPUT_WORDS):
            missing_fail.append(shown)
        else:
            missing_warn.append(shown)
    results = []
    for shown in missing_fail:
        results.append(CheckResult("arguments", "fail", f"{shown}: no such file or folder.",
                                   f"Check the path (relative to {cwd}); the script reads it."))
    for shown in missing_warn:
        results.append(CheckResult("arguments", "warn", f"{shown}: no such file or folder (yet).",
                                   "Fine if the script creates it; otherwise check the path."))
    if present and not results:
        listed = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        results.append(CheckResult("arguments", "pass", f"paths exist: {listed}"))
    return results


# ---------------------------------------------------------------------------- disks and GPUs


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _check_dir(name: str, what: str, path: Path, min_free_gb: float) -> CheckResult:
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return CheckResult(name, "fail", f"{what} {path} cannot be created: {existing} is a file.",
                           f"Move {existing} away, or set {'checkpoint_dir' if name == 'checkpoints' else 'state_dir'} in trainctl.toml.")
    if not os.access(existing, os.W_OK | os.X_OK):
        return CheckResult(name, "fail", f"{what} {path} is not writable ({existing} is read-only to this user).",
                           f"Fix the permissions of {existing}, or set {'checkpoint_dir' if name == 'checkpoints' else 'state_dir'} in trainctl.toml to a writable folder.")
    try:
        free = shutil.disk_usage(existing).free
    except OSError as e:
        return CheckResult(name, "warn", f"cannot read the free space of {existing}: {e}")
    if min_free_gb and free < min_free_gb * 2**30:
        return CheckResult(name, "fail",
                           f"{what} {path} has only {format_size(free)} free (min_free_gb = {min_free_gb:g}).",
                           "Free some space (trainctl checkpoint cleanup --dry-run shows what retention would remove), "
                           "point the folder at a bigger disk, or lower min_free_gb in trainctl.toml.")
    state = "exists" if existing == path else "will be created"
    return CheckResult(name, "pass", f"{what} {path} {state}, writable, {format_size(free)} free")


def visible_gpus() -> list[dict[str, Any]]:
    """GPUs this process can use: nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES."""
    from .. import sysinfo

    gpus = sysinfo.gpu_description()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None or "torch" in sys.modules:
        return gpus
    wanted = [w.strip() for w in mask.split(",") if w.strip()]
    if not wanted or wanted[0] == "-1":
        return []
    if all(w.isdigit() for w in wanted):
        return [g for g in gpus if str(g.get("index")) in wanted]
    return gpus[:len(wanted)]  # UUIDs or MIG names: trust the count


def _check_gpus(requested: int) -> CheckResult:
    gpus = visible_gpus()
    listed = ", ".join(f"{g.get('index')}: {g.get('name')} ({g.get('memory_gb')} GB)" for g in gpus)
    if requested and len(gpus) < requested:
        have = f"only {len(gpus)} visible ({listed})" if gpus else "none visible"
        hint = ("Check `nvidia-smi` and CUDA_VISIBLE_DEVICES, run where the GPUs are, "
                "or lower --gpus / `gpus` in trainctl.toml (0 runs on CPU).")
        return CheckResult("gpus", "fail", f"{requested} GPU{'s' if requested > 1 else ''} requested, {have}.", hint)
    if gpus:
        return CheckResult("gpus", "pass", f"{len(gpus)} visible: {listed}")
    return CheckResult("gpus", "pass", "none requested, none visible (the script runs on CPU)")


# ---------------------------------------------------------------------------- entry point


def _check_resume_source(script: Path, resume: str, force: bool) -> CheckResult | None:
    """A checkpoint another script wrote is refused unless --force."""
    from .. import checkpoint
    from ..resume import script_state

    try:
        meta = checkpoint.inspect(resume).meta or {}
    except Exception:  # unreadable: verification says why, elsewhere
        return None
    if script_state(meta.get("script"), meta.get("script_digest"), str(script.resolve())) != "other":
        return None
    message = f"{resume} was written by another script, {meta.get('script')}"
    if force:
        return CheckResult("resume", "warn", message + " (resumed anyway: --force)")
    return CheckResult("resume", "fail", message + ".",
                       "Resume a checkpoint this script wrote (trainctl checkpoint list), or pass --force.")


def run_preflight(script: str | Path, args: Sequence[str], config: Config, *, resume: str | None = None,
                  gpus: int | None = None, python: str = sys.executable, force: bool = False) -> PreflightReport:
    """Run every check on `python script args...` without starting it; never raises for a failed check."""
    script = Path(script)
    report = PreflightReport()
    add = report.results.append

    if config.path is not None:
        add(CheckResult("config", "pass", f"{config.path} is valid"))
    else:
        add(CheckResult("config", "pass", f"no {CONFIG_FILE} (defaults; `trainctl init` writes one)"))

    result, data = _check_script(script)
    if data is None:
        add(result)
    else:  # the launcher runs every script with Python, whatever its suffix
        interpreter = "this Python" if _same_interpreter(python) else python
        syntax = _syntax_error(data, str(script))
        tree = None
        uses: list[ImportUse] = []
        if syntax is None:
            tree = ast.parse(data, str(script))
            folder = script.resolve().parent
            uses = [u for u in scan_imports(tree) if not _beside_script(u.module, folder)]
        modules = sorted({u.module for u in uses})
        missing: set[str] = set()
        probe_error = None
        if _same_interpreter(python):
            missing = set(_missing_in_process(modules))
        else:
            try:
                probe = _probe_interpreter(python, script, modules)
                syntax = probe["syntax"]  # the interpreter that runs it decides what is valid syntax
                missing = set(probe["missing"])
                interpreter = f"{python} (Python {probe['version']})"
            except RuntimeError as e:
                probe_error = str(e)
        if probe_error:
            add(CheckResult("python", "fail", probe_error, "Pass an interpreter that runs, e.g. python3."))
        add(_compile_result(script, syntax))
        if syntax is None and tree is not None and not probe_error:
            for r in _import_results(script, uses, missing, interpreter):
                add(r)
            if resume is not None:
                add(_check_resume(script, tree, data.decode("utf-8", "replace"), config))
        if resume and resume != "auto" and Path(resume).exists():
            source = _check_resume_source(script, resume, force)
            if source is not None:
                add(source)

    for r in _check_arguments(args, Path.cwd()):
        add(r)
    min_free = float(config.get("", "min_free_gb"))
    add(_check_dir("checkpoints", "checkpoint dir", config.checkpoint_dir, min_free))
    add(_check_dir("state", "state dir", config.state_dir, min_free))
    requested = gpus if gpus is not None else int(config.get("", "gpus") or 0)
    add(_check_gpus(requested))
    return report
