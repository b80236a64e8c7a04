"""Failure diagnosis: read the tail of a failed run's output and say what happened, why, and what to do.

Rules are tried in order, most specific first; the first that matches wins. Each works on text
only (no torch import), so recorded output from any machine can be diagnosed here.
"""

from __future__ import annotations

import os
import re
import shlex
import signal as signal_mod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from .preflight import install_hint


@dataclass
class Diagnosis:
    """What happened, the likely cause, the fix, and the command that recovers (when there is one)."""

    kind: str
    what: str
    cause: str
    fix: str
    command: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"what happened  {self.what}", f"likely cause   {self.cause}", f"fix            {self.fix}"]
        if self.command:
            out.append(f"run            {self.command}")
        return out


@dataclass
class Failure:
    """A parsed view of the output tail and exit status that the rules read."""

    text: str
    exit_code: int | None
    signal_name: str | None
    script: str
    args: list[str]
    resume_flag: str
    exception: tuple[str, str] | None = None  # (type, message) of the last traceback
    location: str | None = None  # "train.py:42" of the innermost frame outside site-packages
    lines: list[str] = field(default_factory=list)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
# torchrun / elastic prefix every line of a rank: "[rank0]: ", "[default0]:"
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")
_FRAME = re.compile(r'^\s+File "([^"]+)", line (\d+)(?:, in (.+))?')


def _clean(text: str) -> list[str]:
    lines = []
    for raw in _ANSI.sub("", text).splitlines():
        line = raw.rsplit("\r", 1)[-1] if "\r" in raw.rstrip("\r") else raw.rstrip("\r")
        lines.append(_RANK_PREFIX.sub("", line))
    return lines


def _last_exception(lines: list[str]) -> tuple[tuple[str, str] | None, str | None]:
    """The last traceback's exception and the innermost frame of the user's code. The script's
    stdout and stderr are read apart, so a line of other output can land inside the traceback:
    a line followed by more frames is skipped, and of the lines after the frames the first that
    looks like an exception is taken."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return None, None
    i = starts[-1] + 1
    location = None
    while i < len(lines):
        line = lines[i]
        if line.strip() and not line.startswith((" ", "\t")) and \
                not (i + 1 < len(lines) and lines[i + 1].startswith((" ", "\t"))):
            break  # the exception line (or what stands for it)
        frame = _FRAME.match(line)
        if frame and not _is_library(frame.group(1)):
            location = f"{_short(frame.group(1))}:{frame.group(2)}"
        i += 1
    if i >= len(lines):
        return None, location
    found = None
    for j in range(i, min(i + 4, len(lines))):
        m = _EXC_LINE.match(lines[j].strip())
        if m and (found is None or _looks_like_exception(m)):
            found = (j, m)
            if _looks_like_exception(m):
                break
    if found is None:
        return None, location
    j, m = found
    message = [m.group(2) or ""]
    for follow in lines[j + 1:]:
        if not follow.strip() or not follow.startswith((" ", "\t")):
            break
        message.append(follow.strip())
    return (m.group(1), "\n".join(message).strip()), location


def _looks_like_exception(m: re.Match[str]) -> bool:
    name = m.group(1).rsplit(".", 1)[-1]
    return m.group(2) is not None or "." in m.group(1) or \
        name.endswith(("Error", "Exception", "Interrupt", "Exit", "Warning", "Iteration", "Failure"))


def _is_library(path: str) -> bool:
    """Not the user's code: installed packages, the standard library, trainctl itself."""
    return ("site-packages" in path or "dist-packages" in path or path.startswith("<")
            or "/lib/python" in path or _is_trainctl(path))


_TRAINCTL_DIR = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def _trainctl_files() -> frozenset[str]:
    return frozenset(str(p.relative_to(_TRAINCTL_DIR)).replace(os.sep, "/") for p in _TRAINCTL_DIR.rglob("*.py"))


def _is_trainctl(path: str) -> bool:
    """A frame in trainctl's own code (run.restore() calling load_state_dict, say): this copy,
    or one on the machine that recorded the output (a source checkout or an installed one)."""
    if path.startswith(str(_TRAINCTL_DIR) + os.sep):
        return True
    parts = path.replace("\\", "/").split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "trainctl" and "/".join(parts[i + 1:]) in _trainctl_files():
            return True
    return False


