"""Demand scaling as a pure step: a model's demand in, the replicas it should have and why out.

The leader's controller (controller.py) calls `scale` for every model deployed with
`min_replicas`/`max_replicas`, commits each change with its reason (state.SET_SCALE), and
solves the plan for the committed counts. When a model wants a replica that finds no VRAM,
`contend` lets replicas of other models yield: those above their min whose model has a
lower priority, or is idle; never below a min, never to a lower priority, and of equals the
least recently used first (ties go to the most recently used).

No memory between calls besides what is committed: the windows live in the instances'
measurements (backends/demand.py: a short window for going up, a long one for going down)
and the cooldown counts from the committed time of the last change, so a new leader decides
as the old one would have. Pure: `now` is the leader's wall clock, the same clock the
committed times were written in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aivailable.backends.demand import LONG_S, WINDOW_S, Signals


@dataclass(frozen=True)
class ScalingConfig:
    # Mean slot occupancy over the short window (30 s) above which a replica is added: at
    # 0.8 a 4-slot replica has had fewer than one slot free on average, so requests queue.
    high: float = 0.8
    # Mean occupancy over the long window (180 s) below which a replica is removed, if the
    # others would then stay below `high`: the gap to `high` is the hysteresis.
    low: float = 0.3
    # Share of the short window's seconds with an admission refusal that adds a replica
    # even below `high` (short requests keep occupancy lower than the queue they build):
    # refusals must last, as occupancy must, so a burst of a few seconds adds nothing.
    refusing: float = 0.8
    # Seconds after any change before a replica is added again: the new replica must load
    # and take its share before the window says whether one more is needed.
    up_cooldown_s: float = WINDOW_S
    # Seconds after any change before a replica is removed: the whole long window must
    # have been measured with the current count, so an up is never undone by its own past.
    down_cooldown_s: float = LONG_S
    # Seconds a replica must have served to count as idle for another model's sake: a model
    # that had no request in this long may yield VRAM above its min.
    idle_yield_s: float = WINDOW_S


DEFAULT_SCALING = ScalingConfig()


@dataclass(frozen=True)
class Bounds:
    """What the deploy allows: the replicas between min and max, the idle time before
    going down to min (None: never), and the priority for VRAM contention."""

    min_replicas: int
    max_replicas: int
    idle_unload_s: float | None = 300.0
    priority: int = 0

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True)
class Demand:
    """One model's demand: its ready instances' signals summed up, plus the requests that
    peers hold waiting for a replica (a model scaled to zero, or one still loading)."""

    instances: int = 0  # ready instances that reported signals
    occupancy: float = 0.0  # mean over the instances
    occupancy_long: float = 0.0
    queue_depth: float = 0.0  # summed
    refused: int = 0  # summed, in the short window
    refusing_s: int = 0  # the most of any instance: seconds of the window with a refusal
    ttft_p90: float | None = None  # the worst instance's
    rpm: float = 0.0  # summed
    idle_s: float = 0.0  # the least idle instance's
    age_s: float = 0.0  # the youngest instance's
    active: int = 0  # summed: requests waiting or running now
    keep_alive_s: float | None = None  # the most recent request's keep_alive wins
    waiting: int = 0  # requests peers hold for a replica that is not there yet

    @property
    def idle(self) -> bool:
        return self.instances > 0 and self.active == 0 and self.waiting == 0

    def to_dict(self) -> dict:
        return {
            "instances": self.instances,
            "occupancy": round(self.occupancy, 2),
            "occupancy_long": round(self.occupancy_long, 2),
            "queue_depth": round(self.queue_depth, 1),
            "refused": self.refused,
            "ttft_p90": self.ttft_p90,
            "rpm": round(self.rpm, 1),
            "idle_s": self.idle_s,
            "active": self.active,
            "waiting": self.waiting,
        }


def aggregate(signals: Iterable[Signals], waiting: int = 0) -> Demand:
    """The demand of one model from its ready instances' signals."""
    sig = list(signals)
    if not sig:
        return Demand(waiting=waiting)
    ttfts = [s.ttft_p90 for s in sig if s.ttft_p90 is not None]
    # The instance idle for the shortest time had the most recent request: its keep_alive.
    latest = min(sig, key=lambda s: s.idle_s)
    return Demand(
        instances=len(sig),
        occupancy=sum(s.occupancy for s in sig) / len(sig),
        occupancy_long=sum(s.occupancy_long for s in sig) / len(sig),
        queue_depth=sum(s.queue_depth for s in sig),
        refused=sum(s.refused for s in sig),
        refusing_s=max(s.refusing_s for s in sig),
        ttft_p90=max(ttfts) if ttfts else None,
        rpm=sum(s.rpm for s in sig),
        idle_s=latest.idle_s,
        age_s=min(s.age_s for s in sig),
        active=sum(s.active for s in sig),
        keep_alive_s=latest.keep_alive_s,
        waiting=waiting,
    )


@dataclass(frozen=True)
class Decision:
    wanted: int
    reason: str = ""  # "" when nothing changes


def idle_limit(bounds: Bounds, demand: Demand) -> float | None:
    """Seconds without requests before going down to min; None: never. The last request's
    keep_alive wins over the deploy's idle_unload_s (Ollama: 0 now, negative never)."""
    limit = demand.keep_alive_s if demand.keep_alive_s is not None else bounds.idle_unload_s
    return None if limit is None or limit < 0 else limit


