"""trainctl.toml: finding the project root, loading, validating (with file:line in every error)."""

from __future__ import annotations

import difflib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_FILE = "trainctl.toml"

# section -> key -> (types, default, description). "" is the top-level table.
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any, str]]] = {
    "": {
        "state_dir": ((str,), ".trainctl", "where sessions are recorded, relative to the project root"),
        "checkpoint_dir": ((str,), "checkpoints", "checkpoints go to <checkpoint_dir>/<session id>"),
        "resume_flag": ((str,), "--resume", "flag the script takes a checkpoint path with ('--init_from=resume' style scripts: set it here)"),
        "min_free_gb": ((int, float), 1.0, "pre-flight fails when the checkpoint dir has less free space"),
        "gpus": ((int,), 0, "GPUs the script needs; pre-flight fails when fewer are visible"),
        "net_check": ((bool,), True, "a multi-node job all-reduces a small tensor across its nodes before the script starts (every node or none)"),
        "net_check_timeout_s": ((int, float), 600, "how long that check waits for every node to join (torchrun's own join timeout)"),
    },
    "retention": {
        "keep_last_n": ((int,), 0, "keep the newest N checkpoints (0: keep all)"),
        "keep_best_k": ((int,), 0, "also keep the K best by `metric` (0: off)"),
        "metric": ((str,), "loss", "metric that ranks checkpoints for keep_best_k"),
        "mode": ((str,), "min", "min or max: which end of `metric` is best"),
        "max_total_size": ((str,), "", "size cap for one session's checkpoints, e.g. '20G' (empty: none)"),
    },
    "restart": {
        "max_restarts": ((int,), 0, "automatic restarts after a preemption or crash"),
        "restart_on": ((list,), ["preempted", "failed"], "statuses that trigger a restart: preempted, failed"),
        "restart_delay_s": ((int, float), 2.0, "seconds to wait before a restart"),
        "grace_period_s": ((int, float), 30.0, "seconds between forwarding a stop signal and SIGKILL"),
    },
    "signals": {
        "preempt": ((list,), ["SIGTERM", "SIGUSR1"], "signals that make the script write an emergency checkpoint and stop"),
        "checkpoint": ((list,), ["SIGUSR2"], "signals that make the script write a checkpoint and keep training"),
    },
    "monitor": {
        "stall_minutes": ((int, float), 10.0, "warn when no output or metric arrived for this long"),
        "checkpoint_overdue_minutes": ((int, float), 60.0, "warn when the newest checkpoint is older than this"),
        "window": ((int,), 50, "metric points used for trend, slope and divergence"),
    },
    "metrics": {
        "parse_output": ((bool,), True, "parse metrics from the script's output"),
        "patterns": ((list,), [], "extra regexes with named groups (?P<name>...) for metrics"),
    },
    "checkpoints": {
        "watch": ((list,), [], "globs (relative to the project root) of checkpoints the script writes itself, e.g. [\"out/*.pt\"]; folders its arguments name and new checkpoint files under the working directory are watched anyway"),
        "snapshot": ((bool,), False, "copy each version of a checkpoint the script writes itself into the session's checkpoint dir, so an in-place overwrite can't lose the last good one"),
    },
    "cloud": {
        "storage": ((str,), "", "where cloud sessions live: s3://bucket/prefix (any S3-compatible store) or a folder (empty: none)"),
        "endpoint_url": ((str,), "", "S3 endpoint of a store other than AWS, e.g. https://<account>.r2.cloudflarestorage.com (empty: AWS)"),
        "region": ((str,), "", "region of the bucket (empty: from the AWS configuration)"),
        "checksums": ((str,), "when_supported", "when_required for stores that reject the CRC checksums boto3 sends by default"),
        "budget_usd": ((int, float), 0, "most one cloud session may cost; a launch whose --max-hours could exceed it is refused (0: no budget)"),
    },
    "aws": {
        "region": ((str,), "", "region of the machines and the bucket (empty: from the AWS configuration)"),
        "profile": ((str,), "", "AWS profile to use (empty: the usual credentials chain)"),
        "endpoint_url": ((str,), "", "one endpoint for every AWS service, e.g. LocalStack (empty: AWS)"),
        "bucket": ((str,), "", "S3 bucket of the cloud sessions (trainctl aws setup makes it)"),
        "prefix": ((str,), "trainctl", "key prefix of the sessions in the bucket"),
        "max_attempts": ((int,), 8, "attempts per AWS request, with backoff, before an error"),
        "ami": ((str,), "auto", "auto (the newest PyTorch Deep Learning AMI) or an AMI id (ami-...)"),
        "disk_gb": ((int,), 100, "root volume of each machine, in GB"),
    },
    "runpod": {
        "gpu": ((str,), "", "GPU type for trainctl runpod launch, e.g. \"NVIDIA RTX A4000\" (see: trainctl runpod gpus)"),
        "gpu_count": ((int,), 1, "GPUs per pod"),
        "cloud": ((str,), "secure", "secure or community"),
        "interruptible": ((bool,), False, "rent interruptible (spot) pods: cheaper, stopped when outbid; resumed from storage"),
        "image": ((str,), "", "container image (empty: RunPod's PyTorch image trainctl is tested with)"),
        "container_disk_gb": ((int,), 50, "the pod's container disk: image, code, local checkpoints"),
        "volume_gb": ((int,), 0, "a pod volume at /workspace (billed while the pod exists, even stopped)"),
        "max_hours": ((int, float), 24.0, "the pod ends by launch time + this, even if trainctl and its agent are gone"),
        "provision_timeout_min": ((int, float), 20.0, "a pod still provisioning after this is terminated"),
        "setup": ((str,), "auto", "how the pod installs the project's requirements on the image's torch: auto, venv, direct, none"),
        "secrets": ((dict,), {}, "variables the pod gets from RunPod secrets: { NAME = \"secret name\" }; the storage credentials go here"),
    },
}

