"""trainctl: run PyTorch training scripts safely anywhere.

    import trainctl
    run = trainctl.init(config=vars(args))
    run.log({"loss": loss.item()}, step=step)
    run.save_checkpoint({"model": model.state_dict()}, epoch=epoch, step=step)
    state = run.resume_state()

Only the standard library is imported here; torch and friends load when first needed.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
                     CheckpointError,
                     ConfigError,
                     CorruptCheckpointError,
                     TrainctlError,
                     UntrustedCheckpointError,
)
from .run import Run, current_run, init

__all__ = ["CheckpointError", "ConfigError", "CorruptCheckpointError", "Run", "TrainctlError",
           "UntrustedCheckpointError", "__version__", "current_run", "init"]