def _short(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _first(pattern: str, text: str, flags: int = 0) -> re.Match[str] | None:
    return re.search(pattern, text, flags | re.MULTILINE)


def _exc_is(f: Failure, *names: str) -> bool:
    return bool(f.exception) and f.exception[0].rsplit(".", 1)[-1] in names  # type: ignore[index]


def _at(f: Failure) -> str:
    return f" at {f.location}" if f.location else ""


# ---------------------------------------------------------------------------- rules


def _resume_flag(f: Failure) -> Diagnosis | None:
    name = f.resume_flag.split("=", 1)[0]
    m = _first(r"error: unrecognized arguments?: (.*)$", f.text)
    rejected = m and name in m.group(1).split()
    click = _first(rf"(?:No such option|no such option): {re.escape(name)}\b", f.text)
    if not (rejected or click):
        return None
    usage = _first(r"^usage: .*$", f.text)
    defined = re.findall(r"\[?(--?[\w-]+)", usage.group(0)) if usage else []
    alt = [d for d in defined if any(w in d.lower() for w in ("resume", "ckpt", "checkpoint", "restore", "load"))
           and d != name]
    suggestion = f'resume_flag = "{alt[0]}"' if alt else 'resume_flag = "--your-flag"'
    return Diagnosis(
        "resume_flag", f"the script does not accept {name}: {(m.group(0) if m else click.group(0)).strip()}",  # type: ignore[union-attr]
        f"trainctl passed the checkpoint with {name} when resuming, but the script's argument parser "
        "does not define that flag" + (f" (it takes {alt[0]})" if alt else "") + ".",
        f"set the flag the script takes in trainctl.toml ({suggestion}), add "
        f"parser.add_argument(\"{name}\") to the script, or call trainctl.init() in it (it then reads "
        "the checkpoint from TRAIN_OPS_RESUME).")


def _bad_arguments(f: Failure) -> Diagnosis | None:
    m = _first(r"^(?:usage: .*\n(?:.*\n)*?)?\S+: error: (.+)$", f.text)
    if not m or f.exit_code not in (2, None):
        return None
    return Diagnosis(
        "arguments", f"the script rejected its arguments: {m.group(1).strip()}",
        "an argument is misspelled, missing, or has a value of the wrong type.",
        f"check the arguments against: python {f.script or 'SCRIPT'} --help")


def _cuda_oom(f: Failure) -> Diagnosis | None:
    m = _first(r"(CUDA|HIP|MPS backend) out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED", f.text)
    if not m:
        return None
    size = _first(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", f.text)
    gpu = _first(r"\(?GPU (\d+)", f.text)
    others = _first(r"Process \d+ has [\d.]+ [KMGT]iB memory in use", f.text)
    what = "CUDA ran out of GPU memory" + (f" on GPU {gpu.group(1)}" if gpu else "") + \
        (f" (tried to allocate {size.group(1)})" if size else "") + _at(f)
    cause = "the batch (or sequence length, or model) needs more GPU memory than is free"
    if others:
        cause += "; other processes also hold memory on this GPU (see nvidia-smi)"
    return Diagnosis(
        "cuda_oom", what, cause + ".",
        "lower the batch size and keep the effective batch with gradient accumulation; use mixed "
        "precision (torch.autocast(\"cuda\", dtype=torch.bfloat16)); use activation checkpointing; "
        "if much memory is reserved but unallocated, set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.")


NETWORK_FIX = ("allow TCP between the nodes (on AWS: a security group rule that lets the group's members reach "
                "each other on all TCP; NCCL and gloo pick random ports), and make the collectives use the "
                "interface that routes between them: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME=<interface> "
                "(ip route get HEAD names it; never lo or docker0)")


def _rendezvous(f: Failure) -> Diagnosis | None:
    """Several machines that did not meet: torchrun's c10d rendezvous, or the collectives after it."""
    where = _first(r"while trying to connect to \(([^,()]+), (\d+)\)", f.text)
    endpoint = f"{where.group(1)}:{where.group(2)}" if where else "the rendezvous endpoint"
    if where or _first(r"RendezvousConnectionError|connection to the C10d store has failed", f.text):
        return Diagnosis(
            "rendezvous_unreachable", f"this node could not reach the head at {endpoint}",
            "the head node is not running yet (start trainctl local there first), --rdzv-endpoint names an "
            "address this node cannot route to (use the head's private IP), or a firewall / security group "
            "blocks the port.",
            f"check from this node: nc -zv {endpoint.replace(':', ' ')}; " + NETWORK_FIX + ".")
    # the static rendezvous (AWS nodes): the head's store counts the nodes that connected
    static = _first(r"(\d+)/(\d+) clients joined", f.text) if _first(r"static_tcp_rendezvous", f.text) else None
    if static or _first(r"RendezvousTimeoutError", f.text):
        return Diagnosis(
            "rendezvous_timeout", f"only {static.group(1)} of {static.group(2)} nodes joined the rendezvous in time"
            if static else "the nodes did not all join the rendezvous in time",
            "not every node started trainctl local with the same --nnodes, --rdzv-endpoint and --rdzv-id "
            "within the join timeout (600 s by default), or some cannot reach the head.",
            "start every node with the same --nnodes, --rdzv-endpoint HOST:PORT and --rdzv-id (under SLURM: "
            "srun with one task per node, --ntasks-per-node=1); " + NETWORK_FIX + ".")
    if _first(r"RendezvousClosedError", f.text):
        return Diagnosis(
            "rendezvous_closed", "the rendezvous was already closed: the job ended on another node",
            "this node joined after the others had finished or given up.",
            "start all nodes again with a new --rdzv-id (and --resume auto to continue).")
    peer = _first(r"(?:Gloo|gloo|NCCL|socketStartConnect|NET/Socket)[^\n]*(?:Connection refused|No route to host|"
                  r"Connection timed out|Connect to [^\n]* failed)[^\n]*", f.text)
    if peer and not _first(r"NCCL error|nccl\w+Error", f.text):  # NCCL's own report: _distributed reads it
        return Diagnosis(
            "distributed_network", f"the processes could not connect for the collectives: {peer.group(0).strip()[:160]}",
            "after the rendezvous, each process connects to the others directly on random ports: an interface "
            "they cannot reach (docker0, lo, a second network) was chosen, or a firewall blocks those ports.",
            NETWORK_FIX[0].upper() + NETWORK_FIX[1:] + "; rerun with NCCL_DEBUG=INFO to see which address failed.")
    return None


def _distributed(f: Failure) -> Diagnosis | None:
    debug = "rerun with TORCH_DISTRIBUTED_DEBUG=DETAIL NCCL_DEBUG=INFO to see which rank and operation"
    watchdog = _first(r"Watchdog caught collective operation timeout: WorkNCCL\(SeqNum=(\d+), OpType=(\w+)[^)]*?Timeout\(ms\)=(\d+)", f.text)
    gloo = _first(r"Timed out waiting (\d+)ms for (\w+) operation", f.text) or _first(r"\[Gloo\].*[Tt]imed out.*$", f.text)
    if watchdog or gloo:
        backend = "NCCL" if watchdog else "gloo"
        op = f" in {watchdog.group(2)} (#{watchdog.group(1)})" if watchdog else ""
        timeout_ms = int(watchdog.group(3)) if watchdog else (int(gloo.group(1)) if gloo and gloo.lastindex else None)
        after = f" after {timeout_ms / 1000:g} s" if timeout_ms else ""
        return Diagnosis(
            "distributed_timeout", f"{'an' if backend == 'NCCL' else 'a'} {backend} collective operation timed out{op}{after}",
            "one rank stopped taking part: it crashed, hung, was still busy (data loading, rank-0-only "
            "evaluation or checkpointing), or the ranks ran different numbers of steps.",
            "find the first error in the other ranks' output; make every rank run the same collectives "
            "in the same order (DistributedSampler with drop_last=True gives equal batch counts); give "
            "slow rank-0 work a longer timeout: init_process_group(timeout=timedelta(minutes=30)); " + debug + ".")
    store = _first(r"(?:Timed out after \d+ seconds waiting for clients\. (\d+)/(\d+) clients joined|DistNetworkError|Timed out initializing process group)", f.text)
    if store:
        joined = f" ({store.group(1)} of {store.group(2)} processes joined)" if store.group(1) else ""
        return Diagnosis(
            "distributed_timeout", f"the distributed rendezvous timed out{joined}",
            "not every process started, or the others cannot reach MASTER_ADDR:MASTER_PORT.",
            "start all ranks together (torchrun --nproc-per-node N, or trainctl local --nproc-per-node N); "
            "check MASTER_ADDR, MASTER_PORT and the firewall between the machines.")
    nccl = _first(r"NCCL error[^\n]*|ncclSystemError[^\n]*|ncclInternalError[^\n]*|ncclUnhandledCudaError[^\n]*", f.text)
    if nccl:
        return Diagnosis(
            "distributed_error", f"NCCL failed: {nccl.group(0).strip()[:200]}",
            "a network or InfiniBand problem between GPUs, a GPU that fell off the bus, or mismatched NCCL "
            "versions across machines.",
            "rerun with NCCL_DEBUG=INFO; isolate the transport with NCCL_P2P_DISABLE=1 or NCCL_IB_DISABLE=1; "
            "check the GPUs with nvidia-smi.")
    return None


def _cuda_driver(f: Failure) -> Diagnosis | None:
    fix = ("install a torch build that matches the driver: `nvidia-smi` shows the driver's CUDA version, "
           "https://pytorch.org/get-started/locally/ gives the matching command (e.g. pip install torch "
           "--index-url https://download.pytorch.org/whl/cu121); or update the NVIDIA driver.")
    m = _first(r"NVIDIA driver on your system is too old|driver version is insufficient for CUDA runtime version|cudaErrorInsufficientDriver", f.text)
    if m:
        found = _first(r"too old \(found version (\d+)\)", f.text)
        version = int(found.group(1)) if found else None
        return Diagnosis("cuda_driver", "the NVIDIA driver is older than the CUDA version torch was built for"
                         + (f" (the driver supports CUDA {version // 1000}.{version % 1000 // 10})" if version else ""),
                         "torch's CUDA runtime needs a newer driver than this machine has.", fix)
    arch = _first(r"CUDA capability (sm_\d+) is not compatible|no kernel image is available for execution on the device", f.text)
    if arch:
        which = f" ({arch.group(1)})" if arch.lastindex else ""
        return Diagnosis("cuda_driver", f"this torch build has no kernels for this GPU{which}",
                         "torch was built for older GPU architectures than the one in this machine.",
                         "install a newer torch build that supports the GPU (see https://pytorch.org/get-started/locally/).")
    lib = _first(r"(lib(?:cudart|cublas|cudnn|nccl|cusparse|cufft|curand|nvrtc|cuda)[\w.]*\.so[\w.]*): cannot open shared object file", f.text)
    if lib:
        return Diagnosis("cuda_driver", f"a CUDA library is missing: {lib.group(1)}",
                         "torch (or an extension) was built for a CUDA toolkit this machine does not have.", fix)
    return None


def _cuda_unavailable(f: Failure) -> Diagnosis | None:
    if _first(r"Torch not compiled with CUDA enabled", f.text):
        return Diagnosis("cuda_unavailable", f"the script asked for CUDA, but this torch is a CPU-only build{_at(f)}",
                         "the CPU wheel of torch is installed.",
                         "install a CUDA build of torch (https://pytorch.org/get-started/locally/), or run on "
                         "CPU: pick the device with torch.device(\"cuda\" if torch.cuda.is_available() else \"cpu\").")
    if _first(r"Found no NVIDIA driver on your system|no CUDA-capable device is detected|CUDA driver initialization failed", f.text):
        return Diagnosis("cuda_unavailable", f"the script asked for a GPU, but none is visible{_at(f)}",
                         "no NVIDIA driver or GPU on this machine, CUDA_VISIBLE_DEVICES hides them, or a "
                         "container was started without GPUs.",
                         "run on a GPU machine (check with nvidia-smi; in Docker add --gpus all), or fall back "
                         "to CPU with torch.cuda.is_available().")
    return None


def _shared_memory(f: Failure) -> Diagnosis | None:
    if not _first(r"insufficient shared memory \(shm\)|unable to open shared memory object|unable to write to file </torch_", f.text):
        return None
    return Diagnosis("shared_memory", "a DataLoader worker ran out of shared memory (/dev/shm)",
                     "workers pass batches through /dev/shm, which is small in containers (64 MB by default in Docker).",
                     "start the container with --shm-size=8g (or --ipc=host), or use fewer DataLoader workers "
                     "(num_workers=0 avoids shared memory).")


_OOM_FIX = ("use fewer DataLoader workers (num_workers) and a smaller prefetch_factor, stream or memory-map "
            "the dataset instead of loading it whole, lower the batch size; confirm with: "
            "dmesg -T | grep -i -E 'killed process|out of memory'")


def _worker_killed(f: Failure) -> Diagnosis | None:
    m = _first(r"DataLoader worker \(pid (\d+)\) is killed by signal: Killed", f.text)
    if not m:
        return None
    return Diagnosis("oom_killed", f"a DataLoader worker (pid {m.group(1)}) was killed with SIGKILL",
                     "the kernel's out-of-memory killer stopped it: the workers used more RAM than the machine has.",
                     _OOM_FIX + ".")


def _module_missing(f: Failure) -> Diagnosis | None:
    m = _first(r"(?:ModuleNotFoundError|ImportError): No module named '([^']+)'", f.text)
    if m:
        module = m.group(1)
        top = module.split(".")[0]
        if module != top and _first(rf"^\s+File \"[^\"]*[/\\]{re.escape(top)}[/\\]", f.text):
            return Diagnosis("import", f"'{module}' is missing from the installed '{top}'{_at(f)}",
                             f"the installed {top} is a different version than the script (or another package) expects.",
                             f"install the version the script needs: pip install -U {install_hint(top).split()[-1]}")
        return Diagnosis("import", f"module '{module}' is not installed{_at(f)}",
                         f"'{top}' is not installed in the Python that ran the script"
                         + (" (the package has a different name than the module)" if install_hint(top) != f"pip install {top}" else "")
                         + ".", f"{install_hint(top)} (in the environment that runs the script), then run again.")
    m = _first(r"ImportError: cannot import name '([^']+)' from '([^']+)'(?: \(([^)]+)\))?", f.text)
    if m:
        name, module, where = m.group(1), m.group(2), m.group(3) or ""
        top = module.split(".")[0]
        if where and not _is_library(where) and "unknown location" not in where:
            cause = f"a local file {where} shadows the '{module}' package, or it lacks '{name}'."
            fix = f"rename {_short(where)} if it is meant to be a different module than the installed package."
        else:
            cause = f"the installed '{top}' is a different version than the script expects."
            fix = f"install the version the script needs: pip install -U {install_hint(top).split()[-1]}"
        return Diagnosis("import", f"'{name}' cannot be imported from '{module}'{_at(f)}", cause, fix)
    return None


def _state_dict(f: Failure) -> Diagnosis | None:
    head = _first(r"Error\(s\) in loading state_dict for (\w+)", f.text)
    if not head:
        return None
    missing = re.findall(r'"([^"]+)"', (_first(r"Missing key\(s\) in state_dict: (.*)$", f.text) or [None, ""])[1] or "")
    unexpected = re.findall(r'"([^"]+)"', (_first(r"Unexpected key\(s\) in state_dict: (.*)$", f.text) or [None, ""])[1] or "")
    sizes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", f.text)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' if len(missing) > 1 else ''} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    if sizes:
        name, ck, model = sizes[0]
        parts.append(f"size mismatch for {name}: checkpoint [{ck}], model [{model}]"
                     + (f" and {len(sizes) - 1} more" if len(sizes) > 1 else ""))
    what = f"the checkpoint does not fit the {head.group(1)} model: " + ("; ".join(parts) or "keys differ") + _at(f)
    for prefix, why in (("module.", "DistributedDataParallel/DataParallel"), ("_orig_mod.", "torch.compile")):
        if unexpected and all(k.startswith(prefix) for k in unexpected) and \
                {k[len(prefix):] for k in unexpected} & set(missing):
            return Diagnosis(
                "state_dict", what,
                f"the checkpoint was saved from a {why}-wrapped model, so every key starts with '{prefix}'.",
                f"strip the prefix before loading: {{k.removeprefix('{prefix}'): v for k, v in sd.items()}}, "
                f"or save the unwrapped model's state_dict ({'model.module' if prefix == 'module.' else 'model._orig_mod'}.state_dict()).")
    if sizes:
        cause = "the model was built with different settings (layer sizes, vocabulary, classes) than the one that wrote the checkpoint."
        fix = ("build the model with the checkpoint's settings (trainctl checkpoint info CHECKPOINT shows its config), "
               "or, when fine-tuning on purpose, load only the tensors whose shapes match.")
    else:
        cause = "the model's architecture changed since the checkpoint was written (layers renamed, added or removed)."
        fix = ("resume with the code version that wrote the checkpoint (trainctl checkpoint info CHECKPOINT shows its git commit), "
               "or load with load_state_dict(sd, strict=False) when the change is intended.")
    return Diagnosis("state_dict", what, cause, fix)


def _disk_full(f: Failure) -> Diagnosis | None:
    m = _first(r"No space left on device|\[Errno 28\]|ENOSPC|Disk quota exceeded|\[Errno 122\]|"
               r"PytorchStreamWriter failed writing file|inline_container\.cc:\d+\] \. unexpected pos", f.text)
    if not m:
        return None
    path = _first(r"(?:\[Errno (?:28|122)\][^:]*: '([^']+)')", f.text)
    where = f" writing {path.group(1)}" if path else ""
    return Diagnosis("disk_full", f"the disk is full{where}" + _at(f),
                     "checkpoints, logs or caches filled the disk (or the user's quota).",
                     "free space: trainctl checkpoint cleanup --dry-run shows what retention would remove; "
                     "set keep_last_n under [retention] in trainctl.toml; or point checkpoint_dir at a bigger disk (df -h shows them).")


def _read_only(f: Failure) -> Diagnosis | None:
    m = _first(r"\[Errno 30\] Read-only file system(?:: '([^']+)')?|strerror: Read-only file system|\bEROFS\b", f.text)
    if not m:
        return None
    path = m.group(1) if m.lastindex else None
    saving = _first(r"save_checkpoint|torch\.save|torch/serialization\.py|PytorchStreamWriter|[Cc]heckpoint", f.text)
    if path:
        what = f"cannot write {path}: the file system is read-only"
    else:
        what = f"a {'checkpoint' if saving else 'file'} could not be written: its file system is read-only"
    return Diagnosis(
        "read_only", what + _at(f),
        "the disk was remounted read-only while the run went on (the kernel does this after disk errors), "
        "or the folder is on a read-only mount (a container image, a dataset volume).",
        "check the mount (mount | grep ' ro'; dmesg for disk errors); write checkpoints and outputs to a "
        "writable folder (checkpoint_dir in trainctl.toml, or the script's output flag), then resume.")


def _permission(f: Failure) -> Diagnosis | None:
    m = _first(r"(?:PermissionError: )?\[Errno 13\] Permission denied: '([^']+)'", f.text)
    if not (m or _exc_is(f, "PermissionError")):
        return None
    path = m.group(1) if m else None
    return Diagnosis("permission", f"permission denied: {path or f.exception[1]}{_at(f)}",  # type: ignore[index]
                     "the user running the script may not read or write that path (owned by another user, or mode too strict).",
                     f"fix its permissions (ls -l {shlex.quote(path) if path else 'PATH'}; chmod/chown), or use a "
                     "path in a folder you own.")


def _file_not_found(f: Failure) -> Diagnosis | None:
    cant_open = _first(r"can't open file '([^']+)': \[Errno 2\]", f.text)
    if cant_open:
        return Diagnosis("script_missing", f"the script {cant_open.group(1)} does not exist",
                         "the path is wrong, or the working directory differs from where the script is.",
                         "check the path; it is relative to the folder the run started in.")
    m = _first(r"(?:FileNotFoundError: )?\[Errno 2\] No such file or directory: '([^']+)'", f.text)
    if not m and not _exc_is(f, "FileNotFoundError"):
        return None
    path = m.group(1) if m else (f.exception[1] if f.exception else "")
    given = _argument_for(path, f.args)
    if given:
        what = f"{given} names a file that does not exist: {path}"
    else:
        what = f"a file the script opens does not exist: {path}"
    cause = ("a relative path resolves against the folder the run started in, not the script's folder; "
             "or the data was not downloaded or mounted on this machine.") if not path.startswith("/") else \
        "the data was not downloaded, mounted or copied to this machine, or the path has a typo."
    return Diagnosis("file_not_found", what + _at(f), cause,
                     f"check the path (ls -l {shlex.quote(path)}); pass an absolute path to be sure.")


def _argument_for(path: str, args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if eq and value and (value == path or path.endswith(value)):
            return f"argument {flag}"
        if arg and (arg == path or path.endswith(arg)) and "/" in path:
            before = args[i - 1] if i and args[i - 1].startswith("-") else None
            return f"argument {before}" if before else f"argument {arg!r}"
    return None


_NAN = re.compile(r"(?i)(?:\b\w*loss\w*\b['\"]?\s*(?:[:=]|is|was|became|of|\(|tensor\()?\s*\(?['\"]?(nan|[-+]?inf(?:inity)?)\b"
                  r"|non-?finite (?:loss|values?)|returned nan values|detected (?:nan|inf)|found invalid values:.*\bnan\b)")


def _nan_loss(f: Failure) -> Diagnosis | None:
    for line in f.lines:
        m = _NAN.search(line)
        if m:
            which = "Inf" if m.group(1) and "inf" in m.group(1).lower() else "NaN"
            return Diagnosis(
                "nan_loss", f"the loss became {which}: `{line.strip()[:160]}`",
                "training diverged: a learning rate too high, exploding gradients, float16 overflow, a log "
                "or division of zero, or NaN/Inf in the input data.",
                "lower the learning rate (or add warmup), clip gradients (torch.nn.utils.clip_grad_norm_), "
                "prefer bfloat16 to float16 (or use a GradScaler), check the data for NaN/Inf; "
                "torch.autograd.set_detect_anomaly(True) finds the first bad operation. "
                "Resume from a checkpoint written before the divergence.")
    return None


def _signal_of(f: Failure) -> str | None:
    if f.signal_name:
        return f.signal_name
    code = f.exit_code
    if code is None:
        return None
    number = -code if code < 0 else code - 128 if 128 < code < 160 else None
    if number is None:
        return None
    try:
        return signal_mod.Signals(number).name
    except ValueError:
        return None


def _killed(f: Failure) -> Diagnosis | None:
    sig = _signal_of(f)
    if sig == "SIGKILL" or _first(r"Signal 9 \(SIGKILL\) received by PID", f.text):
        if f.exception is not None and sig != "SIGKILL":
            return None
        return Diagnosis(
            "oom_killed", f"the script was killed with SIGKILL (exit {f.exit_code}) and printed no error",
            "almost always the kernel's out-of-memory killer: the script (with its DataLoader workers) "
            "used more RAM than the machine has. (Someone running kill -9 looks the same.)",
            _OOM_FIX + ".")
    if sig in ("SIGSEGV", "SIGBUS", "SIGILL"):
        return Diagnosis(
            "crash", f"the script crashed with {sig} (exit {f.exit_code}) inside native code",
            "a compiled extension crashed: packages built against different torch/numpy versions, a bad "
            "driver, or a DataLoader worker crash.",
            "rerun with python -X faulthandler to see the Python stack where it crashed; reinstall "
            "extensions against the installed torch; try num_workers=0.")
    if sig == "SIGABRT" and f.exception is None:
        return Diagnosis(
            "crash", f"the script aborted (SIGABRT, exit {f.exit_code})",
            "a C++ assertion or a fatal error in a native library (the lines above it say which).",
            "read the last lines of output.log for the C++ error; rerun with python -X faulthandler.")
    return None


def _generic(f: Failure) -> Diagnosis | None:
    if f.exception is None:
        return None
    kind, message = f.exception
    first = message.splitlines()[0] if message else ""
    return Diagnosis(
        "exception", f"the script raised {kind}" + (f": {first[:300]}" if first else "") + _at(f),
        f"an error in the script or its inputs{_at(f)} (the traceback is in the session's output.log).",
        "fix the error, then run again (or resume from the newest checkpoint).")


RULES: list[Callable[[Failure], Diagnosis | None]] = [
    _resume_flag, _bad_arguments, _cuda_oom, _rendezvous, _distributed, _cuda_driver, _cuda_unavailable,
    _shared_memory, _worker_killed, _module_missing, _state_dict, _read_only, _disk_full, _permission,
    _file_not_found, _nan_loss, _killed, _generic,
]


def diagnose(output_tail: str, *, exit_code: int | None, signal_name: str | None = None,
             script: str = "", args: Sequence[str] = (), checkpoint: str | None = None,
             resume_flag: str = "--resume") -> Diagnosis | None:
    """Classify a failed run from its last lines of output and exit status; None when nothing is known."""
    from ..redact import redact_command_text
    from ..resume import resume_command

    lines = _clean(output_tail or "")
    text = "\n".join(lines)
    exception, location = _last_exception(lines)
    failure = Failure(text=text, exit_code=exit_code, signal_name=signal_name, script=script,
                      args=list(args), resume_flag=resume_flag or "--resume", exception=exception,
                      location=location, lines=lines)
    for rule in RULES:
        found = rule(failure)
        if found is not None:
            # what the rules quote from the output may hold the command line (a usage error)
            found.what, found.cause, found.fix = (redact_command_text(t) for t in (found.what, found.cause, found.fix))
            if checkpoint:
                found.command = resume_command(script, args, checkpoint, failure.resume_flag)
            return found
    return None
