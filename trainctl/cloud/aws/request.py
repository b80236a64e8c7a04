"""What a launch asks for, in AWS terms: the input of both the fact lookups and the plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ...errors import UsageError

MARKETS = ("on-demand", "spot")


@dataclass(frozen=True)
class LaunchRequest:
    """What the user asked for, in AWS terms (the AWS backend builds it from a RunSpec)."""

    session_id: str
    project: str
    instance_type: str
    market: str = "on-demand"
    attempt: int = 0
    also_instance_types: tuple[str, ...] = ()  # spot fleet: other types with the same GPUs
    ami: str = "auto"
    disk_gb: int = 100
    max_hours: float = 24.0
    budget_usd: float | None = None
    name: str | None = None
    storage_uri: str | None = None
    agent_command: tuple[str, ...] = ()
    prepare: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # not secret: it goes into user data
    secrets: tuple[str, ...] = ()  # names of SSM SecureString parameters the machine reads
    # Rows the caller adds to the printed plan (code bundle summary, resume checkpoint, ...).
    display: tuple[tuple[str, str], ...] = ()
    nodes: int = 1  # machines of one multi-node job: one cluster placement group, one zone
    efa: bool = False  # an EFA interface on each machine (multi-node only)

    def __post_init__(self) -> None:
        if self.market not in MARKETS:
            raise UsageError(f"Unknown market '{self.market}'.", f"Valid: {', '.join(MARKETS)}.")
        if not self.max_hours > 0:
            raise UsageError(f"--max-hours must be positive, not {self.max_hours:g}.",
                             "Every cloud session has a deadline; pass e.g. --max-hours 12.")
        if self.disk_gb < 8:
            raise UsageError(f"--disk-gb must be at least 8, not {self.disk_gb}.")
        if self.budget_usd is not None and self.budget_usd <= 0:
            raise UsageError(f"budget_usd must be positive, not {self.budget_usd:g}.")
        if self.ami != "auto" and not self.ami.startswith("ami-"):
            raise UsageError(f"--ami takes 'auto' or an AMI id (ami-...), not '{self.ami}'.")
        if self.also_instance_types and self.market != "spot":
            raise UsageError("Alternative instance types apply to spot fleets only.", "Add --spot.")
        if self.nodes < 1:
            raise UsageError(f"--nodes must be 1 or more, not {self.nodes}.", "e.g. --nodes 2")
        if self.efa and self.nodes < 2:
            raise UsageError("--efa is for jobs over several machines.", "Add --nodes N (N >= 2), or drop --efa.")