CHOICES = {("retention", "mode"): ("min", "max"), ("cloud", "checksums"): ("when_supported", "when_required"),
           ("runpod", "cloud"): ("secure", "community"), ("runpod", "setup"): ("auto", "venv", "direct", "none")}
# numbers with a floor above 0 (every number must be finite and not negative)
MINIMUMS: dict[tuple[str, str], int | float] = {("monitor", "window"): 1, ("runpod", "gpu_count"): 1,
                                                ("aws", "max_attempts"): 1, ("aws", "disk_gb"): 1,
                                                ("", "net_check_timeout_s"): 1}


@dataclass
class Config:
    """The resolved configuration of one project."""

    root: Path
    path: Path | None = None
    values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, section: str, key: str) -> Any:
        return self.values.get(section, {}).get(key, SCHEMA[section][key][1])

    @property
    def state_dir(self) -> Path:
        return (self.root / self.get("", "state_dir")).resolve()

    @property
    def checkpoint_dir(self) -> Path:
        return (self.root / self.get("", "checkpoint_dir")).resolve()

    @property
    def resume_flag(self) -> str:
        return self.get("", "resume_flag")

    @classmethod
    def from_resolved(cls, path: str | Path) -> Config:
        """Read back what `resolved()` wrote (the launcher hands it to the script as JSON)."""
        import json

        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        values = {section: {k: v for k, v in (data if not section else data.get(section) or {}).items()
                            if k in keys}
                  for section, keys in SCHEMA.items()}
        return cls(root=Path(data.get("project_root") or Path.cwd()),
                   path=Path(data["config_file"]) if data.get("config_file") else None,
                   values=values)

    def resolved(self) -> dict[str, Any]:
        """Every key with its effective value, as plain JSON data."""
        out: dict[str, Any] = {}
        for section, keys in SCHEMA.items():
            table = {k: self.get(section, k) for k in keys}
            if section:
                out[section] = table
            else:
                out.update(table)
        out["project_root"] = str(self.root)
        out["config_file"] = str(self.path) if self.path else None
        return out