def scale(
    wanted: int,
    ready: int,
    bounds: Bounds,
    demand: Demand,
    last_change_at: float | None,
    now: float,
    config: ScalingConfig = DEFAULT_SCALING,
) -> Decision:
    """The replicas one model should have. `wanted`: the committed count; `ready`: its
    ready instances now; `last_change_at`: when the committed count last changed."""
    w = bounds.clamp(wanted)
    if w != wanted:
        return Decision(w, f"bounds {bounds.min_replicas}..{bounds.max_replicas}")
    if w == 0:
        if demand.waiting > 0:
            return Decision(bounds.clamp(1), f"{demand.waiting} request(s) waiting, scaled to zero")
        return Decision(w)
    since = math.inf if last_change_at is None else now - last_change_at
    limit = idle_limit(bounds, demand)
    if (
        w > bounds.min_replicas
        and limit is not None
        and demand.idle
        and demand.idle_s >= limit
        and demand.age_s >= min(limit, config.idle_yield_s)
    ):
        return Decision(
            bounds.min_replicas, f"no request for {demand.idle_s:.0f} s (idle time {limit:.0f} s)"
        )
    # Every wanted replica serves, and the youngest has measured a whole window.
    settled = ready >= w and demand.instances >= w
    measured = settled and demand.age_s >= WINDOW_S
    if measured and w < bounds.max_replicas and since >= config.up_cooldown_s:
        if demand.occupancy >= config.high:
            return Decision(w + 1, f"occupancy {demand.occupancy:.2f} for {WINDOW_S:.0f} s")
        if demand.refusing_s >= config.refusing * WINDOW_S:
            return Decision(
                w + 1,
                f"{demand.refused} refusals in {demand.refusing_s} of {WINDOW_S:.0f} s",
            )
    if w > bounds.min_replicas and since >= config.down_cooldown_s:
        if (
            ready < w
            and last_change_at is not None  # a count scaling chose, not the deploy's own
            and demand.occupancy < config.high
            and not (demand.refused or demand.waiting)
        ):
            # A wanted replica that has not served for the whole window (no VRAM for it)
            # is withdrawn once the load no longer asks for it.
            return Decision(w - 1, f"replica {w} not serving for {since:.0f} s, load fell")
        if (
            settled
            and w > 1  # going to zero is the idle time's to decide, not the occupancy's
            and demand.age_s >= LONG_S
            and demand.occupancy_long < config.low
            # The others must take this one's share without crossing the high mark.
            and demand.occupancy_long * w / (w - 1) < config.high
            and demand.refused == 0
        ):
            return Decision(w - 1, f"occupancy {demand.occupancy_long:.2f} for {LONG_S:.0f} s")
    return Decision(w)


def yield_order(
    needy: str,
    wanted: Mapping[str, int],
    bounds: Mapping[str, Bounds],
    demand: Mapping[str, Demand],
    config: ScalingConfig = DEFAULT_SCALING,
) -> list[str]:
    """The models that may give one replica to `needy`, first to yield first: above their
    min, and of lower priority, or idle and of no higher priority. Lower priority first,
    then the least recently used (the most recently used keeps its VRAM), then by name."""
    mine = bounds[needy].priority
    out = []
    for name, n in wanted.items():
        b = bounds.get(name)
        if name == needy or b is None or n <= b.min_replicas:
            continue
        d = demand.get(name, Demand())
        idle = d.idle and d.idle_s >= config.idle_yield_s
        if b.priority < mine or (idle and b.priority == mine):
            out.append(name)
    return sorted(
        out,
        key=lambda m: (bounds[m].priority, -demand.get(m, Demand()).idle_s, m),
    )


def contend(
    wanted: Mapping[str, int],
    bounds: Mapping[str, Bounds],
    demand: Mapping[str, Demand],
    missing: Callable[[Mapping[str, int]], Mapping[str, int]],
    config: ScalingConfig = DEFAULT_SCALING,
) -> tuple[dict[str, int], dict[str, str]]:
    """Counts where the replicas a model misses (missing(counts): unplaced replicas per
    model, from placement) were freed by others yielding, and the reason per changed model.
    A yield is kept only if it placed more of the needy model; the highest priority model
    is served first."""
    counts = dict(wanted)
    reasons: dict[str, str] = {}
    gaps = missing(counts)
    for needy in sorted(
        (m for m in counts if gaps.get(m, 0) > 0 and m in bounds),
        key=lambda m: (-bounds[m].priority, m),
    ):
        for donor in yield_order(needy, counts, bounds, demand, config):
            n = counts[donor]
            while gaps.get(needy, 0) > 0 and n > bounds[donor].min_replicas:
                # Fewer of the donor until the needy model gains: the first one taken may
                # be one of its own unplaced replicas, which frees nothing.
                n -= 1
                trial = {**counts, donor: n}
                after = missing(trial)
                if after.get(needy, 0) >= gaps.get(needy, 0):
                    continue
                counts, gaps = trial, after
                reasons[donor] = (
                    f"yielded VRAM to {needy} (priority {bounds[needy].priority} "
                    f"over {bounds[donor].priority})"
                    if bounds[donor].priority < bounds[needy].priority
                    else f"idle, yielded VRAM to {needy}"
                )
            if gaps.get(needy, 0) == 0:
                break
    return counts, reasons
