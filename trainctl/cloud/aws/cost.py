"""Cost so far: price x running time, summed over every machine of a session (pure).

EC2 bills Linux machines, on-demand and spot, per second with a one-minute minimum. Spot
prices move; a machine is costed at the price recorded for it (at launch, or the current
one in listings), so a spot total is an estimate and says so. An unknown price is unknown:
it is left out of the total and named, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

MIN_BILLED_S = 60.0
_REASON_TIME = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:GMT|UTC)\)")


@dataclass(frozen=True)
class MachineUsage:
    instance_id: str
    instance_type: str
    market: str  # on-demand | spot
    started_at: datetime
    ended_at: datetime | None  # None: still running
    usd_per_hour: float | None

    def running_s(self, now: datetime) -> float:
        end = self.ended_at or now
        return max(0.0, (end - self.started_at).total_seconds())

    def cost_usd(self, now: datetime) -> float | None:
        if self.usd_per_hour is None:
            return None
        return self.usd_per_hour * max(self.running_s(now), MIN_BILLED_S) / 3600.0


@dataclass(frozen=True)
class CostSummary:
    total_usd: float | None  # None: no machine has a known price
    machines: tuple[tuple[str, float, float | None], ...]  # (instance id, running s, usd or None)
    unknown: tuple[str, ...]  # machines whose price is unknown (left out of the total)
    estimate: bool  # spot prices move: the total is an estimate

    @property
    def running_s(self) -> float:
        return sum(s for _, s, _ in self.machines)

    def describe(self) -> str:
        if not self.machines:
            return "$0.00 (no machines)"
        count = len(self.machines)
        total = "unknown" if self.total_usd is None else f"${self.total_usd:.2f}"
        parts = [f"{count} machine{'s' if count != 1 else ''}", f"{self.running_s / 3600:.2f} machine-hours"]
        if self.unknown and self.total_usd is not None:
            parts.append(f"price unknown for {', '.join(self.unknown)}: not included")
        if self.estimate:
            parts.append("spot: estimate")
        return f"{'~' if self.estimate and self.total_usd is not None else ''}{total} ({'; '.join(parts)})"


def session_cost(machines: Iterable[MachineUsage], now: datetime) -> CostSummary:
    rows: list[tuple[str, float, float | None]] = []
    unknown: list[str] = []
    known = 0.0
    any_known = False
    spot = False
    for machine in machines:
        cost = machine.cost_usd(now)
        rows.append((machine.instance_id, machine.running_s(now), cost))
        spot = spot or machine.market == "spot"
        if cost is None:
            unknown.append(machine.instance_id)
        else:
            known += cost
            any_known = True
    return CostSummary(total_usd=known if any_known else None, machines=tuple(rows), unknown=tuple(unknown),
                       estimate=spot)


def ended_at(instance: dict) -> datetime | None:
    """When a terminated machine stopped billing, from EC2's StateTransitionReason (if it says)."""
    match = _REASON_TIME.search(instance.get("StateTransitionReason") or "")
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