def find_project_root(start: Path | None = None) -> tuple[Path, Path | None]:
    """Nearest folder upwards with trainctl.toml (or pyproject.toml with [tool.trainctl])."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            return folder, candidate
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                text = pyproject.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if re.search(r"^\s*\[tool\.trainctl(\.|\])", text, re.MULTILINE):
                return folder, pyproject
    return here, None


def _line_of(text: str, key: str, section: str) -> int | None:
    """Best-effort line number of `key` (inside `[section]` when given)."""
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.match(r"^\[+\s*([^\]]+?)\s*\]+", stripped)
        if header:
            current = header.group(1)
            if current.startswith("tool.trainctl"):
                current = current[len("tool.trainctl"):].lstrip(".")
            if not key and current == section:
                return number
            continue
        if key and current == section and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def validate(data: dict[str, Any], *, path: str | None = None, text: str = "") -> dict[str, dict[str, Any]]:
    """Check keys, types and values; return {section: {key: value}}. Raises ConfigError."""
    values: dict[str, dict[str, Any]] = {s: {} for s in SCHEMA}

    def fail(message: str, hint: str | None, key: str, section: str) -> None:
        raise ConfigError(message, hint, path=path, line=_line_of(text, key, section))

    for key, value in data.items():
        if isinstance(value, dict) and key in SCHEMA and key:
            section_items = value.items()
            section = key
        elif key in SCHEMA[""]:
            section_items = [(key, value)]
            section = ""
        else:
            known = [k for k in SCHEMA if k] + list(SCHEMA[""])
            close = difflib.get_close_matches(key, known, n=1)
            fail(f"unknown key '{key}'.", f"Did you mean '{close[0]}'?" if close else
                 f"Valid keys: {', '.join(sorted(known))}.", key, "")
            raise AssertionError  # unreachable
        for k, v in section_items:
            spec = SCHEMA[section].get(k)
            dotted = f"{section}.{k}" if section else k
            if spec is None:
                close = difflib.get_close_matches(k, list(SCHEMA[section]), n=1)
                fail(f"unknown key '{dotted}'.",
                     f"Did you mean '{close[0]}'?" if close else f"Valid keys in [{section}]: {', '.join(SCHEMA[section])}.",
                     k, section)
            types, default, _doc = spec
            if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
                fail(f"'{dotted}' must be {_type_name(types)}, not {type(v).__name__} ({v!r}).",
                     f"Fix the value of '{k}' in the config file.", k, section)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                # NaN compares false with everything: unchecked, it silently turns a limit off
                if not math.isfinite(v):
                    fail(f"'{dotted}' must be a finite number, not {v!r}.",
                         f"Set {k} to a number, e.g. {k} = {default!r}.", k, section)
                if v < 0:
                    fail(f"'{dotted}' must not be negative ({v!r}).", "Use 0 or a positive value.", k, section)
                minimum = MINIMUMS.get((section, k))
                if minimum is not None and v < minimum:
                    fail(f"'{dotted}' must be at least {minimum}, not {v!r}.", f"Set {k} = {minimum} or more.", k, section)
            choices = CHOICES.get((section, k))
            if choices and v not in choices:
                fail(f"'{dotted}' must be one of {', '.join(choices)}, not {v!r}.",
                     f"Set {k} = \"{choices[0]}\".", k, section)
            if (section, k) == ("retention", "max_total_size") and v:
                try:
                    parse_size(v)
                except ValueError as e:
                    fail(f"'{dotted}' is {e}.", "Use a size like '500M' or '20G'.", k, section)
            if (section, k) == ("metrics", "patterns"):
                for pattern in v:
                    try:
                        compiled = re.compile(pattern) if isinstance(pattern, str) else None
                    except re.error as e:
                        fail(f"metrics pattern {pattern!r} is not a valid regex: {e}.",
                             "Fix the pattern; test it with: trainctl monitor --log FILE --parsed --pattern '...'", k, section)
                    if compiled is None or not compiled.groupindex:
                        fail(f"metrics pattern {pattern!r} has no named group.",
                             "Name what it captures, e.g. 'gnorm=(?P<grad_norm>[0-9.e+-]+)'.", k, section)
                    from .backtracking import BACKTRACKING_HINT, backtracking_risk

                    if backtracking_risk(pattern):
                        fail(f"metrics pattern {pattern!r} {backtracking_risk(pattern)}.", BACKTRACKING_HINT, k, section)
            if section == "signals":
                import signal as signal_mod

                bad = [x for x in v if not (isinstance(x, str) and isinstance(getattr(signal_mod, x.upper(), None), signal_mod.Signals))]
                if bad:
                    fail(f"'signals.{k}' has unknown signal {bad[0]!r}.",
                         "Use names like \"SIGTERM\", \"SIGUSR1\", \"SIGUSR2\".", k, section)
            if (section, k) in (("aws", "max_attempts"), ("aws", "disk_gb")) and v < (1 if k == "max_attempts" else 8):
                fail(f"'{dotted}' must be at least {1 if k == 'max_attempts' else 8}, not {v!r}.",
                     "Fix the value in the config file.", k, section)
            if (section, k) == ("aws", "ami") and v != "auto" and not v.startswith("ami-"):
                fail(f"'aws.ami' must be \"auto\" or an AMI id (ami-...), not {v!r}.", "Set ami = \"auto\".", k, section)
            if section in ("cloud", "aws") and k in ("storage", "endpoint_url") and v:
                # storage.uri is the one URI grammar (stdlib only), so this error and open_store agree
                from .errors import UsageError
                from .storage.uri import check_endpoint_url, parse_uri

                try:
                    parse_uri(v) if k == "storage" else check_endpoint_url(v)
                except UsageError as e:
                    fail(e.message, e.hint, k, section)
            if (section, k) == ("checkpoints", "watch"):
                try:
                    validate_watch_globs(v)
                except ValueError as e:
                    fail(f"{e}.", "Write globs like \"out/*.pt\" or \"runs/**/checkpoint-*\".", k, section)
            if (section, k) == ("runpod", "secrets"):
                bad = [n for n, secret in v.items() if not (re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", n) and isinstance(secret, str) and secret)]
                if bad:
                    fail(f"'runpod.secrets' entry {bad[0]!r} is not NAME = \"secret name\".",
                         'Write it as secrets = { AWS_ACCESS_KEY_ID = "my_key_id_secret" }.', k, section)
            if (section, k) == ("restart", "restart_on"):
                bad = [s for s in v if s not in ("preempted", "failed")]
                if bad:
                    fail(f"'restart.restart_on' has unknown status {bad[0]!r}.",
                         "Valid: preempted, failed.", k, section)
            values[section][k] = v
    return values


def validate_watch_globs(globs: Any) -> list[str]:
    """The `[checkpoints] watch` list, checked; a bad entry raises ValueError naming it."""
    if not isinstance(globs, (list, tuple)):
        raise ValueError(f"'checkpoints.watch' must be a list of globs, not {type(globs).__name__}")
    out = []
    for g in globs:
        if not isinstance(g, str) or not g.strip():
            raise ValueError(f"'checkpoints.watch' has {g!r}: each entry is a glob such as \"out/*.pt\"")
        if "\x00" in g:
            raise ValueError(f"'checkpoints.watch' has {g!r}: a glob cannot hold a NUL character")
        for part in Path(g).parts:
            if part.count("[") != part.count("]"):
                raise ValueError(f"'checkpoints.watch' has {g!r}: an unclosed '[' in {part!r}")
            if "**" in part and part != "**":
                raise ValueError(f"'checkpoints.watch' has {g!r}: '**' must be a whole path part, as in \"runs/**/*.pt\"")
        out.append(g)
    return out


def load(start: Path | None = None) -> Config:
    """Find and read the project's config; defaults when there is none."""
    root, path = find_project_root(start)
    if path is None:
        return Config(root=root)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the config file ({e.__class__.__name__}: {e}).",
                          "Check the file's permissions, or recreate it with: trainctl init --force",
                          path=str(path)) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None)
        if line is None:
            m = re.search(r"line (\d+)", str(e))
            line = int(m.group(1)) if m else (text.count("\n") or 1)  # "at end of document"
        msg = getattr(e, "msg", str(e))
        raise ConfigError(f"malformed TOML: {msg}.", "Fix the syntax at that line (strings need quotes).",
                          path=str(path), line=line) from e
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("trainctl", {})
    return Config(root=root, path=path, values=validate(data, path=str(path), text=text))


