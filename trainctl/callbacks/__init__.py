"""Framework callbacks. `from trainctl.callbacks import TrainctlCallback` (Lightning).

Names resolve on first use, so `import trainctl.callbacks` does not import lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainctlCallback", "TrainctlLogger"]

_LIGHTNING = ("TrainctlCallback", "TrainctlLogger")


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        try:
            from . import lightning
        except ImportError as e:
            if "lightning" not in str(e):
                raise
            raise ImportError(f"trainctl.callbacks.{name} needs PyTorch Lightning, which is not installed ({e}). "
                              "Install it with: pip install 'trainctl[lightning]'") from e
        return getattr(lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LIGHTNING])
