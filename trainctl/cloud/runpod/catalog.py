"""RunPod's GPU types as offers: memory, per-cloud prices and stock, priced alternatives."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidPodRequestError, UnknownGpuTypeError

CLOUDS = ("secure", "community")
MARKETS = ("on-demand", "interruptible")


def _price(value: Any) -> float | None:
    """RunPod reports an absent price as null or 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _count(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise InvalidPodRequestError(f"Unknown {what} {value!r}. Valid: {', '.join(choices)}.",
                                     f"Pass one of: {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class CloudPrice:
    """One GPU type on one cloud: list prices, and the current price and stock for a GPU count."""

    offered: bool
    on_demand_hr: float | None  # per GPU: current (lowestPrice) or else the list price
    spot_hr: float | None  # per GPU: the list spot price
    min_bid_hr: float | None  # per GPU: the lowest bid RunPod accepts now
    stock: str | None  # "High", "Medium", "Low"; None when nothing is free
    max_unreserved: int | None

    def available(self, market: str, gpu_count: int) -> bool:
        if not (self.offered and self.stock):
            return False
        if self.max_unreserved is not None and self.max_unreserved < gpu_count:
            return False
        return self.price_per_gpu(market) is not None

    def price_per_gpu(self, market: str) -> float | None:
        if market == "on-demand":
            return self.on_demand_hr
        bids = [p for p in (self.spot_hr, self.min_bid_hr) if p is not None]
        return max(bids) if bids else None


@dataclass(frozen=True)
class GpuOffer:
    """A GPU type as `trainctl runpod gpus` shows it; prices are per GPU per hour in USD."""

    id: str
    display_name: str
    memory_gb: int
    max_gpu_count: int | None
    secure: CloudPrice
    community: CloudPrice

    def cloud(self, name: str) -> CloudPrice:
        return self.secure if name == "secure" else self.community

    def available(self, cloud: str, market: str, gpu_count: int) -> bool:
        if self.max_gpu_count is not None and gpu_count > self.max_gpu_count:
            return False
        return self.cloud(cloud).available(market, gpu_count)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_gpu_types(raw: Iterable[Mapping[str, Any]]) -> list[GpuOffer]:
    """GpuOffers from the answer to api.GPU_TYPES, sorted by memory, then name."""
    offers = []
    for g in raw:
        if not g.get("id"):
            continue
        clouds = {}
        for cloud in CLOUDS:
            now = g.get(cloud) if isinstance(g.get(cloud), Mapping) else {}
            clouds[cloud] = CloudPrice(
                offered=bool(g.get(f"{cloud}Cloud", True)),
                on_demand_hr=_price(now.get("uninterruptablePrice")) or _price(g.get(f"{cloud}Price")),
                spot_hr=_price(g.get(f"{cloud}SpotPrice")),
                min_bid_hr=_price(now.get("minimumBidPrice")),
                stock=now.get("stockStatus") or None,
                max_unreserved=_count(now.get("maxUnreservedGpuCount")),
            )
        offers.append(GpuOffer(id=str(g["id"]), display_name=str(g.get("displayName") or g["id"]),
                               memory_gb=_count(g.get("memoryInGb")) or 0,
                               max_gpu_count=_count(g.get("maxGpuCount")), **clouds))
    return sorted(offers, key=lambda o: (o.memory_gb, o.display_name))


def read_offers(client: Any, gpu_count: int = 1) -> tuple[list[GpuOffer], datetime]:
    """The offers for ``gpu_count`` GPUs, and when they were read (`trainctl runpod gpus`)."""
    raw = client.gpu_types(gpu_count)
    return parse_gpu_types(raw), datetime.now(timezone.utc)


def find_gpu(offers: Sequence[GpuOffer], name: str) -> GpuOffer:
    """The offer whose id or display name is ``name`` (case-insensitive)."""
    wanted = name.strip().casefold()
    for offer in offers:
        if wanted in (offer.id.casefold(), offer.display_name.casefold()):
            return offer
    names = [o.id for o in offers]
    near = [n for n in names if wanted and n.casefold().startswith(wanted)]
    near += [n for n in names if wanted and wanted in n.casefold() and n not in near]
    near += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.5)
             if n not in near]
    raise UnknownGpuTypeError(name, near[:3])


def describe_offer(offer: GpuOffer, cloud: str, market: str, gpu_count: int) -> str:
    price = offer.cloud(cloud).price_per_gpu(market) or 0.0
    count = f"{gpu_count} x " if gpu_count > 1 else ""
    return (f"{count}{offer.id} ({offer.memory_gb} GB) {cloud} {market} "
            f"${price * gpu_count:.2f}/h")


def alternatives(offers: Sequence[GpuOffer], wanted: GpuOffer | None, cloud: str, market: str,
                 gpu_count: int, limit: int = 4) -> list[str]:
    """What could run instead: the same GPU elsewhere first, then types with at least as much
    memory on the requested cloud and market, cheapest first."""
    out: list[str] = []
    if wanted is not None:
        # the same market elsewhere, then the other market here, then the other market elsewhere
        places = sorted(((c, m) for c in CLOUDS for m in MARKETS if (c, m) != (cloud, market)),
                        key=lambda cm: (cm[1] != market, cm[0] != cloud))
        out += [describe_offer(wanted, c, m, gpu_count) for c, m in places
                if wanted.available(c, m, gpu_count)]
    floor = wanted.memory_gb if wanted else 0
    others = [o for o in offers if o is not wanted and o.memory_gb >= floor
              and o.available(cloud, market, gpu_count)]
    others.sort(key=lambda o: (o.cloud(cloud).price_per_gpu(market) or 0.0, o.memory_gb))
    out += [describe_offer(o, cloud, market, gpu_count) for o in others]
    return out[:limit]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in (header, *rows)]


def _cell(price: CloudPrice, market: str) -> str:
    value = price.price_per_gpu(market)
    if not price.offered or value is None:
        return "-"
    return f"${value:.2f} {price.stock or 'none'}"


def gpu_table(offers: Sequence[GpuOffer]) -> list[dict[str, Any]]:
    """Rows for a table or --json: one GPU type each."""
    return [{
        "gpu": o.id, "memory_gb": o.memory_gb, "max_gpu_count": o.max_gpu_count,
        **{f"{cloud}_{market.replace('-', '_')}_usd_hr": o.cloud(cloud).price_per_gpu(market)
           for cloud in CLOUDS for market in MARKETS},
        **{f"{cloud}_stock": o.cloud(cloud).stock for cloud in CLOUDS},
    } for o in offers]


def render_gpu_table(offers: Sequence[GpuOffer], read_at: datetime, gpu_count: int = 1) -> str:
    """`trainctl runpod gpus`: per GPU per hour, with stock, as read at ``read_at``."""
    header = ("GPU", "MEM", "SECURE", "COMMUNITY", "SECURE SPOT", "COMMUNITY SPOT")
    rows = [(o.id, f"{o.memory_gb} GB", _cell(o.secure, "on-demand"),
             _cell(o.community, "on-demand"), _cell(o.secure, "interruptible"),
             _cell(o.community, "interruptible")) for o in offers]
    lines = text_table(header, rows)
    when = read_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    lines.append(f"USD per GPU per hour for {gpu_count} GPU{'s' if gpu_count > 1 else ''}, "
                 f"with stock (High/Medium/Low/none), read from RunPod at {when}. "
                 "Spot: the bid trainctl would place.")
    return "\n".join(lines)