def save_table(cfg: Config, section: str, values: dict[str, str]) -> tuple[Path | None, dict[str, Any]]:
    """Record `values` under `[section]` of the project's config (trainctl.toml is created when
    there is none): keys the table lacks are added right under its header, a missing table is
    appended; nothing already written is changed. Returns (the file written, or None when
    nothing was missing; {key: the value the file has} where it differs from `values`)."""
    import json

    from .fsutil import atomic_write_bytes

    have = cfg.values.get(section, {})
    differs = {k: have[k] for k, v in values.items() if k in have and have[k] != v}
    missing = {k: v for k, v in values.items() if k not in have}
    if not missing:
        return None, differs
    path = cfg.path or cfg.root / CONFIG_FILE
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    header = f"[tool.trainctl.{section}]" if path.name == "pyproject.toml" else f"[{section}]"
    lines = [f"{k} = {json.dumps(v)}" for k, v in missing.items()]  # a JSON string is a TOML basic string
    found = re.search(rf"^[ \t]*{re.escape(header)}[ \t]*(#.*)?$", text, re.MULTILINE)
    if found:
        end = found.end()
        text = text[:end] + "\n" + "\n".join(lines) + text[end:]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") \
            + header + "\n" + "\n".join(lines) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path, differs


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'20G' -> bytes. Accepts K, M, G, T (powers of 1024), optional 'B'/'iB'."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def format_size(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError


def template() -> str:
    """A commented trainctl.toml with every key at its default."""
    lines = ["# trainctl project configuration. Every key is optional; shown at its default.", ""]

    def render(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list):
            return "[" + ", ".join(render(x) for x in v) + "]"
        return repr(v)

    for section, keys in SCHEMA.items():
        if section:
            lines += ["", f"[{section}]"]
        for key, (_types, default, doc) in keys.items():
            lines.append(f"# {doc}")
            lines.append(f"{key} = {render(default)}")
    return "\n".join(lines) + "\n"
