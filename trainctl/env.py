"""The TRAIN_OPS_* contract: the one place that names and parses the launcher's variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# name -> meaning. `trainctl local --help` and README.md's table are generated from / checked
# against this mapping; add a variable here and nowhere else.
VARIABLES: dict[str, str] = {
    "TRAIN_OPS_SESSION_ID": "id of this session (sortable: time first, then a short random part)",
    "TRAIN_OPS_SESSION_DIR": "the session directory (session.json, events.jsonl, output.log, tensorboard/)",
    "TRAIN_OPS_CHECKPOINT_DIR": "where this session writes checkpoints (<checkpoint_dir>/<session id> by default)",
    "TRAIN_OPS_TENSORBOARD_DIR": "TensorBoard log dir of this session",
    "TRAIN_OPS_RESUME": "checkpoint to resume from, when resuming (also passed as --resume PATH)",
    "TRAIN_OPS_ATTEMPT": "0 for the first run, n for the n-th automatic restart",
    "TRAIN_OPS_BACKEND": "where the script runs: local (aws and runpod are reserved for the cloud backends)",
    "TRAIN_OPS_CONFIG": "path of the resolved config (JSON)",
}

BACKENDS = ("local", "aws", "runpod")


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process; every field None when run without a launcher."""

    session_id: str | None = None
    session_dir: str | None = None
    checkpoint_dir: str | None = None
    tensorboard_dir: str | None = None
    resume: str | None = None
    attempt: int = 0
    backend: str | None = None
    config: str | None = None

    @property
    def launched(self) -> bool:
        return bool(self.session_id and self.session_dir)

    def to_environ(self) -> dict[str, str]:
        """The TRAIN_OPS_* variables for a child process (unset fields are left out)."""
        values = {
            "TRAIN_OPS_SESSION_ID": self.session_id,
            "TRAIN_OPS_SESSION_DIR": self.session_dir,
            "TRAIN_OPS_CHECKPOINT_DIR": self.checkpoint_dir,
            "TRAIN_OPS_TENSORBOARD_DIR": self.tensorboard_dir,
            "TRAIN_OPS_RESUME": self.resume,
            "TRAIN_OPS_ATTEMPT": str(self.attempt),
            "TRAIN_OPS_BACKEND": self.backend,
            "TRAIN_OPS_CONFIG": self.config,
        }
        assert set(values) == set(VARIABLES)
        return {k: v for k, v in values.items() if v is not None}


def read(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Parse TRAIN_OPS_* from ``environ`` (default: os.environ); bad values fall back to defaults."""
    env = os.environ if environ is None else environ
    try:
        attempt = max(0, int(env.get("TRAIN_OPS_ATTEMPT", "0") or 0))
    except ValueError:
        attempt = 0
    backend = env.get("TRAIN_OPS_BACKEND") or None
    return LaunchEnv(
        session_id=env.get("TRAIN_OPS_SESSION_ID") or None,
        session_dir=env.get("TRAIN_OPS_SESSION_DIR") or None,
        checkpoint_dir=env.get("TRAIN_OPS_CHECKPOINT_DIR") or None,
        tensorboard_dir=env.get("TRAIN_OPS_TENSORBOARD_DIR") or None,
        resume=env.get("TRAIN_OPS_RESUME") or None,
        attempt=attempt,
        backend=backend if backend in BACKENDS else None,
        config=env.get("TRAIN_OPS_CONFIG") or None,
    )


@dataclass(frozen=True)
class RankInfo:
    """torch.distributed's own variables (set by torchrun); rank 0 is the one that writes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info(environ: Mapping[str, str] | None = None) -> RankInfo:
    env = os.environ if environ is None else environ

    def _int(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            return default

    return RankInfo(_int("RANK", 0), _int("LOCAL_RANK", 0), max(1, _int("WORLD_SIZE", 1)))


def help_table() -> str:
    """The variables as help text lines, for `trainctl local --help`."""
    width = max(map(len, VARIABLES))
    return "\n".join(f"{name.ljust(width)}  {meaning}" for name, meaning in VARIABLES.items())
