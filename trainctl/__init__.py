"""trainctl: run PyTorch training scripts safely anywhere.

    import trainctl
    run = trainctl.init(config=vars(args))
    run.log({"loss": loss.item()}, step=step)
    run.save_checkpoint({"model": model.state_dict()}, epoch=epoch, step=step)
    state = run.resume_state()

Names are loaded on first use, so `import trainctl` (and the CLI, which imports this package)
costs almost nothing; torch and friends load only when a function needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "init": "trainctl.run", "Run": "trainctl.run", "current_run": "trainctl.run",
    "CheckpointSaveError": "trainctl.run",
    "TrainctlError": "trainctl.errors", "ConfigError": "trainctl.errors",
    "CheckpointError": "trainctl.errors", "CorruptCheckpointError": "trainctl.errors",
    "UntrustedCheckpointError": "trainctl.errors",
}

if TYPE_CHECKING:
    from .errors import (
        CheckpointError,
        ConfigError,
        CorruptCheckpointError,
        TrainctlError,
        UntrustedCheckpointError,
    )
    from .run import CheckpointSaveError, Run, current_run, init


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["CheckpointError", "CheckpointSaveError", "ConfigError", "CorruptCheckpointError", "Run", "TrainctlError",
           "UntrustedCheckpointError", "__version__", "current_run", "init"]
